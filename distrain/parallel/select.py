"""The one place that maps a launch to a Backend class, so only it imports the implementations."""

from __future__ import annotations

import os

from accelerate import Accelerator
from accelerate.utils import DistributedType

from distrain.config import Config
from distrain.parallel.base import Backend
from distrain.parallel.ddp import DDPBackend
from distrain.parallel.launch import LaunchError, fsdp_requested


def select_backend(accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...],
                   micro_batch: int | None = None, grad_accum: int | None = None) -> Backend:  # fmt: skip
    """The backend the launch config asked for: FSDP from accelerate's env, never from its distributed
    type, which says DDP on CPU; DeepSpeed from the accelerator's state.

    micro_batch and grad_accum are the resolved batch plan (data.batch_size=auto chooses them);
    DeepSpeed's config is filled from them. None: data.batch_size and train.grad_accum as set.
    """
    dtype = accelerator.distributed_type
    if fsdp_requested():
        from distrain.parallel.fsdp import FSDPBackend

        return FSDPBackend(accelerator, cfg, shard_blocks)
    if dtype == DistributedType.DEEPSPEED:
        from distrain.parallel.zero import DeepSpeedBackend

        return DeepSpeedBackend(accelerator, cfg, shard_blocks, micro_batch=micro_batch, grad_accum=grad_accum)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise LaunchError(f"the launch config asks for DeepSpeed but accelerate set up {dtype.value}")
    if dtype == DistributedType.NO:
        return Backend(accelerator, cfg, shard_blocks)
    if dtype in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return DDPBackend(accelerator, cfg, shard_blocks)
    raise LaunchError(f"distributed type {dtype} is not supported by distrain")
