"""FSDP2 applied by distrain itself (`fully_shard` per recipe block, then the root), on GPU and CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate import Accelerator

from distrain.config import Config
from distrain.errors import LaunchError
from distrain.parallel.base import (
    LOW_PRECISION,
    Backend,
    checkpoint_activations,
    dtype_name,
    find_blocks,
    plain_optimizer,
    torch_step,
)
from distrain.parallel.launch import ParallelPlan, single_process_rendezvous
from distrain.parallel.meta_init import Deferred


class FSDPBackend(Backend):
    """FSDP2 (`fully_shard`) applied by distrain itself, per recipe block and then the root.

    The same path runs on GPU (nccl) and CPU (gloo): accelerate would fall back to DDP on CPU
    without a word. Parameters stay DTensors, so torch.distributed.checkpoint reads and writes
    them directly. Gradients are reduce-scattered and averaged over ranks, as under DDP.
    """

    name = "fsdp2"

    def __init__(self, accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...] = (),
                 plan: ParallelPlan | None = None):  # fmt: skip
        super().__init__(accelerator, cfg, shard_blocks, plan)
        p = self.parallel
        self.reshard_after_forward, self.offload = p.reshard_after_forward, p.cpu_offload
        self.replicate = p.replicate
        self.shard_size = self.world_size // self.replicate
        if p.activation_checkpointing:  # the launch config's fsdp_activation_checkpointing
            cfg.train.activation_checkpointing = True
        if p.shard_blocks:  # the launch config may name the blocks itself; otherwise the recipe's SHARD_BLOCKS
            self.shard_blocks = p.shard_blocks
        low = LOW_PRECISION.get(cfg.precision)
        self.param_dtype, self.reduce_dtype = low or torch.float32, torch.float32
        self.mesh: Any = None
        self.num_blocks = 0

    def shard(self, model: torch.nn.Module, deferred: Deferred | None = None) -> torch.nn.Module:
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
        if deferred is None:
            model = model.to(device)
        checkpoint_activations(model, self.cfg, self.shard_blocks)
        blocks = find_blocks(model, self.shard_blocks)
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
        if deferred is not None:  # built on meta: allocate and fill only this rank's shards
            deferred.materialise(model, device, param_device=torch.device("cpu") if self.offload else device)
        self.num_blocks = len(blocks)
        return model

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        # Only the optimizer goes through accelerate (fp16 grad scaler); the model is wrapped already.
        return model, plain_optimizer(self.accelerator, self.accelerator.prepare(optimizer))

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

    def step(self, model: torch.nn.Module, optimizer: Any, clip_norm: float,
             loss_finite: bool) -> tuple[torch.Tensor, bool]:  # fmt: skip
        from torch.distributed.tensor import DTensor

        def clip() -> torch.Tensor:
            params = [p for p in self.parameters(model) if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, clip_norm if clip_norm > 0 else float("inf"))
            return norm.full_tensor() if isinstance(norm, DTensor) else norm  # the norm over all shards

        return torch_step(self.accelerator, optimizer, clip, loss_finite)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def after_forward_only(self, model: torch.nn.Module) -> None:
        # The root keeps its parameters unsharded after a forward (reshard_after_forward=False) until
        # the backward that never comes in evaluation; checkpoints and the optimizer expect shards.
        model.reshard()  # type: ignore[operator]

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
            ("fsdp precision", f"params {dtype_name(self.param_dtype)}, reduce {dtype_name(self.reduce_dtype)}, "
             f"master weights fp32" + (", params offloaded to CPU" if self.offload else "")),
            ("activation ckpt", "on" if self.cfg.train.activation_checkpointing else "off"),
        ]


def _ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (`fsdp` launch config on one GPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    single_process_rendezvous()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()

