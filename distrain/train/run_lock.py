"""One training per run dir: rank 0 holds `<run dir>/.lock` for as long as its process trains there.

The lock is an OS lock (flock) on an open file descriptor, so the kernel frees it when the
holder dies however it dies (SIGKILL, os._exit, a lost node); the file also holds a JSON
record {host, pid, started, command, slurm_job} that names the holder in the refusal. A lock
file left by a dead process is taken over. Where flock is not supported (some NFS or Lustre
mounts) the record alone decides: a live PID on this host, or any PID on another host (which
cannot be checked from here) unless it is an earlier start of this same Slurm job, holds it.

    lock = run_lock.take(run_dir, cfg.resume)   # lock, then refuse a fresh run over a finished one
    ...
    lock.release()                              # also done at interpreter exit

Refusals raise RunDirBusy / ConfigError (exit 2, one line) and leave the folder as it was.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distrain.errors import ConfigError, RunDirBusy

LOCK_NAME = ".lock"
# errno values meaning "this file system does not do flock": fall back to the record
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
# errno values meaning "someone else holds it"
_HELD = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
# What a fresh run (no resume=) must not overwrite
FINISHED_FILES = ("model.safetensors", "best_model.safetensors", "summary.json")


@dataclass
class _Held:
    """The lock this process holds on one run dir; every handle to it shares this."""

    path: Path
    fd: int | None  # None: held by record only (no flock on this file system)
    pid: int
    record: dict[str, Any]
    created: list[Path]  # folders acquire() created, deepest last, removed again on release if still empty
    handles: int = 1


@dataclass
class RunLock:
    """A handle on the lock of one run dir; release() once (more calls do nothing)."""

    path: Path
    record: dict[str, Any]
    took_over: dict[str, Any] | None = None  # the record of a dead holder whose lock this replaced
    _held: _Held | None = field(default=None, repr=False)

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            _drop(held)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_registry: dict[Path, _Held] = {}
_registry_mutex = threading.Lock()


def my_record() -> dict[str, Any]:
    """What this process writes into the lock file."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv)[:2000],
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Lock `run_dir` (created if missing) for this process, or raise RunDirBusy naming the holder.

    Re-entrant within a process (in-process trainers of one run dir, e.g. a train and its resume,
    share the lock); the OS lock goes when the last handle is released or the process exits.
    """
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    with _registry_mutex:
        held = _registry.get(key)
        if held is not None and held.pid == os.getpid() and _still_ours(held):
            held.handles += 1
            return RunLock(held.path, held.record, None, held)
        if held is not None:  # a fork's copy, or the folder was removed and made again
            _registry.pop(key)
        held, previous = _lock(run_dir)
        _registry[key] = held
    return RunLock(held.path, held.record, previous, held)


def take(run_dir: str | os.PathLike, resume: str | None) -> RunLock:
    """acquire(), then check_fresh_run_dir() under the lock (so a run finishing meanwhile counts);
    on a refusal the lock is released and the folder left as it was."""
    lock = acquire(run_dir)
    try:
        check_fresh_run_dir(run_dir, continues(run_dir, resume))
    except ConfigError:
        lock.release()
        raise
    return lock


def continues(run_dir: str | os.PathLike, resume: str | None) -> bool:
    """Whether `resume=` continues the run in `run_dir` (auto, or one of its own checkpoints)."""
    if not resume:
        return False
    if resume == "auto":
        return True
    return Path(resume).resolve().is_relative_to(Path(run_dir).resolve())


def check_fresh_run_dir(run_dir: str | os.PathLike, resuming: bool) -> None:
    """Refuse to start a run over another one's checkpoints or finished weights (ConfigError).

    Writes nothing. `resuming`: the run continues the one in `run_dir` (resume=auto or a
    checkpoint of that folder), so what is there is its own.
    """
    if resuming:
        return
    run_dir = Path(run_dir)
    found = [name for name in FINISHED_FILES if (run_dir / name).exists()]
    ckpts = run_dir / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step_*") if p.is_dir()) if ckpts.is_dir() else []
    if steps:
        found.insert(0, f"checkpoints/{steps[-1]}" + (f" and {len(steps) - 1} more" if len(steps) > 1 else ""))
    if (ckpts / "best").is_dir():
        found.append("checkpoints/best")
    if found:
        raise ConfigError(
            f"output_dir={run_dir} already holds a run ({', '.join(found)}); continue it with resume=auto "
            f"or choose another output_dir"
        )


def describe_holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "a process that has not written its record yet"
    parts = [f"host {record.get('host', '?')}", f"PID {record.get('pid', '?')}"]
    if record.get("slurm_job"):
        parts.append(f"Slurm job {record['slurm_job']}")
    if record.get("started"):
        parts.append(f"started {record['started']}")
    return ", ".join(parts)


# ---------------------------------------------------------------- internals


def _lock(run_dir: Path) -> tuple[_Held, dict[str, Any] | None]:
    created = _make_dirs(run_dir)
    path = run_dir / LOCK_NAME
    try:
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:  # a read-only folder, or one of another user
                raise ConfigError(f"output_dir={run_dir} is not writable: {path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in _HELD:
                    raise RunDirBusy(_busy_message(run_dir, _read_record(path, wait=True))) from None
                if e.errno in _NO_FLOCK:
                    return _lock_by_record(run_dir, created)
                raise ConfigError(f"cannot lock {path}: {e.strerror}") from None
            if not _same_file(fd, path):  # a releasing holder unlinked it between our open and flock
                os.close(fd)
                continue
            previous = _read_fd(fd)
            record = my_record()
            _write_fd(fd, record)
            return _Held(path, fd, os.getpid(), record, created), _stale(previous)
        raise RunDirBusy(f"output_dir={run_dir}: its lock file {path} keeps being replaced; another run is starting")
    except BaseException:
        _remove_empty(created)
        raise


def _lock_by_record(run_dir: Path, created: list[Path]) -> tuple[_Held, dict[str, Any] | None]:
    """No flock here: the record is the lock, created with an atomic link (safe on NFS too)."""
    path = run_dir / LOCK_NAME
    record = my_record()
    tmp = run_dir / f".lock-{record['host']}-{record['pid']}"
    tmp.write_text(json.dumps(record))
    previous: dict[str, Any] | None = None
    try:
        for _ in range(20):
            try:
                os.link(tmp, path)
                return _Held(path, None, os.getpid(), record, created), _stale(previous)
            except FileExistsError:
                pass
            current = _read_record(path, wait=True)
            if _alive(current):
                raise RunDirBusy(_busy_message(run_dir, current, checkable=_checkable(current)))
            # Dead (or our own earlier start): move it aside, and put it back if it changed meanwhile.
            aside = run_dir / f".lock-stale-{record['pid']}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = _read_record(aside)
            if moved != current:
                with contextlib.suppress(OSError):
                    os.link(aside, path)
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            previous = current
        raise RunDirBusy(f"output_dir={run_dir}: its lock file {path} keeps being replaced; another run is starting")
    finally:
        tmp.unlink(missing_ok=True)


def _alive(record: dict[str, Any] | None) -> bool:
    """Whether the record's process may still hold the run dir (without flock to ask the kernel)."""
    if not record:
        return True  # being written right now
    if record.get("host") == socket.gethostname():
        return record.get("pid") != os.getpid() and _pid_alive(record)  # our own pid: an earlier handle
    # Another host cannot be checked from here; only an earlier start of this same Slurm job
    # (a requeue, possibly on another node) is known to be gone.
    job = record.get("slurm_job")
    return not (job and job == os.environ.get("SLURM_JOB_ID"))


def _checkable(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("host") == socket.gethostname()


def _pid_alive(record: dict[str, Any]) -> bool:
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return int(record.get("pid", 0)) > 0


def _stale(previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """The replaced record, unless it was this process's own."""
    if not previous or (previous.get("pid") == os.getpid() and previous.get("host") == socket.gethostname()):
        return None
    return previous


def _busy_message(run_dir: Path, record: dict[str, Any] | None, checkable: bool = True) -> str:
    hint = "wait for it to end or choose another output_dir"
    if not checkable:
        hint += f"; if that process is gone (this host cannot check), delete {run_dir / LOCK_NAME}"
    return f"output_dir={run_dir} is in use by another training ({describe_holder(record)}); {hint}"


def _still_ours(held: _Held) -> bool:
    if held.fd is None:
        return _read_record(held.path) == held.record
    return _same_file(held.fd, held.path)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return _parse(b"".join(chunks))


def _write_fd(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)  # no fsync: the kernel's lock is what counts, the record only names the holder


def _read_record(path: Path, wait: bool = False) -> dict[str, Any] | None:
    """The lock file's record; with `wait`, give a holder that just locked it a moment to write it."""
    for _ in range(20 if wait else 1):
        try:
            record = _parse(path.read_bytes())
        except OSError:
            record = None
        if record is not None or not wait:
            return record
        time.sleep(0.05)
    return None


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _make_dirs(run_dir: Path) -> list[Path]:
    """Create run_dir and its missing parents; the ones created, outermost first."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir={run_dir} is a file; give a folder")
    missing = []
    p = run_dir
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(list(reversed(missing)))
        raise ConfigError(f"output_dir={run_dir} cannot be created: {e.strerror or e}") from None
    return list(reversed(missing))


def _remove_empty(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def _drop(held: _Held) -> None:
    with _registry_mutex:
        held.handles -= 1
        if held.handles > 0:
            return
        if held.pid != os.getpid():  # a forked child: the lock is its parent's
            return
        key = next((k for k, v in _registry.items() if v is held), None)
        if key is not None:
            _registry.pop(key)
        if held.fd is not None:
            # Unlink while still holding the lock; acquire() re-checks the inode after locking.
            if _same_file(held.fd, held.path):
                held.path.unlink(missing_ok=True)
            os.close(held.fd)
        elif _read_record(held.path) == held.record:
            held.path.unlink(missing_ok=True)
        _remove_empty(held.created)


@atexit.register
def _release_all() -> None:
    for held in list(_registry.values()):
        held.handles = 1
        _drop(held)
