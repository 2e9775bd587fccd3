"""Parallelism backends, chosen by the accelerate launch config, never by recipe code.

A Backend turns a plain model and optimizer into distributed ones, and owns everything that
differs between backends inside a step: gradient sync under accumulation, backward, clipping,
the optimizer step, consolidating weights, and the plan lines printed at start. After
preparing, `verify` checks the real wrapping against what was asked, so a silent fallback
(2 processes asked, 1 running; FSDP asked, DDP used) stops the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from distrain.config import Config, ConfigError


class LaunchError(RuntimeError):
    """The processes that are running are not the ones the launcher was asked for."""


def requested_world_size() -> int | None:
    """World size the launcher was asked for, read from the variables each launcher sets."""
    for var in ("DISTRAIN_WORLD_SIZE", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    # `accelerate launch --cpu --num_processes N` sets MASTER_PORT and expects mpirun to fork;
    # without it, exactly one process runs.
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_PORT"):
        raise LaunchError(
            "accelerate launch --cpu --num_processes N runs ONE process without mpirun; use "
            "--config_file launch_configs/cpu_ddp.yaml (or --multi_gpu with ACCELERATE_USE_CPU=1)"
        )
    return None


def _check_precision(cfg: Config) -> None:
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", cfg.precision):
        raise ConfigError(
            f"precision={cfg.precision} but the launch config asks mixed_precision={launcher}; "
            f"set precision={launcher} or mixed_precision: 'no' in the launch config (distrain's precision decides)"
        )


def build_accelerator(cfg: Config) -> Accelerator:
    """One Accelerator per run. On a machine without CUDA, multi-process runs use gloo on CPU."""
    _check_precision(cfg)
    world = requested_world_size()
    cpu = not torch.cuda.is_available()
    handlers: list[Any] = []
    if cpu and world and world > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    trackers = [name for name, on in (("tensorboard", cfg.log.tensorboard), ("wandb", cfg.log.wandb)) if on]
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.precision,
        log_with=trackers or None,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if world is not None and accelerator.num_processes != world:
        raise LaunchError(
            f"the launcher asked for {world} processes but accelerate sees {accelerator.num_processes}; "
            "on CPU use launch_configs/cpu_ddp.yaml or ACCELERATE_USE_CPU=1 with --multi_gpu"
        )
    return accelerator


def configure_torch(cfg: Config) -> None:
    """Global torch switches: fast matmuls on CUDA, or full determinism when asked."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


class Backend:
    """Single process or DDP, through accelerate's prepare."""

    name = "single"

    def __init__(self, accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...] = ()):
        self.accelerator = accelerator
        self.cfg = cfg
        self.shard_blocks = shard_blocks
        self.world_size = accelerator.num_processes

    # -- building
    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Compile (before any wrapping, or DDP's forward graph-breaks) and apply sharding."""
        model = model.to(self.accelerator.device)
        if self.cfg.train.compile:
            model.compile()
        return model

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return self.accelerator.prepare(model, optimizer)

    def verify(self, model: torch.nn.Module) -> None:
        wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if self.world_size > 1 and not wrapped:
            raise LaunchError(f"{self.world_size} processes but the model is not wrapped in DDP")

    # -- stepping
    def loss_factor(self, global_count: int) -> float:
        """Factor for the summed per-sample losses; DDP averages gradients over ranks."""
        return self.world_size / global_count

    def sync_context(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if sync or self.world_size == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to max_norm (0: only measure) and return the global norm before clipping."""
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step and zero the grads; False when the grad scaler skipped the step (fp16 overflow)."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return not self.accelerator.optimizer_step_was_skipped

    # -- weights
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Consolidated weights on CPU; every rank calls it, rank 0 gets the full dict."""
        state = self.accelerator.get_state_dict(model)
        return {k: v.detach().to("cpu") for k, v in state.items()}

    def local_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """This rank's weights as they are held (a shard under FSDP), for in-memory snapshots."""
        return {k: v.detach().clone() for k, v in self.unwrap(model).state_dict().items()}

    def load_local_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.unwrap(model).load_state_dict(state)

    def plan(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        total, trainable = count_params(self.unwrap(model))
        kind = "DDP (gradients all-reduced, weights replicated)" if self.world_size > 1 else "none (one process)"
        return [("sharding", kind), ("params per rank", f"{total:,} (all)")]


class DDPBackend(Backend):
    name = "ddp"


def select_backend(accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...]) -> Backend:
    """The backend the launch config asked for."""
    dtype = accelerator.distributed_type
    if dtype == DistributedType.NO:
        return Backend(accelerator, cfg, shard_blocks)
    if dtype in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return DDPBackend(accelerator, cfg, shard_blocks)
    raise LaunchError(f"distributed type {dtype} is not supported by distrain yet")


def iter_named_blocks(model: torch.nn.Module, class_names: tuple[str, ...]) -> Iterator[torch.nn.Module]:
    for module in model.modules():
        if type(module).__name__ in class_names:
            yield module
