"""Parallelism backends, chosen by the accelerate launch config, never by recipe code.

A Backend turns a plain model and optimizer into distributed ones, and owns everything that
differs between backends inside a step: gradient sync under accumulation, backward, clipping,
the optimizer step, consolidating weights, and the plan lines printed at start. After
preparing, `verify` checks the real wrapping against what was asked, so a silent fallback
(2 processes asked, 1 running; FSDP asked, DDP used) stops the run.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
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
    """World size the launcher was asked for, read from the variables each launcher sets.

    Raises LaunchError where the variables show a launch that cannot give that world: WORLD_SIZE>1
    without the rendezvous a launcher sets, or accelerate's simple launcher asked for N>1 processes.
    """
    for var in ("DISTRAIN_WORLD_SIZE", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var):
            world = int(os.environ[var])
            if var == "WORLD_SIZE" and world > 1:
                _check_rendezvous(world)
            return world
    _check_simple_launcher()
    return None


def _check_rendezvous(world: int) -> None:
    """torchrun, accelerate launch and distrain launch set all of these with WORLD_SIZE; a WORLD_SIZE
    left in the shell alone would make torch wait for ranks that were never started."""
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise LaunchError(
            f"WORLD_SIZE={world} is set but no launcher started this process ({', '.join(missing)} unset): "
            "start it with accelerate launch/torchrun/distrain launch, or unset WORLD_SIZE"
        )


def _check_simple_launcher() -> None:
    """accelerate's simple launcher (distributed_type NO, or --cpu without --multi_gpu) starts ONE process
    even when asked for more; it then still sets MASTER_PORT (for mpirun, which it runs only with
    --mpirun_hostfile, and which sets OMPI/PMI sizes) and its own ACCELERATE_DYNAMO_BACKEND."""
    if not (os.environ.get("MASTER_PORT") and os.environ.get("ACCELERATE_DYNAMO_BACKEND")):
        return
    asked = _launcher_num_processes()
    if asked is not None and asked <= 1:
        return  # MASTER_PORT came from the user's shell, not from a launcher asked for N
    n = f"{asked} processes" if asked else "more than one process"
    how = "--cpu --num_processes N" if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" else (
        "a launch config with distributed_type NO")  # fmt: skip
    raise LaunchError(
        f"accelerate launch was asked for {n} but {how} runs ONE process; use --config_file "
        "launch_configs/cpu_ddp.yaml on CPU, launch_configs/multi_gpu.yaml (or --multi_gpu) on GPUs"
    )


def _launcher_num_processes() -> int | None:
    """The process count the parent `accelerate launch` was asked for (--num_processes, else its config
    file's num_processes); None where that cannot be read. Best effort, from /proc."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not any("accelerate" in os.path.basename(a) for a in argv[:3]):
        return None
    values: dict[str, str] = {}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        name = name.replace("-", "_").lstrip("_")
        if name in ("num_processes", "config_file"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            values.setdefault(name, value)
    if values.get("num_processes", "").isdigit():
        return int(values["num_processes"])
    if "config_file" not in values:
        return None
    import yaml

    try:
        with open(values["config_file"], encoding="utf-8") as f:
            n = yaml.safe_load(f).get("num_processes")
    except (OSError, AttributeError, ValueError, yaml.YAMLError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _check_precision(cfg: Config) -> None:
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", cfg.precision):
        raise ConfigError(
            f"precision={cfg.precision} but the launch config asks mixed_precision={launcher}; "
            f"set precision={launcher} or mixed_precision: 'no' in the launch config (distrain's precision decides)"
        )


def fsdp_requested() -> bool:
    """The launch config asked for FSDP (`accelerate launch` exports ACCELERATE_USE_FSDP from the YAML)."""
    return "true" in (os.environ.get("ACCELERATE_USE_FSDP", "").lower(), os.environ.get("DISTRAIN_USE_FSDP", ""))


def _claim_fsdp_request() -> None:
    """distrain applies FSDP2 itself, on CPU and GPU alike: accelerate would silently use DDP on CPU,
    and on GPU its prepare would wrap the model a second time. So accelerate must not see the request."""
    if os.environ.pop("ACCELERATE_USE_FSDP", "").lower() == "true":
        os.environ["DISTRAIN_USE_FSDP"] = "true"
        os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", None)  # HSDP sizes are read by FSDPBackend


def build_accelerator(cfg: Config) -> Accelerator:
    """One Accelerator per run. On a machine without CUDA, multi-process runs use gloo on CPU."""
    _check_precision(cfg)
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        # accelerate turns fp16 autocast off on CPU without a word; refuse instead of training in fp32.
        raise ConfigError("precision=fp16 needs a CUDA GPU (accelerate has no CPU fp16); use precision=bf16 or no")
    world = requested_world_size()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    # Accelerator(cpu=True) drops a DeepSpeed request: DeepSpeed on CPU runs with cpu=False and gloo.
    cpu = not torch.cuda.is_available() and not deepspeed
    handlers: list[Any] = []
    if not torch.cuda.is_available() and world and world > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    _claim_fsdp_request()
    atexit.register(_close_process_group)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.precision,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if world is not None and accelerator.num_processes != world:
        raise LaunchError(
            f"the launcher asked for {world} processes but accelerate sees {accelerator.num_processes}; "
            "on CPU use launch_configs/cpu_ddp.yaml or ACCELERATE_USE_CPU=1 with --multi_gpu"
        )
    return accelerator


def _close_process_group() -> None:
    """Destroy the process group at exit, as torch asks, rather than leave it to C++ destructors."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    """(total, trainable) parameter counts of the whole model, also when ZeRO-3 holds only a partition."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty placeholder in p itself
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
        self.checkpoint_activations(model)
        if self.cfg.train.compile:
            model.compile()
        return model

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The recipe's SHARD_BLOCKS instances; an error if the recipe names a class the model lacks."""
        found = list(iter_named_blocks(model, self.shard_blocks))
        missing = set(self.shard_blocks) - {type(b).__name__ for b in found}
        if missing:
            raise ConfigError(
                f"SHARD_BLOCKS names {', '.join(sorted(missing))} but the model has no such module; "
                f"module classes in the model: {', '.join(sorted({type(m).__name__ for m in model.modules()}))}"
            )
        return found

    def checkpoint_activations(self, model: torch.nn.Module) -> None:
        """train.activation_checkpointing: recompute each block's forward in backward.

        The block's forward is replaced in place (no wrapper module), so parameter names and
        checkpoints are the same with and without it, and FSDP's hooks stay outside the
        recomputed region, as with torch's checkpoint_wrapper.
        """
        if not self.cfg.train.activation_checkpointing:
            return
        if not self.shard_blocks:
            raise ConfigError(
                "train.activation_checkpointing=true needs the recipe to name its blocks in SHARD_BLOCKS"
            )
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks(model):
            forward = block.forward
            block.forward = functools.partial(checkpoint, forward, use_reentrant=False)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, self.plain_optimizer(optimizer)

    def plain_optimizer(self, optimizer: Any) -> Any:
        """The torch optimizer itself unless the fp16 grad scaler needs accelerate's wrapper, whose
        step re-checks its configuration every call (two package look-ups on the file system)."""
        return optimizer if self.accelerator.scaler is not None else getattr(optimizer, "optimizer", optimizer)

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

    # The hot path calls torch directly: accelerate's backward and clip_grad_norm_ re-check their
    # configuration on every call (an extra loss division, version parsing). accelerate still
    # owns what needs it: the fp16 grad scaler.
    def backward(self, loss: torch.Tensor) -> None:
        scaler = self.accelerator.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, model: torch.nn.Module, optimizer: Any, clip_norm: float,
             loss_finite: bool) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """End an optimizer step: clip, then apply it unless the loss or the gradient norm is non-finite.

        Returns (the global gradient norm before clipping, whether the step was applied). A skipped
        step leaves weights and optimizer state untouched and drops the gradients; under fp16 it
        also backs the loss scale off. Every rank must reach the same decision, so `loss_finite`
        is the global loss's verdict and the norm is global.
        """
        scaler = self.accelerator.scaler
        plain = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper under fp16
        if scaler is not None:
            scaler.unscale_(plain)
        norm = self.clip_grads(model, clip_norm)
        applied = loss_finite and math.isfinite(float(norm))
        if scaler is None:
            if applied:
                plain.step()
        elif applied:
            scaler.step(plain)  # found no inf: the norm over the same gradients is finite
            scaler.update()
        else:
            back_off(scaler)
        plain.zero_grad(set_to_none=True)
        return norm, applied

    def clip_grads(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the (unscaled) gradients to max_norm (0: only measure); the global norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))

    def after_forward_only(self, model: torch.nn.Module) -> None:
        """After forwards without a backward (evaluation): put the model back as training holds it."""

    # -- weights
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # Peeled here rather than by accelerate's unwrap_model, which imports deepspeed (~1.5 s
        # and a "Setting accelerator" warning) whenever it is installed, even for plain DDP.
        while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        return getattr(model, "_orig_mod", model)  # a torch.compile wrapper

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Consolidated weights on CPU; every rank calls it, rank 0 gets the full dict."""
        state = self.unwrap(model).state_dict()  # replicated weights: the local copy is the full one
        return {k: v.detach().to("cpu") for k, v in state.items()}

    def local_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """This rank's weights as they are held (a shard under FSDP), for in-memory snapshots."""
        return {k: v.detach().clone() for k, v in self.unwrap(model).state_dict().items()}

    def load_local_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.unwrap(model).load_state_dict(state)

    # -- checkpoints (distrain.checkpoint writes and reads these): the live tensors, keyed by
    # parameter name (plain under DDP, DTensor shards under FSDP2), so no extra copy is made.
    def checkpoint_state(self, model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model state, optimizer state keyed by parameter name) as this rank holds them."""
        from distrain.checkpoint_state import live_states

        return live_states(self.unwrap(model), getattr(optimizer, "optimizer", optimizer))

    def load_checkpoint_state(self, model: torch.nn.Module, optimizer: Any, model_state: dict[str, Any],
                              optim_state: dict[str, Any] | None) -> None:  # fmt: skip
        """Put values laid out like checkpoint_state's into the live model (and optimizer)."""
        from distrain.checkpoint_state import set_live_states

        set_live_states(self.unwrap(model), getattr(optimizer, "optimizer", optimizer), model_state, optim_state)

    def plan(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        total, _ = count_params(self.unwrap(model))
        kind = "DDP (gradients all-reduced, weights replicated)" if self.world_size > 1 else "none (one process)"
        return [("sharding", kind), ("params per rank", f"{total:,} (all)")]


class DDPBackend(Backend):
    name = "ddp"


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def select_backend(accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...],
                   micro_batch: int | None = None, grad_accum: int | None = None) -> Backend:  # fmt: skip
    """The backend the launch config asked for: FSDP from accelerate's env, never from its distributed
    type, which says DDP on CPU; DeepSpeed from the accelerator's state.

    micro_batch and grad_accum are the resolved batch plan (data.batch_size=auto chooses them);
    DeepSpeed's config is filled from them. None: data.batch_size and train.grad_accum as set.
    """
    dtype = accelerator.distributed_type
    if fsdp_requested():
        from distrain.fsdp import FSDPBackend

        return FSDPBackend(accelerator, cfg, shard_blocks)
    if dtype == DistributedType.DEEPSPEED:
        from distrain.zero import DeepSpeedBackend

        return DeepSpeedBackend(accelerator, cfg, shard_blocks, micro_batch=micro_batch, grad_accum=grad_accum)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise LaunchError(f"the launch config asks for DeepSpeed but accelerate set up {dtype.value}")
    if dtype == DistributedType.NO:
        return Backend(accelerator, cfg, shard_blocks)
    if dtype in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return DDPBackend(accelerator, cfg, shard_blocks)
    raise LaunchError(f"distributed type {dtype} is not supported by distrain")


def back_off(scaler: torch.amp.GradScaler) -> None:
    """Book a skipped step with the fp16 grad scaler as update() books one that found an inf: the scale
    times backoff_factor and the growth count restarted, identically on every rank whatever each
    rank's own inf check found; this step's unscale_ record is cleared, so the next step can unscale."""
    state = scaler.state_dict()
    state["scale"] = state["scale"] * state["backoff_factor"]
    state["_growth_tracker"] = 0
    scaler.update(new_scale=float(state["scale"]))
    scaler.load_state_dict(state)


def iter_named_blocks(model: torch.nn.Module, class_names: tuple[str, ...]) -> Iterator[torch.nn.Module]:
    for module in model.modules():
        if type(module).__name__ in class_names:
            yield module

