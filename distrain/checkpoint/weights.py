"""Model weights as safetensors files: consolidated, atomic, no pickle."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from distrain.checkpoint.shard_file import write_shard


def save_weights(
    state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict to one safetensors file atomically (temp file, fsync, rename).

    Through shard_file.write_shard, as checkpoints are: tied weights (shared storage, which
    safetensors' save_file refuses) are simply each written in full.
    """
    path = Path(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    write_shard(tmp, tensors, metadata or {})
    fsync_path(tmp)
    os.replace(tmp, path)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a small file (text as UTF-8, whatever the locale) and flush it to disk (no rename:
    for files inside a folder that is itself renamed into place, as a checkpoint's)."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def save_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, text)
    os.replace(tmp, path)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from distrain.parallel.meta_init import real_reads

    with real_reads():  # inside a build_model recorded on meta (FSDP2): real tensors, as in an eager build
        return load_file(str(path))
