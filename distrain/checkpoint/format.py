"""The checkpoint format: file names, the block checksums COMPLETE records, and strict JSON."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from distrain.errors import CheckpointError

log = logging.getLogger("distrain")



FORMAT = "distrain-checkpoint"



VERSION = 4  # 4: COMPLETE checksums every file; 3 (still read): one shard file per rank, only shards checksummed



LEGACY_VERSION = 3



CKPT_DIR = "checkpoints"



LATEST = "latest"



COMPLETE = "COMPLETE"



INDEX = "index.json"



STATE = "trainer_state.json"



CONFIG = "config.yaml"



TEXT_FILES = (INDEX, STATE, CONFIG)  # written by rank 0; every other recorded file is a shard



ABANDONED = "abandoned-"  # checkpoints/abandoned-<time>/: a rewound run's later checkpoints, set aside



def step_name(step: int) -> str:
    return f"step_{step:08d}"



def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"



def plain_name(name: Any) -> bool:
    """Whether `name` is a bare file name (no folder part, not `.` or `..`): a name in index.json
    or COMPLETE must point inside its own checkpoint folder, never into another one."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")



BLOCKS = 8  # checksums per file: ranks share verification by block, so it is balanced at any file sizes



def block_size(size: int) -> int:
    """Bytes in each of a file's BLOCKS blocks but the last, which may be shorter."""
    return -(-size // BLOCKS)



def block_span(size: int, block: int) -> tuple[int, int]:
    """Byte range [start, end) of one of a file's BLOCKS equal blocks (the last may be shorter)."""
    step = block_size(size)
    return min(block * step, size), min((block + 1) * step, size)



HASH_WINDOW = 2**24  # bytes of a file mapped at once while hashing it (a multiple of the page size)


def block_checksums(path: str | os.PathLike, blocks: range | list[int] = range(BLOCKS)) -> dict[int, str]:
    """xxh3-128 of the given blocks of a file, hashed through a memory map (faster than reading it
    in chunks), so verifying every load is cheap. Each HASH_WINDOW of the map is released once
    hashed: the pages touched would otherwise stay in the process's resident set, a whole
    shard's worth on top of the state it was written from."""
    import mmap

    import xxhash

    if not blocks:
        return {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return {b: xxhash.xxh3_128(b"").hexdigest() for b in blocks}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
            out = {}
            for b in blocks:
                start, end = block_span(size, b)
                h = xxhash.xxh3_128()
                for lo in range(start, end, HASH_WINDOW):  # the streamed digest equals the one-shot one
                    hi = min(lo + HASH_WINDOW, end)
                    with view[lo:hi] as part:
                        h.update(part)
                    page = lo - lo % mmap.PAGESIZE
                    m.madvise(mmap.MADV_DONTNEED, page, hi - page)  # a shared read-only map: nothing lost
                out[b] = h.hexdigest()
            return out


def bytes_checksums(data: bytes) -> list[str]:
    """block_checksums of a file holding `data`, from the bytes in memory (rank 0's small files)."""
    import xxhash

    with memoryview(data) as view:
        return [xxhash.xxh3_128(view[slice(*block_span(len(data), b))]).hexdigest() for b in range(BLOCKS)]



def versions() -> dict[str, str]:
    import accelerate
    import safetensors

    from distrain.version import __version__

    return {"distrain": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__}  # fmt: skip



def json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in trainer_state.json")



def step_dirs(root: Path) -> list[Path]:
    """step_* folders under a checkpoints/ folder, oldest first."""
    out = []
    for p in root.glob("step_*"):
        tail = p.name.removeprefix("step_")
        if p.is_dir() and tail.isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name.removeprefix("step_")))



def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file. orjson parses index.json about twice as fast as the json module;
    it rejects the NaN and Infinity that json.dumps writes (a best metric can be one), which json
    then reads."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    return parse_json(raw, path)



def parse_json(raw: bytes, path: Path) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
