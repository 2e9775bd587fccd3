"""One process, and DDP, through accelerate's prepare: gradients all-reduced, weights replicated."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from distrain.errors import LaunchError
from distrain.parallel.base import Backend, count_params, plain_optimizer, torch_step


class SingleBackend(Backend):
    """One process: accelerate's prepare (device placement, the fp16 grad scaler), torch's optimizer step."""

    name = "single"

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, plain_optimizer(self.accelerator, optimizer)

    def verify(self, model: torch.nn.Module) -> None:
        wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if self.world_size > 1 and not wrapped:
            raise LaunchError(f"{self.world_size} processes but the model is not wrapped in DDP")

    def sync_context(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(self, model: torch.nn.Module, optimizer: Any, clip_norm: float,
             loss_finite: bool) -> tuple[torch.Tensor, bool]:  # fmt: skip
        max_norm = clip_norm if clip_norm > 0 else float("inf")  # 0: only measure
        clip = lambda: torch.nn.utils.clip_grad_norm_(self.parameters(model), max_norm)
        return torch_step(self.accelerator, optimizer, clip, loss_finite)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # Peeled here rather than by accelerate's unwrap_model, which imports deepspeed (slow
        # and a "Setting accelerator" warning) whenever it is installed, even for plain DDP.
        while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        return getattr(model, "_orig_mod", model)  # a torch.compile wrapper

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.accelerator.process_index != 0:  # only rank 0 writes them: no host copy on the others
            return {}
        state = self.unwrap(model).state_dict()  # replicated weights: the local copy is the full one
        return {k: v.detach().to("cpu") for k, v in state.items()}

    def plan(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        total, _ = count_params(self.unwrap(model))
        kind = "DDP (gradients all-reduced, weights replicated)" if self.world_size > 1 else "none (one process)"
        return [("sharding", kind), ("params per rank", f"{total:,} (all)")]


class DDPBackend(SingleBackend):
    """DDP: accelerate wraps the model in DistributedDataParallel; accumulation skips the all-reduce."""

    name = "ddp"

    def sync_context(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if sync or self.world_size == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)
