"""Saving: every rank writes its shard, rank 0 commits the folder atomically, then retention.

Ranks write into `checkpoints/.tmp-<name>` and fsync; rank 0 gathers the shards' checksums,
writes COMPLETE, renames the folder into place (the commit), then points `checkpoints/latest`
at it; older checkpoints are deleted only after that (renamed to `.tmp-del-*` first, so a
half-deleted folder never looks complete).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distrain.checkpoint.collective import collective_device, is_dist, signed64
from distrain.checkpoint.format import (
    BLOCKS,
    CKPT_DIR,
    COMPLETE,
    CONFIG,
    FORMAT,
    INDEX,
    LATEST,
    STATE,
    VERSION,
    block_checksums,
    bytes_checksums,
    json_default,
    log,
    shard_name,
    step_dirs,
)
from distrain.checkpoint.integrity import verify
from distrain.checkpoint.layout import flatten_optim, layout, placement, rank_pieces, rank_tensors
from distrain.checkpoint.shard_file import write_shard
from distrain.checkpoint.weights import fsync_path, write_synced
from distrain.errors import CheckpointError
from distrain.fault_points import fault_point


def _write_recorded(path: Path, data: bytes) -> dict[str, Any]:
    """Write and fsync a small file; its COMPLETE entry (size, checksums)."""
    write_synced(path, data)
    return {"bytes": len(data), "xxh3_128": bytes_checksums(data)}


def point_latest(root: Path, name: str, keep_last: int | None = None) -> None:
    """Atomically replace `latest` (temp file, rename), then apply retention. `latest` is not
    fsynced: it is a pointer for people and tools, resume=auto scans for COMPLETE folders
    instead, so after a power cut the worst case is that it still names the previous checkpoint."""
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)
    if keep_last:
        apply_retention(root, keep_last)


@dataclass
class _Job:
    """One save between taking it off the live state (_prepare) and committing it (_write)."""

    root: Path
    name: str
    tmp: Path
    step: int
    rank: int
    world: int
    keep_last: int | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # this rank's shard
    texts: dict[str, str] = field(default_factory=dict)  # rank 0: the rank-independent files
    failure: Exception | None = None
    group: Any = None  # the checksum gather's process group (None: the default one)

    @property
    def final(self) -> Path:
        return self.root / self.name


class CheckpointWriter:
    """One saver's threads, the bookkeeping it has not finished, and its cache of the index layout.

    Each CheckpointManager owns one, so two trainers in a process (a sweep) neither wait for each
    other's saves nor share a cache; the module-level save_checkpoint and flush_pending use a
    default one.
    """

    def __init__(self) -> None:
        self._writer: ThreadPoolExecutor | None = None
        self._after: ThreadPoolExecutor | None = None
        self._async: ThreadPoolExecutor | None = None  # the background save's one thread: one save in flight
        self._inflight: Future | None = None
        self._pending: list[Future] = []
        self._buffers: dict[str, torch.Tensor] = {}  # the background save's host copies, reused by the next save
        self._layout: tuple[tuple[Any, ...], str] | None = None

    def save(
        self,
        run_dir: str | os.PathLike,
        name: str,
        model_state: dict[str, torch.Tensor],
        optim_state: dict[str, Any],
        trainer_state: dict[str, Any],
        config_text: str,
        rank: int = 0,
        world: int = 1,
        keep_last: int | None = None,
        background: bool = False,
        group: Any = None,
        done: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint `name` (step_<N> or best) under <run_dir>/checkpoints; every rank calls it.

        Returns the final folder, which is COMPLETE and flushed on rank 0's return (other ranks
        return once their shard is flushed and its checksum handed to rank 0; anything that reads a
        checkpoint goes through rank 0 first). Then, on a background thread (flush waits for
        it), `latest` is pointed at it and retention (keep_last, step_* folders only) deletes older
        ones. One collective: a gather of each shard's size and checksum on rank 0. A failed write
        (disk full) raises CheckpointError on the rank it happened on and on rank 0, which removes
        the temp folder; the earlier checkpoints are untouched.

        background=True (ckpt.async_save): return once this rank's part of the state is copied to host
        memory; the write, gather and commit above, then `latest` and retention, run on one background
        thread, and `done` is called there with the final folder once it is committed. At most one
        save is in flight. `group`: the process group of the checksum gather, which must not be the
        training loop's (it runs concurrently with the loop's collectives); None for one process.
        flush waits for the write.
        """
        if background:
            self.flush()  # at most one save in flight; an earlier one's error raises here
        job = self._prepare(run_dir, name, model_state, optim_state, trainer_state, config_text, rank, world,
                            keep_last, copy=background)  # fmt: skip
        if background:
            job.group = group
            if self._async is None:
                self._async = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distrain-ckpt-async")
            self._inflight = self._async.submit(self._write_committed, job, done)
            return job.final
        final = self._write(job)
        if name.startswith("step_") and rank == 0:  # bookkeeping that nothing waits for: see flush
            self._after_commit(point_latest, job.root, name, keep_last)
        return final

    def _prepare(self, run_dir: str | os.PathLike, name: str, model_state: dict[str, torch.Tensor],
                 optim_state: dict[str, Any], trainer_state: dict[str, Any], config_text: str, rank: int,
                 world: int, keep_last: int | None, copy: bool) -> _Job:  # fmt: skip
        """What this rank writes, taken off the live state: its tensors (fresh host copies with
        `copy`, which training cannot change under a background write) and, on rank 0, the
        rank-independent files' text. A failure is kept in the job: its rank still joins the gather."""
        root = Path(run_dir) / CKPT_DIR
        job = _Job(root, name, root / f".tmp-{name}", int(trainer_state.get("step", 0)), rank, world, keep_last)
        try:
            job.tmp.mkdir(parents=True, exist_ok=True)  # may hold files of a crashed save: removed before COMPLETE
            if rank == 0:
                _clear_stale(root, keep=job.tmp)
            optim_tensors, optim_extra = flatten_optim(optim_state)
            # No RNG states: distrain.train.rng derives them from the step.
            pick = rank_pieces if copy else rank_tensors
            tensors = {f"model.{k}": v for k, v in pick(model_state, rank, world).items()}
            tensors |= {f"optim.{k}": v for k, v in pick(optim_tensors, rank, world).items()}
            job.tensors = self._stage(tensors) if copy else tensors
            if rank == 0:
                tensors_json = self._layout_json(model_state, optim_tensors, world)
                optim_json = json.dumps(optim_extra, default=json_default)
                index = (f'{{"format": "{FORMAT}", "version": {VERSION}, "world_size": {world}, '
                         f'"tensors": {tensors_json}, "optim": {optim_json}}}')  # fmt: skip
                job.texts = {STATE: json.dumps(trainer_state, indent=1, default=json_default), CONFIG: config_text,
                             INDEX: index}  # fmt: skip
        except Exception as e:  # still join the gather in _write: the other ranks wait in it
            job.failure = e
        return job

    def _stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of tensors, which the optimizer's in-place updates cannot change under a
        background write (torchtitan's staging): copied into buffers kept from the previous save,
        so a save costs a memory copy, not fresh pages (pinned for GPU tensors: one asynchronous
        copy each, one wait). The buffers are reused only after that save's write (one in flight)."""
        staged, on_gpu = {}, False
        for key, t in tensors.items():
            buf = self._buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            on_gpu |= t.device.type == "cuda"
            buf.copy_(t.detach(), non_blocking=t.device.type == "cuda")
            staged[key] = buf
        if on_gpu:
            torch.cuda.synchronize()
        self._buffers = staged  # tensors this save no longer has go: their memory is freed
        return staged

    def _write_committed(self, job: _Job, done: Callable[[Path], None] | None) -> Path:
        """A background save: the write and commit, then `latest` and retention on the same thread
        (the next save waits for this one, so they stay in order)."""
        final = self._write(job)
        if job.name.startswith("step_") and job.rank == 0:
            point_latest(job.root, job.name, job.keep_last)
        if done is not None:
            done(final)
        return final

    def _write(self, job: _Job) -> Path:
        """Write, flush and gather a prepared save; on rank 0 write COMPLETE and commit it."""
        root, tmp, final, rank, world, step = job.root, job.tmp, job.final, job.rank, job.world, job.step
        texts = job.texts
        texts_written: list[Future] = []
        checksums, size, failure = [], -1, job.failure
        try:
            fault_point("before_shards", rank, step)
            if failure is not None:
                raise failure
            shard = tmp / shard_name(rank)
            write_shard(shard, job.tensors, {"format": FORMAT})
            job.tensors = {}  # the host copies are not needed once written
            if rank == 0:  # the rank-independent files, flushed on another thread while this one flushes the shard
                texts_written = [self._in_thread(_write_recorded, tmp / n, t.encode()) for n, t in texts.items()]
            checksums = list(block_checksums(shard).values())
            size = shard.stat().st_size
            fsync_path(shard)
        except Exception as e:  # still join the gather below: the other ranks wait in it
            failure = e
        fault_point("between_shards", rank, step)
        files = _gather_files(checksums, size, rank, world, job.group)
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
        return final

    def flush(self) -> None:
        """Wait until the save in flight (save(background=True)) is committed and `latest` and retention of
        every finished save are done (errors re-raised)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()
        while self._pending:
            self._pending.pop(0).result()

    def settle(self) -> None:
        """flush for a run that is already failing: the save in flight still lands, and an error of
        the saves is logged rather than raised over the one that is ending the run."""
        try:
            self.flush()
        except Exception as e:
            log.error("the checkpoint being written in the background failed: %s", e)

    def close(self) -> None:
        """flush, then end the threads (a later save starts new ones); errors of the bookkeeping re-raised."""
        try:
            self.flush()
        finally:
            for pool in (self._async, self._writer, self._after):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._async = self._writer = self._after = None
            self._inflight = None

    def _in_thread(self, fn: Any, *args: Any) -> Future:
        """Run fn on a background writer thread (file writes release the GIL, and concurrent fsyncs
        share a journal commit), returning its future. The threads are kept until close: starting
        one per save would cost more than the small files it writes."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="distrain-ckpt")
        return self._writer.submit(fn, *args)

    def _after_commit(self, fn: Any, *args: Any) -> None:
        """Run fn after the save returns, in order, on one thread: pointing `latest` at a committed
        checkpoint and deleting older ones (which can take long for big ones) need not hold up
        training. The interpreter waits for it at exit; flush waits for it now."""
        if self._after is None:
            self._after = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distrain-ckpt-after")
        for done in [f for f in self._pending if f.done()]:
            self._pending.remove(done)
            done.result()  # an earlier one that failed raises here, at the next save, not never
        self._pending.append(self._after.submit(fn, *args))

    def _layout_json(self, model_state: dict[str, torch.Tensor], optim_tensors: dict[str, torch.Tensor],
                     world: int) -> str:  # fmt: skip
        """index.json's "tensors": the piece map of every rank (layout.layout), as JSON.

        Cached: it depends only on names, shapes, dtypes and shard geometry, which do not change
        between the saves of a run, and checking that signature is much cheaper than building and
        encoding the map on rank 0's critical path.
        """
        signature = (world, *((k, v.shape, v.dtype, placement(v))
                              for part in (model_state, optim_tensors) for k, v in part.items()))  # fmt: skip
        if self._layout is None or self._layout[0] != signature:
            tensors = {**{f"model.{k}": v for k, v in layout(model_state, world, shard_name).items()},
                       **{f"optim.{k}": v for k, v in layout(optim_tensors, world, shard_name).items()}}  # fmt: skip
            self._layout = (signature, json.dumps(tensors))
        return self._layout[1]


_DEFAULT = CheckpointWriter()  # for callers without a CheckpointManager (tools, tests, benchmarks)


# For callers without a CheckpointManager: the default writer's save, and the wait for its bookkeeping.
save_checkpoint = _DEFAULT.save
flush_pending = _DEFAULT.flush


def _save_error(final: Path, error: Exception) -> Exception:
    """A failed save as one line naming the checkpoint and the OS error (disk full, ...); other
    exceptions (bugs) unchanged."""
    if isinstance(error, OSError):
        return CheckpointError(f"cannot write checkpoint {final}: {error}; the earlier checkpoints are kept")
    return error


def _gather_files(checksums: list[str], size: int, rank: int, world: int,
                  group: Any = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Rank 0 collects every shard's size and block checksums, as int64s in one gather (no
    pickling, fixed size: BLOCKS checksums a file) over `group` (a CPU group: its tensors stay on
    the CPU), else the default group. Size -1: that rank could not write its shard (no
    checksums). Other ranks get {}."""
    words = [size]
    for c in checksums or ["0"] * BLOCKS:
        value = int(c, 16)
        words += [signed64(value >> 64), signed64(value & 0xFFFFFFFFFFFFFFFF)]
    mine = torch.tensor(words, dtype=torch.int64)
    rows = [mine]
    if is_dist():
        if group is None:
            mine = mine.to(collective_device())
        rows = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
        dist.gather(mine, rows, dst=0, group=group)
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
