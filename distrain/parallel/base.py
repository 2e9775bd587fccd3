"""The Backend: what differs between parallelism strategies inside a step.

A Backend turns a plain model and optimizer into distributed ones, and owns everything that
differs between backends inside a step: gradient sync under accumulation, backward, clipping,
the optimizer step, consolidating weights, and the plan lines printed at start. After
preparing, `verify` checks the real wrapping against what was asked, so a silent fallback
(2 processes asked, 1 running; FSDP asked, DDP used) stops the run. This module holds the
abstract Backend and the helpers the implementations share; ddp.py (one process and DDP),
fsdp.py and zero.py implement it, and only select.py imports them.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator

from distrain.config import Config
from distrain.errors import ConfigError
from distrain.parallel.launch import ParallelPlan
from distrain.parallel.meta_init import Deferred


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts of the whole model, also when ZeRO-3 holds only a partition."""
    total = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty placeholder in p itself
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


class Backend(abc.ABC):
    """What the trainer and the checkpoint code call; one subclass per strategy (ddp.py, fsdp.py, zero.py).

    Abstract: wrapping (`prepare`, `verify`), gradient sync, the optimizer `step`, unwrapping, full
    weights and the plan lines. The defaults here are what several strategies share; a subclass
    overrides the ones it does differently.
    """

    name: str

    def __init__(self, accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...] = (),
                 plan: ParallelPlan | None = None):  # fmt: skip
        self.accelerator = accelerator
        self.cfg = cfg
        self.shard_blocks = shard_blocks
        self.world_size = accelerator.num_processes
        self.parallel = plan if plan is not None else ParallelPlan()
        self._parameters_of: torch.nn.Module | None = None
        self._parameters: list[torch.nn.Parameter] = []

    # -- building
    def shard(self, model: torch.nn.Module, deferred: Deferred | None = None) -> torch.nn.Module:
        """Place the model, apply train.activation_checkpointing and compile (before any wrapping, or
        DDP's forward graph-breaks); sharding backends apply their sharding here too. A model built on
        meta (`deferred`, distrain.parallel.meta_init) is materialised: whole here, FSDP2 its shards."""
        if deferred is not None:
            deferred.materialise(model, self.accelerator.device)
        else:
            model = model.to(self.accelerator.device)
        checkpoint_activations(model, self.cfg, self.shard_blocks)
        if self.cfg.train.compile:
            model.compile()
        return model

    @abc.abstractmethod
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """The distributed model and optimizer, from the sharded model and an optimizer over its parameters."""

    @abc.abstractmethod
    def verify(self, model: torch.nn.Module) -> None:
        """LaunchError unless the prepared model is wrapped as this backend promises (no silent fallback)."""

    # -- stepping
    def loss_factor(self, global_count: int | torch.Tensor) -> float | torch.Tensor:
        """Factor for the summed loss terms, from the step's global count of them (an int, or a tensor
        on the device when counted there); every backend averages gradients over ranks."""
        return self.world_size / global_count

    @abc.abstractmethod
    def sync_context(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward: reduce gradients only when `sync` (the last one)."""

    # The hot path calls torch directly: accelerate's backward and clip_grad_norm_ re-check their
    # configuration on every call (an extra loss division, version parsing). accelerate still
    # owns what needs it: the fp16 grad scaler.
    def backward(self, loss: torch.Tensor) -> None:
        scaler = self.accelerator.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()

    @abc.abstractmethod
    def step(self, model: torch.nn.Module, optimizer: Any, clip_norm: float,
             loss_finite: bool) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """End an optimizer step: clip, then apply it unless the loss or the gradient norm is non-finite.

        Returns (the global gradient norm before clipping, on the host; whether the step was applied).
        A skipped step leaves weights and optimizer state untouched and drops the gradients; under
        fp16 it also backs the loss scale off. Every rank must reach the same decision, so `loss_finite`
        is the global loss's verdict and the norm is global.
        """

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """model.parameters(), listed once per model: walking the module tree every step costs more than
        the rest of clipping's bookkeeping, and prepared parameters are only ever updated in place."""
        if self._parameters_of is not model:
            self._parameters_of, self._parameters = model, list(model.parameters())
        return self._parameters

    def after_forward_only(self, model: torch.nn.Module) -> None:
        """After forwards without a backward (evaluation): put the model back as training holds it."""
        return None  # only FSDP2 has anything to undo

    # -- weights
    @abc.abstractmethod
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The recipe's module inside the wrappers, with parameter names as the recipe gave them."""

    @abc.abstractmethod
    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Consolidated weights on CPU; every rank calls it, rank 0 gets the full dict."""

    def local_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """This rank's weights as they are held (a shard under FSDP), for in-memory snapshots."""
        return {k: v.detach().clone() for k, v in self.unwrap(model).state_dict().items()}

    def load_local_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.unwrap(model).load_state_dict(state)

    # -- checkpoints (distrain.checkpoint writes and reads these): the live tensors, keyed by
    # parameter name (plain under DDP, DTensor shards under FSDP2), so no extra copy is made.
    def checkpoint_state(self, model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model state, optimizer state keyed by parameter name) as this rank holds them."""
        from distrain.checkpoint.layout import live_states

        return live_states(self.unwrap(model), getattr(optimizer, "optimizer", optimizer))

    def load_checkpoint_state(self, model: torch.nn.Module, optimizer: Any, model_state: dict[str, Any],
                              optim_state: dict[str, Any] | None) -> None:  # fmt: skip
        """Put values laid out like checkpoint_state's into the live model (and optimizer)."""
        from distrain.checkpoint.layout import set_live_states

        set_live_states(self.unwrap(model), getattr(optimizer, "optimizer", optimizer), model_state, optim_state)

    # -- describing
    @abc.abstractmethod
    def plan(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        """(name, value) lines for the plan printed at start: what is sharded, over what, per rank."""


# ---------------------------------------------------------------- helpers the backends share


def find_blocks(model: torch.nn.Module, class_names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The recipe's SHARD_BLOCKS instances; an error if the recipe names a class the model lacks."""
    found = list(iter_named_blocks(model, class_names))
    missing = set(class_names) - {type(b).__name__ for b in found}
    if missing:
        raise ConfigError(
            f"SHARD_BLOCKS names {', '.join(sorted(missing))} but the model has no such module; "
            f"module classes in the model: {', '.join(sorted({type(m).__name__ for m in model.modules()}))}"
        )
    return found


def checkpoint_activations(model: torch.nn.Module, cfg: Config, class_names: tuple[str, ...]) -> None:
    """train.activation_checkpointing: recompute each block's forward in backward.

    The block's forward is replaced in place (no wrapper module), so parameter names and
    checkpoints are the same with and without it, and FSDP's hooks stay outside the
    recomputed region, as with torch's checkpoint_wrapper.
    """
    if not cfg.train.activation_checkpointing:
        return
    if not class_names:
        raise ConfigError("train.activation_checkpointing=true needs the recipe to name its blocks in SHARD_BLOCKS")
    from torch.utils.checkpoint import checkpoint

    for block in find_blocks(model, class_names):
        forward = block.forward
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False)


def plain_optimizer(accelerator: Accelerator, optimizer: Any) -> Any:
    """The torch optimizer itself unless the fp16 grad scaler needs accelerate's wrapper, whose
    step re-checks its configuration every call (two package look-ups on the file system)."""
    return optimizer if accelerator.scaler is not None else getattr(optimizer, "optimizer", optimizer)


def torch_step(accelerator: Accelerator, optimizer: Any, clip: Callable[[], torch.Tensor],
               loss_finite: bool) -> tuple[torch.Tensor, bool]:  # fmt: skip
    """Backend.step for backends whose torch optimizer steps the parameters (one process, DDP, FSDP2):
    unscale under fp16, `clip()` (which returns the global norm before clipping), then step or skip."""
    scaler = accelerator.scaler
    plain = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper under fp16
    if scaler is not None:
        scaler.unscale_(plain)
    norm = clip().cpu()  # read once, before the optimizer's kernels are queued
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


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


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
