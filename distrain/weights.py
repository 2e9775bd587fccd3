"""Model weights as safetensors files: consolidated, atomic, no pickle."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_weights(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict to one safetensors file atomically (temp file, fsync, rename).

    Tied weights share storage, which safetensors refuses; each tensor is written as its own copy.
    """
    path = Path(path)
    seen: set[int] = set()
    tensors = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone().contiguous() if ptr in seen or not t.is_contiguous() else t
        seen.add(ptr)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))
