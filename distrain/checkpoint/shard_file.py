"""One safetensors file of a checkpoint: written by the safetensors serializer, read through a
memory map.

Both directions skip per-tensor Python work that dominates small states of many tensors:
`safetensors.torch.save_file` checks every tensor for shared storage and builds numpy views
before its Rust serializer runs, and `safe_open(...).get_tensor` has its own per-tensor cost
(docs/performance.md has the figures). Writing passes `safetensors.TensorSpec`s (pointer,
length, dtype, shape) straight to the library's serializer; the checkpoint code guarantees what
it needs (CPU, contiguous), and tensors sharing storage are simply written twice. Reading
parses the format's header (8-byte little-endian length, JSON) and returns views of a shared
read-only memory map, so a tensor costs one `torch.frombuffer`. Read-only and shared, not
private: a private map is writable memory, which RLIMIT_DATA counts in full (a capped process
could not map its own shard beside its live state), and the pages a copy touched are released
again (`release`), so reading a checkpoint back does not add the file to the resident set.
tests/test_shard_file.py checks both against `safetensors.torch.save_file` / `load_file`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

import orjson
import safetensors
import torch
from torch.autograd.graph import increment_version

# safetensors' dtype names, as its own loader maps them
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as torch spells it without the module ("float32"), as TensorSpec and the index take it."""
    return str(dtype).removeprefix("torch.")


class ShardFileError(ValueError):
    """A file that is not a readable safetensors file (its path and what is wrong in the message)."""


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write CPU, contiguous tensors as one safetensors file (not flushed). Tensors may share
    storage (tied weights): each is written in full, as the reader expects."""
    if sys.byteorder != "little":  # the format is little-endian and the serializer copies raw bytes
        raise RuntimeError("distrain checkpoints need a little-endian machine")
    specs = {
        name: safetensors.TensorSpec(dtype=dtype_name(t.dtype), shape=list(t.shape),
                                     data_ptr=t.data_ptr(), data_len=t.numel() * t.element_size())
        for name, t in tensors.items()
    }  # fmt: skip
    safetensors.serialize_file(specs, str(path), metadata=metadata)


class ShardFile:
    """A safetensors file mapped into memory; `tensor(name)` is a view of its bytes (copy it;
    never write to it: the map is read-only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise ShardFileError(f"{self.path} is too short to be a safetensors file ({size} bytes)")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ShardFileError(f"{self.path} is unreadable: {e}") from None
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if header_len > size - 8:
            raise ShardFileError(f"{self.path}: header of {header_len} bytes in a file of {size} (truncated?)")
        try:
            header = orjson.loads(self._map[8 : 8 + header_len])  # orjson: the header is parsed on every load
        except orjson.JSONDecodeError as e:  # invalid UTF-8 included
            raise ShardFileError(f"{self.path}: unreadable header ({e})") from None
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
            raise ShardFileError(f"{self.path}: unreadable header (not a safetensors table of tensors)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self._data = 8 + header_len
        self.size = size
        self._anchor = _frombuffer(self._map, torch.uint8, size, 0)  # keeps the map's buffer exported while mapped
        self.address = self._anchor.data_ptr()  # of byte 0, for memmove

    def view(self) -> memoryview:
        """The whole file's bytes (release the view when done)."""
        return memoryview(self._map)

    def span(self, name: str) -> tuple[torch.dtype, list[int], int, int]:
        """(dtype, shape, first byte, byte count) of tensor `name`, checked against the file."""
        try:
            entry = self.entries[name]
            dtype = DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            shape = entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise ShardFileError(f"{self.path} has no readable tensor {name!r}") from None
        count = 1
        for n in shape:
            count *= n
        if end - begin != count * dtype.itemsize or self._data + end > self.size or begin < 0:
            raise ShardFileError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong size")
        return dtype, shape, self._data + begin, end - begin

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name`, viewing the mapped file (read-only use: copy it before changing it)."""
        dtype, shape, start, nbytes = self.span(name)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return _frombuffer(self._map, dtype, nbytes // dtype.itemsize, start).view(shape)

    def release(self, start: int, nbytes: int) -> None:
        """Drop the pages of bytes [start, start + nbytes) from this process's resident set once
        copied out (the whole pages inside it; the file's page cache keeps them). Views of them
        stay valid: a later read maps them again."""
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def copy_into(self, name: str, dst: torch.Tensor) -> bool:
        """Copy tensor `name` into `dst` straight from the mapped bytes (one memmove, no tensor made)
        if dst is a contiguous CPU tensor of its dtype and shape; False (nothing done) otherwise.
        The C library's memmove also beats Tensor.copy_ on large copies (its non-temporal stores,
        used above ~3/4 of the last-level cache, skip reading the destination first). The
        version counter is bumped as copy_ would."""
        dtype, shape, start, nbytes = self.span(name)
        if dst.dtype != dtype or not dst.is_cpu or list(dst.shape) != shape or not dst.is_contiguous():
            return False
        if nbytes:
            ctypes.memmove(dst.data_ptr(), self.address + start, nbytes)
            increment_version(dst)
            self.release(start, nbytes)
        return True


def _frombuffer(buffer: mmap.mmap, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """torch.frombuffer of the read-only map, without torch's warning that the tensor is writable
    (ShardFile's views are read, never written)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
