"""The one place that maps a ParallelPlan to a Backend class, so only it imports the implementations."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType

from distrain.config import Config
from distrain.errors import LaunchError
from distrain.parallel.base import Backend
from distrain.parallel.ddp import DDPBackend, SingleBackend
from distrain.parallel.launch import ParallelPlan, resolve_plan


def select_backend(accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...],
                   micro_batch: int | None = None, grad_accum: int | None = None,
                   plan: ParallelPlan | None = None) -> Backend:  # fmt: skip
    """The backend `plan` names (resolved from cfg and the launch environment when not given), checked
    against what accelerate set up: FSDP2 is applied by distrain (accelerate sees plain processes),
    DeepSpeed must be accelerate's distributed type, DDP a multi-process one.

    micro_batch and grad_accum are the resolved batch plan (data.batch_size=auto chooses them);
    DeepSpeed's config is filled from them. None: data.batch_size and train.grad_accum as set.
    """
    plan = plan if plan is not None else resolve_plan(cfg)
    dtype = accelerator.distributed_type
    if plan.deepspeed != (dtype == DistributedType.DEEPSPEED):
        asked = f"{plan.source} asks for DeepSpeed ({plan.backend})" if plan.deepspeed else (
            f"{plan.source} asks for {plan.backend}")  # fmt: skip
        raise LaunchError(f"{asked} but accelerate set up {dtype.value}")
    if plan.backend == "fsdp2":
        from distrain.parallel.fsdp import FSDPBackend

        return FSDPBackend(accelerator, cfg, shard_blocks, plan)
    if plan.deepspeed:
        from distrain.parallel.zero import DeepSpeedBackend

        return DeepSpeedBackend(accelerator, cfg, shard_blocks, plan, micro_batch=micro_batch, grad_accum=grad_accum)
    if dtype not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise LaunchError(f"distributed type {dtype} is not supported by distrain")
    # One process under a multi-process launcher (e.g. a one-task Slurm job) is the plain loop; DDP of one is a no-op.
    multi = dtype != DistributedType.NO and accelerator.num_processes > 1
    if (plan.backend == "ddp") != multi:
        got = f"{dtype.value} with {accelerator.num_processes} process(es)"
        raise LaunchError(f"{plan.source} asks for {plan.backend} but accelerate set up {got}")
    if plan.backend == "ddp":
        return DDPBackend(accelerator, cfg, shard_blocks, plan)
    return SingleBackend(accelerator, cfg, shard_blocks, plan)
