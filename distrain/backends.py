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

    # -- checkpoints (distrain.checkpoint writes and reads these; DCP's state_dict API covers
    # plain, DDP and FSDP2 models: keys are parameter names, FSDP2 values are DTensor shards)
    def checkpoint_state(self, model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model state, optimizer state keyed by parameter name) as this rank holds them.

        On an optimizer that has not stepped yet, DCP first creates its state (a zero-lr step).
        """
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(model, getattr(optimizer, "optimizer", optimizer))

    def load_checkpoint_state(self, model: torch.nn.Module, optimizer: Any, model_state: dict[str, Any],
                              optim_state: dict[str, Any]) -> None:  # fmt: skip
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(model, getattr(optimizer, "optimizer", optimizer), model_state_dict=model_state,
                       optim_state_dict=optim_state)  # fmt: skip

    def plan(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        total, _ = count_params(self.unwrap(model))
        kind = "DDP (gradients all-reduced, weights replicated)" if self.world_size > 1 else "none (one process)"
        return [("sharding", kind), ("params per rank", f"{total:,} (all)")]


class DDPBackend(Backend):
    name = "ddp"


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDPBackend(Backend):
    """FSDP2 (`fully_shard`) applied by distrain itself, per recipe block and then the root.

    The same path runs on GPU (nccl) and CPU (gloo): accelerate would fall back to DDP on CPU
    without a word. Parameters stay DTensors, so torch.distributed.checkpoint reads and writes
    them directly. Gradients are reduce-scattered and averaged over ranks, as under DDP.
    """

    name = "fsdp2"

    def __init__(self, accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...] = ()):
        super().__init__(accelerator, cfg, shard_blocks)
        env = os.environ
        if env.get("FSDP_VERSION", "2") != "2":
            raise ConfigError(
                f"launch config fsdp_version={env['FSDP_VERSION']}; distrain runs FSDP2 only: set fsdp_version: 2"
            )
        strategy = env.get("FSDP_SHARDING_STRATEGY", "").upper()
        self.reshard_after_forward = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in (
            "false", "shard_grad_op", "2",
        )  # fmt: skip
        self.replicate = int(env.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE", "1") or 1)
        if strategy in ("HYBRID_SHARD", "4") and self.replicate == 1:  # HSDP: replicate across nodes
            self.replicate = max(1, self.world_size // int(env.get("LOCAL_WORLD_SIZE", self.world_size)))
        if self.world_size % self.replicate:
            raise ConfigError(
                f"parallelism_config_dp_replicate_size={self.replicate} does not divide the {self.world_size} processes"
            )
        self.shard_size = self.world_size // self.replicate
        self.offload = env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
        if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
            cfg.train.activation_checkpointing = True
        names = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
        if names:  # the launch config may name the blocks itself; otherwise the recipe's SHARD_BLOCKS
            self.shard_blocks = tuple(n.strip() for n in names.split(",") if n.strip())
        low = LOW_PRECISION.get(cfg.precision)
        self.param_dtype, self.reduce_dtype = low or torch.float32, torch.float32
        self.mesh: Any = None
        self.num_blocks = 0

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        _ensure_process_group(self.accelerator.device)
        device = self.accelerator.device
        if self.replicate > 1:
            self.mesh = init_device_mesh(
                device.type, (self.replicate, self.shard_size), mesh_dim_names=("replicate", "shard")
            )
        else:
            self.mesh = init_device_mesh(device.type, (self.world_size,), mesh_dim_names=("shard",))
        model = model.to(device)
        self.checkpoint_activations(model)
        blocks = self.blocks(model)
        if self.cfg.train.compile:  # compile the blocks before wrapping, as torchtitan does
            for block in blocks or [model]:
                block.compile()
        kwargs: dict[str, Any] = {
            "mesh": self.mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype),
        }
        if self.offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in blocks:
            fully_shard(block, **kwargs)
        # The root holds what no block owns (stem, head); it is gathered first and kept for backward.
        fully_shard(model, **{**kwargs, "reshard_after_forward": False})
        self.num_blocks = len(blocks)
        return model

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        # Only the optimizer goes through accelerate (fp16 grad scaler); the model is wrapped already.
        return model, self.accelerator.prepare(optimizer)

    def verify(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        if not isinstance(model, FSDPModule):
            raise LaunchError(f"FSDP was asked for but the model is a plain {type(model).__name__}, not FSDP-wrapped")
        plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
        if plain:
            raise LaunchError(f"FSDP was asked for but {len(plain)} parameters are not sharded, e.g. {plain[0]}")
        sizes = {p.device_mesh.size() for p in model.parameters()}
        if sizes != {self.world_size}:
            raise LaunchError(f"FSDP mesh sizes {sorted(sizes)} differ from the {self.world_size} processes running")

    def sync_context(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        self.accelerator.unscale_gradients()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
        return get_model_state_dict(model, options=options)

    def plan(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        local = sum(_local_numel(p) for p in model.parameters())
        how = "full shard" if self.reshard_after_forward else "shard grads+optimizer, keep params after forward"
        mesh = f"{self.replicate} replicas x {self.shard_size} shards (HSDP)" if self.replicate > 1 else (
            f"{self.shard_size} shards"
        )
        return [
            ("sharding", f"FSDP2 {how}, {mesh}; {self.num_blocks} x {'/'.join(self.shard_blocks) or '-'} + root"),
            ("params per rank", f"{local:,} (params, grads and optimizer state sharded)"),
            ("fsdp precision", f"params {_dtype_name(self.param_dtype)}, reduce {_dtype_name(self.reduce_dtype)}, "
             f"master weights fp32" + (", params offloaded to CPU" if self.offload else "")),
            ("activation ckpt", "on" if self.cfg.train.activation_checkpointing else "off"),
        ]


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO 1/2/3 through accelerate, with distrain's own optimizer and LR schedule.

    distrain fills the DeepSpeed config's "auto" fields (micro batch, accumulation, train
    batch, clipping, precision) from its config; a value a user JSON sets that contradicts
    distrain's is an error naming both. The optimizer is distrain's torch optimizer (DeepSpeed's
    client optimizer, also when the optimizer state is offloaded), and the LR
    schedule is distrain's, stepped once per optimizer step. The engine clips and steps in
    one call, which distrain makes at `clip_grad_norm` (the norm is only known there).
    """

    def __init__(self, accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...] = ()):
        super().__init__(accelerator, cfg, shard_blocks)
        plugin = accelerator.state.deepspeed_plugin
        self.ds_config: dict[str, Any] = plugin.deepspeed_config
        fill_deepspeed_config(self.ds_config, cfg, self.world_size, os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.name = f"deepspeed_zero{self.stage}"
        zero = self.ds_config.get("zero_optimization", {})
        self.offload_optimizer = str(zero.get("offload_optimizer", {}).get("device", "none")).lower()
        self.offload_param = str(zero.get("offload_param", {}).get("device", "none")).lower()
        self.engine: Any = None  # the DeepSpeedEngine, for checkpointing

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        if self.offload_optimizer in ("cpu", "nvme"):
            # distrain's torch optimizer steps the offloaded fp32 copy. DeepSpeedCPUAdam would be
            # faster on large models, but with the same hyper-parameters it gave 2% different
            # losses after one step here, and "the numbers do not change" comes first.
            self.ds_config["zero_force_ds_cpu_optimizer"] = False
        low = LOW_PRECISION.get(self.cfg.precision)
        if low is not None:  # the engine holds low-precision weights and does not autocast: cast inputs
            model.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=low), with_kwargs=True)
        engine, optimizer = self.accelerator.prepare(model, optimizer)
        self.engine = engine
        return engine, optimizer

    def verify(self, model: torch.nn.Module) -> None:
        from deepspeed import DeepSpeedEngine

        if not isinstance(model, DeepSpeedEngine):
            raise LaunchError(f"DeepSpeed was asked for but the model is a {type(model).__name__}, not an engine")
        stage = model.zero_optimization_stage()
        if stage != self.stage:
            raise LaunchError(f"DeepSpeed ZeRO stage {self.stage} was asked for but the engine runs stage {stage}")
        if model.dp_world_size != self.world_size:
            raise LaunchError(f"DeepSpeed data-parallel size {model.dp_world_size} != {self.world_size} processes")

    def sync_context(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        # The engine reduces gradients only at the boundary; distrain marks it itself and steps once.
        model.set_gradient_accumulation_boundary(sync)  # type: ignore[operator]
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # distrain's loss factor already divides by the step's global sample count.
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """The engine clips (gradient_clipping = train.clip_norm) and steps here; returns the pre-clip norm."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        optimizer.step()  # accelerate's wrapper: a no-op that tells the LR schedule a step happened
        return bool(self.engine.was_step_applied())

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """fp32 master weights, gathered from the ZeRO partitions (every rank must call it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, t in self.unwrap(model).state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(t) if isinstance(t, torch.nn.Parameter) else None
            out[name] = (full if full is not None else t).detach().to("cpu", copy=True)
        return out

    def local_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self.full_state_dict(model)  # fp32 copies; ZeRO partitions have no public per-rank view

    def load_local_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        for name, t in self.unwrap(model).state_dict(keep_vars=True).items():
            value = state[name].to(self.accelerator.device)
            if not isinstance(t, torch.nn.Parameter):
                t.data.copy_(value)
                continue
            # the fp32 master copy the optimizer steps (ZeRO-3's full setter mis-slices uneven partitions)
            if self.stage == 3:
                safe_set_local_fp32_param(t, zero3_partition(t, value))
            else:
                safe_set_full_fp32_param(t, value)
            # and the weights the forward uses, which DeepSpeed keeps apart (partitioned under ZeRO-3)
            gather = GatheredParameters([t], modifier_rank=0) if self.stage == 3 else contextlib.nullcontext()
            with gather, torch.no_grad():
                t.data.copy_(value.to(t.dtype))

    # -- checkpoints: full fp32 weights and Adam moments gathered from the ZeRO partitions, in the
    # same layout DCP gives for a plain model, so ZeRO checkpoints load under any backend and back.
    def _named_groups(self, module: torch.nn.Module) -> list[list[str]]:
        names = {id(p): n for n, p in module.named_parameters()}
        zero = self.engine.optimizer
        groups = getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", None)
        if groups is None:
            raise ConfigError(f"checkpoints under DeepSpeed ZeRO-{self.stage} with this optimizer are not supported")
        return [[names[id(p)] for p in g] for g in groups]

    def _linked_optimizer_state(self) -> torch.optim.Optimizer:
        """The torch optimizer stepping the fp32 partitions, with its state created and linked to the
        parameters (ZeRO-1/2 link lazily and can miss state that torch creates at the first step)."""
        base = self.engine.optimizer.optimizer
        zero = self.engine.optimizer
        if self.stage == 3:  # groups hold their fp32 partition only while ZeRO-3 steps; same zero step per group
            for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
                if base.state.get(flat):
                    continue
                group = base.param_groups[zero.sub_group_to_group_id[i]]
                params, lr = group["params"], group["lr"]
                group["params"], group["lr"], flat.grad = [flat], 0.0, torch.zeros_like(flat)
                base.step()
                group["params"], group["lr"], flat.grad = params, lr, None
        elif not base.state:  # not stepped yet: create the state with a zero-lr, zero-grad step (as DCP does)
            lrs = [g["lr"] for g in base.param_groups]
            for g in base.param_groups:
                g["lr"] = 0.0
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            base.step()
            for g, lr in zip(base.param_groups, lrs, strict=True):
                g["lr"] = lr
                for p in g["params"]:
                    p.grad = None
        if hasattr(self.engine.optimizer, "_hp_optimizer_states_linked"):
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()
        return base

    def _set_full(self, p: torch.nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
        """Set a parameter's fp32 master copy (key None) or its optimizer state `key` from the full value,
        and the working (low-precision) copy too, which DeepSpeed's safe_set_* leave stale."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero = self.engine.optimizer
        if self.stage == 3:  # safe_set_* fail on the padded last partition; write this rank's slice directly
            part, _ = zero._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
            n = part.numel()
            piece = value.flatten()[n * zero._get_param_partition_rank(p) :][:n]
            with torch.no_grad():  # in-place writes into leaf partitions
                part.view(-1)[: piece.numel()].copy_(piece)
                if key is None:
                    p.ds_tensor.data.view(-1)[: piece.numel()].copy_(piece)
        elif key is None:
            safe_set_full_fp32_param(p, value)
            p.data.copy_(value.view_as(p))
        else:
            safe_set_full_optimizer_state(p, value, key)

    def checkpoint_state(self, model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        from deepspeed.utils import safe_get_full_optimizer_state

        module = self.unwrap(model)
        model_state = self.full_state_dict(model)
        base = self._linked_optimizer_state()
        steps = [float(s["step"]) for s in base.state.values() if "step" in s]
        keys = sorted({k for s in base.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)})
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in module.named_parameters():
            entries = {k: v.detach().to("cpu", copy=True) for k in keys
                       if (v := safe_get_full_optimizer_state(p, k)) is not None}  # fmt: skip
            if entries and steps:
                entries["step"] = torch.tensor(max(steps))
            if entries:
                state[name] = entries
        named = self._named_groups(module)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.engine.optimizer.param_groups, named, strict=True)]  # fmt: skip
        return model_state, {"state": state, "param_groups": groups}

    def load_checkpoint_state(self, model: torch.nn.Module, optimizer: Any, model_state: dict[str, Any],
                              optim_state: dict[str, Any]) -> None:  # fmt: skip
        module = self.unwrap(model)
        self._linked_optimizer_state()
        params = dict(module.named_parameters())
        for name, t in module.state_dict(keep_vars=True).items():
            if name not in params:
                t.data.copy_(model_state[name])
        for name, p in params.items():
            self._set_full(p, model_state[name].to(self.accelerator.device))
            for key, value in optim_state["state"].get(name, {}).items():
                if key != "step":
                    self._set_full(p, value.to(self.accelerator.device), key)
        steps = [float(e["step"]) for e in optim_state["state"].values() if "step" in e]
        for s in self.engine.optimizer.optimizer.state.values():
            if "step" in s and steps:
                s["step"] = torch.full_like(s["step"], max(steps)) if torch.is_tensor(s["step"]) else int(max(steps))
        for group, saved in zip(self.engine.optimizer.param_groups, optim_state["param_groups"], strict=False):
            group.update({k: v for k, v in saved.items() if k != "params" and k in group})

    def plan(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        module = self.unwrap(model)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        what = {0: "nothing (DDP-like)", 1: "optimizer state", 2: "optimizer state + gradients",
                3: "optimizer state + gradients + parameters"}[self.stage]  # fmt: skip
        per_rank = (
            f"{sum(p.ds_tensor.numel() for p in module.parameters()):,} (params partitioned)"
            if self.stage == 3 else f"{total:,} params (optimizer state: ~{total // self.world_size:,})"
        )
        weights = _dtype_name(LOW_PRECISION.get(self.cfg.precision, torch.float32))
        offload = [f"{w} -> {d}" for w, d in (("optimizer", self.offload_optimizer), ("params", self.offload_param))
                   if d not in ("none", "")]  # fmt: skip
        return [
            ("sharding", f"DeepSpeed ZeRO-{self.stage}: {what} partitioned over {self.world_size} ranks"),
            ("params per rank", per_rank),
            ("ds precision", f"params {weights}, master weights fp32, clip {self.ds_config.get('gradient_clipping')}"
             + (f", offload {', '.join(offload)}" if offload else "")),
        ]


def zero3_partition(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full tensor, laid out as ZeRO-3 partitions `param` (padded at the end)."""
    import torch.distributed as dist

    size = param.ds_tensor.numel()  # type: ignore[attr-defined]
    flat = full.flatten()
    flat = torch.cat([flat, flat.new_zeros(size * dist.get_world_size() - flat.numel())])
    return flat.narrow(0, size * dist.get_rank(), size)


def fill_deepspeed_config(ds: dict[str, Any], cfg: Config, world_size: int, source: str | None = None) -> None:
    """Fill DeepSpeed's "auto" (or missing) fields from distrain's config, in place.

    A concrete value that contradicts distrain's is a ConfigError naming both (one source of
    truth: pitfalls item 7). `source` names the user's JSON in the message.
    """
    where = f"DeepSpeed config {source}" if source and source != "none" else "DeepSpeed config"
    for block, keys in (("optimizer", "optim.*"), ("scheduler", "sched.*")):
        if block in ds:
            raise ConfigError(
                f"{where} has an '{block}' block; distrain builds the {block} from {keys}: remove the block"
            )
    micro, accum = int(cfg.data.batch_size), cfg.train.grad_accum
    wanted: list[tuple[str, Any, str, Any]] = [
        ("train_micro_batch_size_per_gpu", micro, "data.batch_size", micro),
        ("gradient_accumulation_steps", accum, "train.grad_accum", accum),
        ("train_batch_size", micro * accum * world_size, "data.batch_size x train.grad_accum x processes",
         micro * accum * world_size),
        ("gradient_clipping", cfg.train.clip_norm, "train.clip_norm", cfg.train.clip_norm),
        ("bf16.enabled", cfg.precision == "bf16", "precision", cfg.precision),
        ("fp16.enabled", cfg.precision == "fp16", "precision", cfg.precision),
    ]  # fmt: skip
    for key, value, theirs, shown in wanted:
        node, leaf = ds, key
        if "." in key:
            head, leaf = key.split(".")
            node = ds.setdefault(head, {})
        current = node.get(leaf, "auto")
        if current == "auto" or current is None:
            node[leaf] = value
        elif _differs(current, value):
            raise ConfigError(
                f"{where} sets {key}={current!r} but distrain has {theirs}={shown!r}; "
                f'set {key} to "auto" (distrain fills it) or change {theirs}'
            )
    if ds["gradient_clipping"] == 0:
        ds["gradient_clipping"] = 0.0  # DeepSpeed: 0 disables clipping, as train.clip_norm=0 does


def _differs(current: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return str(current).lower() != str(value).lower()
    try:
        return float(current) != float(value)
    except (TypeError, ValueError):
        return True


def _cast_inputs(module: torch.nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    from torch.utils._pytree import tree_map

    def cast(x: Any) -> Any:
        return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x

    return tree_map(cast, args), tree_map(cast, kwargs)


def _ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (`fsdp` launch config on one GPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def select_backend(accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...]) -> Backend:
    """The backend the launch config asked for: FSDP from accelerate's env, never from its distributed
    type, which says DDP on CPU; DeepSpeed from the accelerator's state."""
    dtype = accelerator.distributed_type
    if fsdp_requested():
        return FSDPBackend(accelerator, cfg, shard_blocks)
    if dtype == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(accelerator, cfg, shard_blocks)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise LaunchError(f"the launch config asks for DeepSpeed but accelerate set up {dtype.value}")
    if dtype == DistributedType.NO:
        return Backend(accelerator, cfg, shard_blocks)
    if dtype in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return DDPBackend(accelerator, cfg, shard_blocks)
    raise LaunchError(f"distributed type {dtype} is not supported by distrain")


def iter_named_blocks(model: torch.nn.Module, class_names: tuple[str, ...]) -> Iterator[torch.nn.Module]:
    for module in model.modules():
        if type(module).__name__ in class_names:
            yield module
