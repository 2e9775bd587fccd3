"""Sharded safetensors checkpoints: atomic save, checksums, retention, resume discovery.

Layout of `<run>/checkpoints/step_<N:08d>/` (and `best/`):

    shard-<rank>.safetensors   what this rank writes: its pieces of the model state (`model.*`:
                               DTensor shards under FSDP2; replicated tensors are split between
                               ranks so all ranks write), the same for the optimizer state
                               (`optim.*`, keyed by parameter name)
    index.json                 tensor -> global shape, dtype and pieces (file, offset, shape);
                               optimizer param groups and scalar state
    trainer_state.json         step, epoch, samples consumed, scheduler, grad scaler, best metric,
                               early-stopping counters, world size, backend, versions
    config.yaml                the run's config (so `distrain export` needs only the checkpoint)
    COMPLETE                   written last: step, and every other file's size and the xxh3-128
                               checksums of its eighths; a folder without it is never loaded

Ranks write into `checkpoints/.tmp-<name>` and fsync; rank 0 gathers the shards' checksums,
writes COMPLETE, renames the folder into place (the commit), then points `checkpoints/latest`
at it; older checkpoints are deleted only after that (renamed to `.tmp-del-*` first, so a
half-deleted folder never looks complete). What each rank writes and the index's piece map:
distrain/checkpoint_state.py. Loading: distrain/checkpoint_load.py. No pickle: tensors are
safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
import torch.distributed as dist

from distrain.checkpoint_state import dtensor_type, flatten_optim, geometry, layout, rank_tensors
from distrain.config import ConfigError
from distrain.fault_points import fault_point
from distrain.shard_file import write_shard
from distrain.weights import fsync_path, write_synced

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


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model (exit code 2)."""


# ---------------------------------------------------------------- small helpers


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def plain_name(name: Any) -> bool:
    """Whether `name` is a bare file name (no folder part, not `.` or `..`): a name in index.json
    or COMPLETE must point inside its own checkpoint folder, never into another one."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def agree_failed(failed: bool, world: int) -> bool:
    """Whether any rank failed (one all-reduce when world > 1): every rank gets the same answer,
    so a rank whose own step went wrong never leaves the others waiting in a collective."""
    if world == 1 or not _is_dist():
        return failed
    verdict = torch.tensor([int(failed)], dtype=torch.int64, device=collective_device())
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    return bool(verdict.item())


BLOCKS = 8  # checksums per file: ranks share verification by block, so it is balanced at any file sizes


def block_size(size: int) -> int:
    """Bytes in each of a file's BLOCKS blocks but the last, which may be shorter."""
    return -(-size // BLOCKS)


def block_span(size: int, block: int) -> tuple[int, int]:
    """Byte range [start, end) of one of a file's BLOCKS equal blocks (the last may be shorter)."""
    step = block_size(size)
    return min(block * step, size), min((block + 1) * step, size)


def block_checksums(path: str | os.PathLike, blocks: range | list[int] = range(BLOCKS)) -> dict[int, str]:
    """xxh3-128 of the given blocks of a file, hashed through a memory map (0.03 s for 600 MB in
    the page cache here, 3x faster than reading it in chunks), so verifying every load is cheap."""
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
                with view[start:end] as part:
                    out[b] = xxhash.xxh3_128(part).hexdigest()
            return out


def bytes_checksums(data: bytes) -> list[str]:
    """block_checksums of a file holding `data`, from the bytes in memory (rank 0's small files)."""
    import xxhash

    with memoryview(data) as view:
        return [xxhash.xxh3_128(view[slice(*block_span(len(data), b))]).hexdigest() for b in range(BLOCKS)]


def _write_recorded(path: Path, data: bytes) -> dict[str, Any]:
    """Write and fsync a small file; its COMPLETE entry (size, checksums)."""
    write_synced(path, data)
    return {"bytes": len(data), "xxh3_128": bytes_checksums(data)}


_WRITER: ThreadPoolExecutor | None = None


def _in_thread(fn: Any, *args: Any) -> Future:
    """Run fn on a background writer thread (file writes release the GIL, and concurrent fsyncs
    share a journal commit), returning its future. The thread is kept: starting one per save
    costs about a millisecond on a busy machine."""
    global _WRITER
    if _WRITER is None:
        _WRITER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="distrain-ckpt")
    return _WRITER.submit(fn, *args)


_AFTER: ThreadPoolExecutor | None = None
_PENDING: list[Future] = []


def _after_commit(fn: Any, *args: Any) -> None:
    """Run fn after the save returns, in order, on one thread: pointing `latest` at a committed
    checkpoint and deleting older ones (which can take long for big ones) need not hold up
    training. The interpreter waits for it at exit; flush_pending waits for it now."""
    global _AFTER
    if _AFTER is None:
        _AFTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distrain-ckpt-after")
    for done in [f for f in _PENDING if f.done()]:
        _PENDING.remove(done)
        done.result()  # an earlier one that failed raises here, at the next save, not never
    _PENDING.append(_AFTER.submit(fn, *args))


def flush_pending() -> None:
    """Wait until `latest` and retention of every finished save are done (errors re-raised)."""
    while _PENDING:
        _PENDING.pop(0).result()


def _point_latest(root: Path, name: str, keep_last: int | None = None) -> None:
    """Atomically replace `latest` (temp file, rename), then apply retention. `latest` is not
    fsynced: it is a pointer for people and tools, resume=auto scans for COMPLETE folders
    instead, so after a power cut the worst case is that it still names the previous checkpoint."""
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)
    if keep_last:
        apply_retention(root, keep_last)


def versions() -> dict[str, str]:
    import accelerate
    import safetensors

    from distrain import __version__

    return {"distrain": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__}  # fmt: skip


# ---------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | os.PathLike,
    name: str,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config_text: str,
    rank: int = 0,
    world: int = 1,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `name` (step_<N> or best) under <run_dir>/checkpoints; every rank calls it.

    Returns the final folder, which is COMPLETE and flushed on rank 0's return (other ranks
    return once their shard is flushed and its checksum handed to rank 0; anything that reads a
    checkpoint goes through rank 0 first). Then, on a background thread (flush_pending waits for
    it), `latest` is pointed at it and retention (keep_last, step_* folders only) deletes older
    ones. One collective: a gather of each shard's size and checksum on rank 0. A failed write
    (disk full) raises CheckpointError on the rank it happened on and on rank 0, which removes
    the temp folder; the earlier checkpoints are untouched.
    """
    root = Path(run_dir) / CKPT_DIR
    final = root / name
    tmp = root / f".tmp-{name}"
    step = int(trainer_state.get("step", 0))
    texts: dict[str, str] = {}
    texts_written: list[Future] = []
    checksums, size, failure = [], -1, None
    try:
        tmp.mkdir(parents=True, exist_ok=True)  # may hold files of a crashed save: removed before COMPLETE
        if rank == 0:
            _clear_stale(root, keep=tmp)
        fault_point("before_shards", rank, step)

        optim_tensors, optim_extra = flatten_optim(optim_state)
        tensors = {f"model.{k}": v for k, v in rank_tensors(model_state, rank, world).items()}
        tensors |= {f"optim.{k}": v for k, v in rank_tensors(optim_tensors, rank, world).items()}
        shard = tmp / shard_name(rank)
        write_shard(shard, tensors, {"format": FORMAT})  # no RNG states: distrain.rng derives them from the step
        if rank == 0:  # the rank-independent files, flushed on another thread while this one flushes the shard
            tensors_json = _layout_json(model_state, optim_tensors, world)
            optim_json = json.dumps(optim_extra, default=_json_default)
            index = (f'{{"format": "{FORMAT}", "version": {VERSION}, "world_size": {world}, '
                     f'"tensors": {tensors_json}, "optim": {optim_json}}}')  # fmt: skip
            texts = {STATE: json.dumps(trainer_state, indent=1, default=_json_default), CONFIG: config_text,
                     INDEX: index}  # fmt: skip
            texts_written = [_in_thread(_write_recorded, tmp / n, t.encode()) for n, t in texts.items()]
        checksums = list(block_checksums(shard).values())
        size = shard.stat().st_size
        fsync_path(shard)
    except Exception as e:  # still join the gather below: the other ranks wait in it
        failure = e
    fault_point("between_shards", rank, step)
    files = _gather_files(checksums, size, rank, world)
    if rank != 0:
        if failure is not None:
            raise _save_error(final, failure)
        return final

    try:
        if failure is not None:
            raise failure
        lost = [f for f, info in files.items() if info["bytes"] < 0]
        if lost:
            raise CheckpointError(f"checkpoint {final} was not saved: {', '.join(lost)} could not be written "
                                  "(see that rank's error); the earlier checkpoints are kept")  # fmt: skip
        fault_point("before_complete", rank, step)
        files |= dict(zip(texts, (f.result() for f in texts_written), strict=True))
        for leftover in tmp.iterdir():  # files of a crashed save of the same name (e.g. a shard of a rank gone)
            if leftover.name not in files:
                leftover.unlink()
        # COMPLETE, written last, vouches for every other file: its size and checksums.
        record = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
        write_synced(tmp / COMPLETE, json.dumps(record) + "\n")
        fsync_path(tmp)
        _commit(root, tmp, final)
    except Exception as e:
        for f in texts_written:  # no writer thread may still be writing into the folder removed here
            f.exception()
        shutil.rmtree(tmp, ignore_errors=True)
        error = _save_error(final, e)
        if error is e:
            raise
        raise error from e
    fault_point("before_latest", rank, step)
    if name.startswith("step_"):  # bookkeeping that nothing waits for: see flush_pending
        _after_commit(_point_latest, root, name, keep_last)
    return final


def _save_error(final: Path, error: Exception) -> Exception:
    """A failed save as one line naming the checkpoint and the OS error (disk full, ...); other
    exceptions (bugs) unchanged."""
    if isinstance(error, OSError):
        return CheckpointError(f"cannot write checkpoint {final}: {error}; the earlier checkpoints are kept")
    return error


_LAYOUT: tuple[tuple[Any, ...], str] | None = None


def _layout_json(model_state: dict[str, torch.Tensor], optim_tensors: dict[str, torch.Tensor], world: int) -> str:
    """index.json's "tensors": the piece map of every rank (checkpoint_state.layout), as JSON.

    Cached: it depends only on names, shapes, dtypes and shard geometry, which do not change
    between the saves of a run, and building plus encoding it costs ~0.7 ms on a 130-tensor state
    (rank 0's critical path); checking the signature costs a fifth of that.
    """
    global _LAYOUT
    dt = dtensor_type()
    signature = (world, *((k, v.shape, v.dtype, geometry(v) if isinstance(v, dt) else None)
                          for part in (model_state, optim_tensors) for k, v in part.items()))  # fmt: skip
    if _LAYOUT is None or _LAYOUT[0] != signature:
        tensors = {**{f"model.{k}": v for k, v in layout(model_state, world, shard_name).items()},
                   **{f"optim.{k}": v for k, v in layout(optim_tensors, world, shard_name).items()}}  # fmt: skip
        _LAYOUT = (signature, json.dumps(tensors))
    return _LAYOUT[1]


def _gather_files(checksums: list[str], size: int, rank: int, world: int) -> dict[str, dict[str, Any]]:
    """Rank 0 collects every shard's size and block checksums, as int64s in one gather (no
    pickling, fixed size: BLOCKS checksums a file). Size -1: that rank could not write its shard
    (no checksums). Other ranks get {}."""
    words = [size]
    for c in checksums or ["0"] * BLOCKS:
        value = int(c, 16)
        words += [_signed64(value >> 64), _signed64(value & 0xFFFFFFFFFFFFFFFF)]
    mine = torch.tensor(words, dtype=torch.int64)
    rows = [mine]
    if _is_dist():
        mine = mine.to(collective_device())
        rows = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
        dist.gather(mine, rows, dst=0)
    if rank != 0:
        return {}
    out = {}
    for r, row in enumerate(rows):
        nbytes, *halves = (int(x) & 0xFFFFFFFFFFFFFFFF for x in row.tolist())
        if nbytes >= 1 << 63:  # -1: a rank that failed
            out[shard_name(r)] = {"bytes": -1, "xxh3_128": []}
            continue
        hashes = [f"{hi << 64 | lo:032x}" for hi, lo in zip(halves[::2], halves[1::2], strict=True)]
        out[shard_name(r)] = {"bytes": nbytes, "xxh3_128": hashes}
    return out


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def collective_device() -> torch.device:
    """Where the default process group's tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _clear_stale(root: Path, keep: Path) -> None:
    """Remove the temp folders of crashed saves (rank 0, at the start of a save).

    Only at the start: other ranks may already be writing the next save's temp folder while rank
    0 finishes this one, but never one other than `keep` at this point. An older folder moved
    aside to be replaced (best/) that a crash left as the only copy is put back if it verifies,
    so a finished checkpoint is never lost.
    """
    for stale in root.glob(".tmp-*"):
        if stale == keep:
            continue
        if stale.name.startswith(".tmp-old-"):
            restore_replaced(root, stale.name.removeprefix(".tmp-old-"))
        if stale.exists():
            shutil.rmtree(stale, ignore_errors=True)


def restore_replaced(root: Path, name: str) -> bool:
    """Put back checkpoints/<name> (best/) from the copy a crash between the two renames of its
    replacement (_commit) left as `.tmp-old-<name>`, if <name> is missing and the copy verifies.
    True if it was put back."""
    old, original = root / f".tmp-old-{name}", root / name
    if original.exists() or not old.is_dir():
        return False
    try:
        verify(old)
    except CheckpointError as e:
        log.warning("not restoring %s from %s: %s", original, old, e)
        return False
    os.replace(old, original)
    fsync_path(root)
    log.warning("restored %s from %s, the copy an interrupted save left", original, old.name)
    return True


def _commit(root: Path, tmp: Path, final: Path) -> None:
    """Rename the flushed temp folder into place (rank 0): the step that makes a checkpoint exist,
    then flush the rename. An older folder of the same name (best/) is moved aside, replaced,
    then deleted; between the two renames only the moved-aside copy exists, which
    restore_replaced puts back and find_best reads."""
    if final.exists():
        old = root / f".tmp-old-{final.name}"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(old, final)
            raise
        fsync_path(root)  # the new one is on disk before the old one goes
        remove_checkpoint(old)
        return
    os.replace(tmp, final)
    fsync_path(root)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: renamed to `.tmp-del-*` first (atomic), then deleted, so a crash
    part-way never leaves a folder with COMPLETE but without its shards under a loadable name."""
    doomed = path.parent / f".tmp-del-{path.name}-{time.time_ns()}"
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _json_default(obj: Any) -> Any:
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


def apply_retention(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` COMPLETE step_* folders (best/ is separate); delete the rest."""
    dirs = step_dirs(root)
    complete = [p for p in dirs if (p / COMPLETE).is_file()]
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else None
    for p in dirs:
        # incomplete folders older than the newest complete one are crash leftovers
        if p not in keep and newest is not None and int(p.name[5:]) < int(newest.name[5:]):
            remove_checkpoint(p)


# ---------------------------------------------------------------- discovery and verification


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file. orjson parses index.json twice as fast as the json module (0.13
    against 0.24 ms for har's under FSDP2, a tenth of a small load); it rejects the NaN and
    Infinity that json.dumps writes (a best metric can be one), which json then reads."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    return _parse_json(raw, path)


def _parse_json(raw: bytes, path: Path) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


_LEGACY_WARNED: set[Path] = set()


def verify(path: str | os.PathLike, rank: int = 0, world: int = 1, defer_same_world: bool = False) -> dict[str, Any]:
    """Check a checkpoint folder is COMPLETE and every file matches its recorded size and checksum.

    The small files rank 0 writes (index.json, trainer_state.json, config.yaml) are hashed in
    full on every rank, as every rank reads them anyway. Of the shards, with world > 1, this
    rank hashes only every world-th block (sizes are checked on all), so the ranks share the
    reading evenly; choose (below) combines their verdicts. defer_same_world: a checkpoint that
    hashed_while_loading has its shards not hashed here, as each rank hashes its own shard while
    loading from it (checkpoint_load.load_verified). Every name COMPLETE records and every
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
    index = _parse_json(_read_recorded(path, INDEX, files.get(INDEX)), path / INDEX)
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
    _parse_json(_read_recorded(path, STATE, files.get(STATE)), path / STATE)
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
    """Whether checkpoint_load.load_verified checks this checkpoint's shard checksums while loading
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


SKIPPED = "skipping checkpoint: "  # how choose and the resume warn about a checkpoint they pass over


def with_skips(message: str, skipped: list[str]) -> str:
    """`message` followed by why each checkpoint was passed over, in one line."""
    return f"{message} ({'; '.join(skipped)})" if skipped else message


def warn_skips(skipped: list[str]) -> None:
    for reason in skipped:
        log.warning(SKIPPED + "%s", reason)


def find_resumable(run_dir: str | os.PathLike) -> Path | None:
    """The newest COMPLETE checkpoint that verifies; incomplete or corrupt ones are skipped with a warning."""
    chosen = choose("auto", run_dir, defer=False)
    return chosen[0] if chosen else None


def resolve(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A verified checkpoint folder and its index, from itself, a run dir (its newest good
    checkpoint) or a checkpoints/ folder; CheckpointError if there is none."""
    skipped: list[str] = []
    try:
        chosen = choose(str(path), path, defer=False, skipped=skipped)
    except CheckpointError as e:  # one line: the reasons the damaged ones were passed over in it
        raise CheckpointError(with_skips(str(e), skipped)) from None
    warn_skips(skipped)
    assert chosen is not None  # choose raises for anything but resume=auto
    return chosen


def choose(resume: str, run_dir: str | os.PathLike, rank: int = 0, world: int = 1, skip: tuple[str, ...] = (),
           defer: bool = True, skipped: list[str] | None = None) -> tuple[Path, dict[str, Any]] | None:  # fmt: skip
    """The checkpoint to resume from and its index; all ranks call it and get the same answer.

    `resume=auto`: the newest step checkpoint in run_dir that verifies (None if none does);
    `resume=<folder>`: that checkpoint, or an error; `resume=<run dir>`: its newest good one.
    `skip`: folder names already found bad. `skipped`: where to put why each damaged one was passed
    over (the caller warns or puts the reasons in its error); without it rank 0 warns. The ranks
    share the checksum work (each hashes every world-th eighth of the files; with `defer`, a
    checkpoint that hashed_while_loading is left to checkpoint_load.load_verified, each rank hashing
    its own shard while loading it) and agree through one all-reduce per candidate (at least one, so
    ranks that see different folders, even none, stop with an error instead of waiting for each
    other). find_resumable and resolve are this with one process and nothing deferred.
    """
    p = Path(run_dir if resume == "auto" else resume)
    explicit = resume != "auto" and ((p / INDEX).is_file() or (p / COMPLETE).is_file())
    candidates = [p] if explicit else list(reversed(step_dirs((p.parent if p.name == CKPT_DIR else p) / CKPT_DIR)))
    candidates = [c for c in candidates if c.name not in skip]
    for candidate in candidates or [None]:
        index, error = _verify_together(candidate, len(candidates), rank, world, defer)
        if candidate is None:
            break
        if index is not None:
            return candidate, index
        if explicit:
            raise CheckpointError(error)
        if skipped is not None:
            skipped.append(error)
        elif rank == 0:
            log.warning(SKIPPED + "%s", error)
    if resume == "auto":
        return None
    if not p.exists():
        raise CheckpointError(f"{resume} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{resume} is a file, not a checkpoint folder or a run dir")
    if candidates:  # each was passed over; resolve and the resume put the reasons in the line
        raise CheckpointError(f"no checkpoint in {resume} verifies")
    raise CheckpointError(f"{resume} holds no complete checkpoint (looked for {CKPT_DIR}/step_*/{COMPLETE})")


def _verify_together(path: Path | None, n_candidates: int, rank: int, world: int,
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


# ---------------------------------------------------------------- best/ and rewinding


def _saved_step(path: Path) -> int | None:
    """The step trainer_state.json of a checkpoint folder names (not verified), None if unreadable."""
    if not path.is_dir():
        return None
    try:
        step = read_json(path / STATE).get("step")
    except (CheckpointError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def find_best(ckpt: Path, state: dict[str, Any], rank: int = 0, world: int = 1) -> tuple[Path, dict[str, Any]] | None:
    """The best/ checkpoint next to `ckpt` that holds the run's best step (when that is not
    `ckpt`'s own step) and verifies on every rank, with its index; None if there is none.

    All ranks call it and get the same answer. Looks at best/ and at `.tmp-old-best`, the copy
    of the previous best/ that a crash between the two renames of its replacement leaves
    (and that exists until the replacement is flushed), so the best weights survive a crash at
    any point of a save of best/.
    """
    train = state.get("train_state") or {}
    best_step = train.get("best_step", -1)
    if ckpt.name == "best" or best_step in (-1, train.get("step")):
        return None
    root = ckpt.parent
    candidates = [p for p in (root / "best", root / ".tmp-old-best") if _saved_step(p) == best_step]
    for candidate in candidates or [None]:
        index, error = _verify_together(candidate, len(candidates), rank, world, defer=False)
        if candidate is None:
            break
        if index is not None:
            return candidate, index
        if rank == 0:
            log.warning("best checkpoint not usable: %s", error)
    return None


def set_aside_future(ckpt: Path, run_dir: str | os.PathLike, rank: int = 0, world: int = 1) -> Path | None:
    """After resuming from `ckpt` (step X) into its own run dir, move the checkpoints of the
    abandoned future (step_* folders after X, a best/ of a later step) into
    `checkpoints/abandoned-<time>/`, so retention (by step number) and resume=auto continue the
    lineage that runs now; nothing is deleted. A best/ that a crash left moved aside is put back.

    Call after every rank has loaded `ckpt`, before anything new is written. Rank 0 moves; all
    ranks get its outcome (an error on every rank if it failed). Returns the folder the
    checkpoints were moved into, None if none.
    """
    root = Path(run_dir) / CKPT_DIR
    if ckpt.parent.resolve() != root.resolve():
        return None  # resumed into another run dir: this lineage has no future there
    dest, error = None, ""
    if rank == 0:
        try:
            dest = _move_future(root, ckpt)
            restore_replaced(root, "best")
        except (OSError, CheckpointError) as e:
            error = f"cannot move the checkpoints after {ckpt} aside: {e}"
    if agree_failed(bool(error), world):
        raise CheckpointError(error or f"rank 0 could not move the checkpoints after {ckpt} aside (see its error)")
    return dest


def _move_future(root: Path, ckpt: Path) -> Path | None:
    step = _saved_step(ckpt)
    if step is None:
        raise CheckpointError(f"{ckpt / STATE} names no step")
    later = [p for p in step_dirs(root) if int(p.name.removeprefix("step_")) > step]
    later += [p for p in (root / "best", root / ".tmp-old-best") if (_saved_step(p) or -1) > step]
    if not later:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = root / f"{ABANDONED}{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = root / f"{ABANDONED}{stamp}-{n}"
    dest.mkdir()
    for p in later:  # .tmp-old-best keeps a visible name there: it is a finished checkpoint
        os.replace(p, dest / ("best.previous" if p.name == ".tmp-old-best" else p.name))
    (dest / "README").write_text(f"Checkpoints of a run that had gone on past {ckpt.name}: set aside on {stamp} "
                                 f"when the run was resumed from {ckpt.name}, which discards them.\n")  # fmt: skip
    fsync_path(root)
    remaining = step_dirs(root)
    if remaining:
        _point_latest(root, remaining[-1].name)
    else:
        (root / LATEST).unlink(missing_ok=True)
    log.warning("resumed from %s, an earlier checkpoint of this run: moved the %d later checkpoint(s) of the "
                "abandoned run (%s) to %s; nothing was deleted", ckpt.name, len(later),
                ", ".join(p.name for p in later), dest)  # fmt: skip
    return dest
