"""DDP through accelerate's prepare: gradients all-reduced, weights replicated."""

from __future__ import annotations

from distrain.parallel.base import Backend


class DDPBackend(Backend):
    name = "ddp"
