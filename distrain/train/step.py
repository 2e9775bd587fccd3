"""What one optimizer step and one evaluation return, and the sums of steps between two log rows."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StepResult:
    """What one optimizer step did, as train_step returns it."""

    loss: torch.Tensor  # the step's global mean loss
    grad_norm: float  # global gradient norm before clipping
    applied: bool  # False: skipped (non-finite loss or gradient, or an fp16 overflow)
    loss_finite: bool
    interrupt: int  # exit code of the signal some rank received (0: none): all ranks stop after this step
    tokens: int  # tokens of the step over all ranks (0 when the recipe does not count them)
    backward_done: float  # perf_counter when the forward/backward pass finished (after a host sync)


@dataclass
class EvalResult:
    """What evaluate returns: the loss and the recipe's metrics, and what they were computed from."""

    metrics: dict[str, Any]  # "loss" and the recipe's metrics
    # every sample's prediction once, gathered from all ranks (None: none returned): a tensor [N, ...], a
    # list of N per-sample tensors when row shapes differ between batches, or a dict of these
    preds: Any
    targets: Any


@dataclass
class Window:
    """Sums over the steps since the last training log row."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    finite: int = 0
    loss: float = 0.0
    samples: int = 0
    data: float = 0.0
    compute: float = 0.0
    optim: float = 0.0
    tokens: int = 0

    def add(self, loss: float, samples: int, data: float, compute: float, optim: float, tokens: int = 0) -> None:
        self.steps += 1
        self.tokens += tokens
        if math.isfinite(loss):
            self.finite += 1
            self.loss += loss
        self.samples += samples
        self.data += data
        self.compute += compute
        self.optim += optim
