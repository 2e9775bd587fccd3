"""Random streams owned by distrain: every draw a run makes is a pure function of its position.

Dropout and any randomness inside a recipe's step come from the global RNGs (torch CPU and
CUDA, numpy, python), which distrain re-seeds before each optimizer step from (seed, rank,
step); a batch fetched by the DataLoader (in a worker or not) is fetched with them seeded from
(seed, epoch, rank, position). A resumed run therefore draws exactly what the uninterrupted
one drew, whatever happened in between (an evaluation, a restart, a DataLoader iterator that
takes its base seed from the global RNG), and nothing about the RNG needs restoring.
"""

from __future__ import annotations

import random

import numpy as np
import torch

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: consecutive inputs give unrelated 64-bit outputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def stream_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by (seed, *keys); distinct keys give independent streams."""
    x = _mix(seed & _MASK)
    for k in keys:
        x = _mix(x ^ (k & _MASK))
    return x >> 1  # torch.manual_seed accepts any 64-bit value; numpy's legacy seed wants < 2**32 (below)


# The stream kinds, so that a step's dropout stream and a batch's fetch stream never coincide.
STEP, FETCH = 1, 2


def seed_global(seed: int, device: torch.device | None = None) -> None:
    """Seed torch (CPU, and the current CUDA device's generator), numpy's and python's global RNGs."""
    torch.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)


def seed_step(seed: int, rank: int, step: int, device: torch.device | None = None) -> None:
    """The global RNGs for optimizer step `step` (0-based) on `rank`: dropout, recipe-side noise."""
    seed_global(stream_seed(seed, STEP, rank, step), device)
