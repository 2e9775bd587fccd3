"""Optimizers and learning-rate schedules.

The schedule is a pure function of the optimizer step, stepped by distrain exactly once per
optimizer step (never through accelerate's scheduler wrapper, which steps once per process).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from distrain.config import OptimConfig, SchedConfig


def effective_lr(cfg: OptimConfig, global_batch: int) -> float:
    """`lr`, scaled by the linear or square-root rule for the global batch when asked."""
    ratio = global_batch / cfg.base_batch
    return {"none": cfg.lr, "linear": cfg.lr * ratio, "sqrt": cfg.lr * math.sqrt(ratio)}[cfg.scale_lr]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups: Iterable = param_groups(model, cfg.weight_decay)
    foreach = multi_tensor(model)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, foreach=foreach)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, foreach=foreach)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, foreach=foreach)


def multi_tensor(model: torch.nn.Module) -> bool | None:
    """True for plain CPU parameters of at most MULTI_TENSOR_MAX elements, else torch's default
    (None: multi-tensor on CUDA already, the per-parameter loop on CPU).

    On CPU torch defaults to its per-parameter loop; the multi-tensor (foreach) implementation
    runs the same kernels on each tensor, so the same arithmetic, with one Python call per
    operation instead of one per operation and parameter. But it holds its temporaries (Adam's
    sqrt of the second moments) for all parameters at once, a full copy of them: above
    MULTI_TENSOR_MAX that memory outweighs the Python calls saved. Sharded (DTensor) parameters
    keep the default.
    """
    params = list(model.parameters())
    plain_cpu = all(p.device.type == "cpu" and type(p.data) is torch.Tensor for p in params)
    return True if plain_cpu and sum(p.numel() for p in params) <= MULTI_TENSOR_MAX else None


# Parameters (elements) up to which CPU optimizers run multi-tensor: 64 MiB of fp32 temporaries at most.
MULTI_TENSOR_MAX = 2**24


def warmup_steps(cfg: SchedConfig, total_steps: int) -> int:
    return cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)


def lr_multiplier(cfg: SchedConfig, total_steps: int, peak_lr: float) -> Callable[[int], float]:
    """Factor of the peak lr used at optimizer step s (0-based).

    Warmup rises linearly to the peak, reached at the last warmup step; then the decay runs
    over the remaining steps down to `min_lr` (cosine/linear), or by `gamma` (step/exponential).
    """
    warm = warmup_steps(cfg, total_steps)
    floor = cfg.min_lr / peak_lr
    decay_steps = max(1, total_steps - warm)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        s = step - warm
        progress = min(s / decay_steps, 1.0)
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "linear":
            return floor + (1 - floor) * (1 - progress)
        if cfg.name == "step":
            return cfg.gamma ** (s // cfg.step_size)
        return cfg.gamma**s

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedConfig, total_steps: int, peak_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps, peak_lr))
