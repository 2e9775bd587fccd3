"""Integrity: a folder is complete and its bytes match the checksums COMPLETE records."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distrain.checkpoint.collective import collective_device
from distrain.checkpoint.format import (
    BLOCKS,
    COMPLETE,
    CONFIG,
    FORMAT,
    INDEX,
    LEGACY_VERSION,
    STATE,
    TEXT_FILES,
    VERSION,
    block_checksums,
    block_span,
    bytes_checksums,
    log,
    parse_json,
    plain_name,
    read_json,
)
from distrain.errors import CheckpointError

# Process-wide, not a CheckpointManager's: the old format is named once whoever verifies it (resume, export).
_LEGACY_WARNED: set[Path] = set()



def verify(path: str | os.PathLike, rank: int = 0, world: int = 1, defer_same_world: bool = False) -> dict[str, Any]:
    """Check a checkpoint folder is COMPLETE and every file matches its recorded size and checksum.

    The small files rank 0 writes (index.json, trainer_state.json, config.yaml) are hashed in
    full on every rank, as every rank reads them anyway. Of the shards, with world > 1, this
    rank hashes only every world-th block (sizes are checked on all), so the ranks share the
    reading evenly; find.choose combines their verdicts. defer_same_world: a checkpoint that
    hashed_while_loading has its shards not hashed here, as each rank hashes its own shard while
    loading from it (load.load_verified). Every name COMPLETE records and every
    piece's file in the index must be a plain name of a recorded shard, so nothing is read from
    outside the folder. Returns the index; raises CheckpointError naming the first bad file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): its save was interrupted")
    complete = read_json(path / COMPLETE)
    files = recorded_files(path, complete)
    version = complete.get("version", LEGACY_VERSION)  # version 3 wrote none (and recorded only the shards)
    if version == VERSION and (unrecorded := [n for n in TEXT_FILES if n not in files]):
        raise CheckpointError(f"{path / COMPLETE} does not record {unrecorded[0]} (damaged?)")
    index = parse_json(_read_recorded(path, INDEX, files.get(INDEX)), path / INDEX)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path / INDEX} is not a distrain checkpoint index")
    if index.get("version") not in (LEGACY_VERSION, VERSION) or version not in (LEGACY_VERSION, VERSION):
        found = index.get("version") if version in (LEGACY_VERSION, VERSION) else version
        raise CheckpointError(
            f"checkpoint {path} has format version {found}; this distrain reads versions "
            f"{LEGACY_VERSION} and {VERSION} (export it with the distrain that wrote it)"
        )
    if index["version"] != version:
        raise CheckpointError(f"checkpoint {path}: {INDEX} is of format version {index['version']}, {COMPLETE} "
                              f"of {version} (damaged?)")  # fmt: skip
    if version == LEGACY_VERSION and path not in _LEGACY_WARNED:
        _LEGACY_WARNED.add(path)
        log.warning("checkpoint %s has format version %d: its shards are checksummed, its %s, %s and %s are not",
                    path, LEGACY_VERSION, *TEXT_FILES)  # fmt: skip
    _check_pieces(path, index, files)
    parse_json(_read_recorded(path, STATE, files.get(STATE)), path / STATE)
    if CONFIG in files:
        _read_recorded(path, CONFIG, files[CONFIG])
    deferred = defer_same_world and hashed_while_loading(index, files, world)
    for i, fname in enumerate(sorted(n for n in files if n not in TEXT_FILES)):
        f, info = path / fname, files[fname]
        try:
            size = f.stat().st_size
        except OSError:
            raise CheckpointError(f"checkpoint file {f} is missing") from None
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} has {size} bytes, {info['bytes']} were written (truncated?)")
        if deferred:
            continue
        mine = [b for b in range(BLOCKS) if (i * BLOCKS + b) % world == rank]
        try:
            hashed = block_checksums(f, mine)
        except OSError as e:
            raise CheckpointError(f"checkpoint file {f} is unreadable: {e}") from None
        for b, checksum in hashed.items():
            if checksum != info["xxh3_128"][b]:
                start, end = block_span(size, b)
                raise CheckpointError(f"checkpoint file {f} fails its checksum in bytes {start}-{end} (corrupted)")
    return index



def _read_recorded(path: Path, name: str, info: dict[str, Any] | None) -> bytes:
    """The bytes of a small file of the checkpoint, checked against COMPLETE's record (info) if any."""
    f = path / name
    try:
        raw = f.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint file {f} is missing or unreadable: {e}") from None
    if info is not None:
        if len(raw) != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} has {len(raw)} bytes, {info['bytes']} were written "
                                  "(edited or truncated?)")  # fmt: skip
        if bytes_checksums(raw) != info["xxh3_128"]:
            raise CheckpointError(f"checkpoint file {f} fails its checksum (edited or corrupted)")
    return raw



def _check_pieces(path: Path, index: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    """Every piece in the index names a shard COMPLETE records (so it was verified), by a plain name."""
    try:
        names = {piece["file"] for entry in index["tensors"].values() for piece in entry["pieces"]}
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path / INDEX} does not map the checkpoint's tensors (damaged?)") from None
    for name in sorted(names, key=str):
        if not plain_name(name):
            raise CheckpointError(f"{path / INDEX} names {name!r} as a tensor's file: not a file of this "
                                  "checkpoint folder (pieces must name its own shards)")  # fmt: skip
        if name not in files or name in TEXT_FILES:
            raise CheckpointError(f"{path / INDEX} names {name} as a tensor's file, which {COMPLETE} does not "
                                  "record as a shard (damaged?)")  # fmt: skip



# Below this many bytes one more all-reduce costs more than the saved second read. The variable
# is a test hook (0: always hash while loading, so small test checkpoints take that path too).
HASH_WHILE_LOADING_ENV = "DISTRAIN_HASH_WHILE_LOADING_MIN"



def hashed_while_loading(index: dict[str, Any], files: dict[str, dict[str, Any]], world: int) -> bool:
    """Whether load.load_verified checks this checkpoint's shard checksums while loading
    it (each rank its own shard) rather than verify before: a checkpoint of this world size, big
    enough for the saved second pass over its bytes to matter. The same answer on every rank."""
    least = int(os.environ.get(HASH_WHILE_LOADING_ENV, 64 << 20))
    shard_bytes = sum(f["bytes"] for n, f in files.items() if n not in TEXT_FILES)
    return index.get("world_size") == world and shard_bytes >= least



def recorded_files(path: Path, complete: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """file -> {bytes, xxh3_128: [a checksum per block]} as COMPLETE records them (`complete`: its
    parsed content if already read), each a plain file name of the folder."""
    complete = complete if complete is not None else read_json(path / COMPLETE)
    files = complete.get("files") if isinstance(complete, dict) else None
    if not isinstance(files, dict) or not files or not all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and v["bytes"] >= 0
        and isinstance(v.get("xxh3_128"), list) and len(v["xxh3_128"]) == BLOCKS for v in files.values()
    ):  # fmt: skip
        raise CheckpointError(f"{path / COMPLETE} does not record the checkpoint's files (damaged?)")
    if outside := [n for n in files if not plain_name(n) or n == COMPLETE]:
        raise CheckpointError(f"{path / COMPLETE} records {outside[0]!r}: not a file of this checkpoint folder")
    return files



def verify_together(path: Path | None, n_candidates: int, rank: int, world: int,
                     defer: bool) -> tuple[dict[str, Any] | None, str]:  # fmt: skip
    """(index, "") if the checkpoint verifies on every rank, else (None, what is wrong). path None:
    this rank has no candidate, and only checks that no other rank has one. Whatever goes wrong
    on one rank (an OSError while hashing included) becomes its verdict, so no rank is left
    waiting in the all-reduce."""
    index, error = None, ""
    if path is not None:
        try:
            index = verify(path, rank, world, defer_same_world=defer)
        except CheckpointError as e:
            error = str(e)
        except Exception as e:  # a verdict like any other: the other ranks wait for it
            error = f"checkpoint {path} could not be verified: {type(e).__name__}: {e}"
    if world == 1 or not dist.is_initialized():
        return index, error
    ident = zlib.crc32(path.name.encode()) if path is not None else 0
    verdict = torch.tensor([index is None, ident, -ident, n_candidates, -n_candidates], dtype=torch.int64)
    verdict = verdict.to(collective_device())
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    failed, hi, neg_lo, n_hi, neg_n_lo = verdict.tolist()
    if (hi, n_hi) != (-neg_lo, -neg_n_lo):
        where = path.parent if path is not None else "the run dir"
        raise CheckpointError(f"ranks see different checkpoints in {where}; it must be on a shared file system")
    if failed and index is not None and path is not None:  # another rank found the fault: name it here too
        index, error = None, describe_fault(path)
    return index, error



def describe_fault(path: Path, what: str = "failed verification on another rank") -> str:
    """What is wrong with a checkpoint another rank found bad, from this rank (re-reading all of it:
    the rare path), so every rank's error names the file."""
    try:
        verify(path)
    except CheckpointError as e:
        return str(e)
    except Exception as e:  # only a message: every rank already agreed it is bad
        return f"checkpoint {path} could not be verified: {type(e).__name__}: {e}"
    return f"checkpoint {path} {what}"
