"""One training per run dir (distrain/run_lock.py): the lock, stale locks, no flock, fresh runs.

The module tests run in this process plus small lock-holding processes (no torch import, so
each starts in a fraction of a second). The END-TO-END tests at the bottom (test_e2e_*) start
real trainings with `python distrain/run.py`; they need Trainer to take the lock (rank 0, right
after choosing the run dir, via run_lock.take) and fail until that wiring is in.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distrain import checkpoint
from distrain.errors import ConfigError, RunDirBusy
from distrain.train import run_lock

from helpers import REPO, RUN_PY, TINY_HAR, metrics_rows, run_distrain

HOST = socket.gethostname()

# A process that takes the lock and holds it until its stdin closes (or exits at once without
# releasing, like a killed one). distrain's package __init__ imports torch: bypass it.
HOLDER = textwrap.dedent(f"""
    import os, sys, types
    pkg = types.ModuleType("distrain"); pkg.__path__ = [{str(REPO / "distrain")!r}]; sys.modules["distrain"] = pkg
    from distrain.train import run_lock
    try:
        lock = run_lock.acquire(sys.argv[1])
    except run_lock.RunDirBusy as e:
        print("busy", e, flush=True)
        sys.exit(2)
    print("locked", flush=True)
    if sys.argv[2] == "die":
        os._exit(0)  # no release, no atexit: what SIGKILL or a lost node leaves
    sys.stdin.read()
""")


def _holder(run_dir: Path, mode: str = "hold") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root: (mtime_ns, sha256), to show that nothing changed."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _no_flock(monkeypatch) -> None:
    def flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- the lock


def test_lock_names_its_holder_and_release_leaves_nothing(tmp_path):
    run = tmp_path / "runs" / "a"
    lock = run_lock.acquire(run)
    record = json.loads((run / ".lock").read_text())
    assert record["host"] == HOST and record["pid"] == os.getpid() and record["started"] and record["command"]
    again = run_lock.acquire(run)  # in-process trainers of one run dir (a train and its resume) share it
    lock.release()
    assert (run / ".lock").is_file()
    again.release()
    again.release()  # idempotent
    assert not (tmp_path / "runs").exists(), "the folders acquire() created and nothing filled are removed"


def test_second_process_is_refused_with_the_holders_host_and_pid(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        before = _tree(run)
        with pytest.raises(RunDirBusy) as e:
            run_lock.acquire(run)
        msg = str(e.value)
        assert "\n" not in msg and f"host {HOST}" in msg and f"PID {holder.pid}" in msg and f"output_dir={run}" in msg
        assert _tree(run) == before, "the refused process changed the folder"
        # and a third process too (the lock is the kernel's, not this process's bookkeeping)
        other = subprocess.run([sys.executable, "-c", HOLDER, str(run), "hold"], capture_output=True, text=True,
                               timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
        assert other.returncode == 2 and f"PID {holder.pid}" in other.stdout
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (run / ".lock").exists()  # released at exit
    run_lock.acquire(run).release()


def test_a_dead_processes_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    dead = _holder(run, "die")
    dead.wait(timeout=60)
    assert json.loads((run / ".lock").read_text())["pid"] == dead.pid  # left behind, but the flock is gone
    lock = run_lock.acquire(run)
    try:
        assert lock.took_over is not None and lock.took_over["pid"] == dead.pid
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_processes_racing_for_one_folder_one_wins(tmp_path):
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "hold"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
    first = [p.stdout.readline().split()[0] for p in procs]  # type: ignore[union-attr]
    for p in procs:
        p.communicate("")
    assert sorted(first) == ["busy", "busy", "locked"], first


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    """File systems without flock (some NFS/Lustre mounts): a live PID here, or another host, holds."""
    _no_flock(monkeypatch)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    lock_file = run / ".lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file.write_text(json.dumps({"host": HOST, "pid": sleeper.pid, "started": "then"}))
        with pytest.raises(RunDirBusy, match=f"PID {sleeper.pid}"):
            run_lock.acquire(run)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in run.iterdir()) == [".lock"]

    other = {"host": "node-b", "pid": 1234, "started": "then", "slurm_job": "77"}
    lock_file.write_text(json.dumps(other))
    with pytest.raises(RunDirBusy) as e:
        run_lock.acquire(run)
    assert "host node-b" in str(e.value) and f"delete {lock_file}" in str(e.value) and "\n" not in str(e.value)

    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same Slurm job, requeued onto this node: its old start is gone
    lock = run_lock.acquire(run)
    assert lock.took_over == other and json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()

    monkeypatch.delenv("SLURM_JOB_ID")
    lock_file.write_text(json.dumps({"host": HOST, "pid": _dead_pid(), "started": "then"}))
    with run_lock.acquire(run) as lock:
        assert lock.took_over is not None
        with pytest.raises(RunDirBusy):  # another process sees this one's record: alive
            _other_process_acquires(run, monkeypatch)
    assert sorted(p.name for p in run.iterdir()) == []


def _other_process_acquires(run: Path, monkeypatch) -> None:
    """acquire() as if from another process: the record, not this process's registry, decides."""
    pid = os.getpid() + 100000
    with monkeypatch.context() as m:
        m.setattr(run_lock, "_registry", {})
        m.setattr(os, "getpid", lambda: pid)
        run_lock.acquire(run)


def test_a_file_or_read_only_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run_lock.acquire(tmp_path / "file")
    with pytest.raises(ConfigError, match="cannot be created"):
        run_lock.acquire(tmp_path / "file" / "run")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="not writable"):
            run_lock.acquire(ro)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", *(["ro"] if os.geteuid() != 0 else [])]


# ---------------------------------------------------------------- fresh runs


@pytest.mark.parametrize("existing", ["checkpoints/step_00000010/", "checkpoints/best/", "model.safetensors",
                                      "summary.json"])  # fmt: skip
def test_a_fresh_run_over_a_finished_one_is_refused(tmp_path, existing):
    run = tmp_path / "run"
    (run / existing).parent.mkdir(parents=True, exist_ok=True)
    if existing.endswith("/"):
        (run / existing).mkdir()
        (run / existing / "COMPLETE").write_text("")
    else:
        (run / existing).write_text("x")
    before = _tree(run)
    for resume in (None, str(tmp_path / "elsewhere" / "checkpoints" / "step_00000005")):
        with pytest.raises(ConfigError) as e:
            run_lock.take(run, resume)
        msg = str(e.value)
        assert "\n" not in msg and f"output_dir={run}" in msg and existing.rstrip("/") in msg and "resume=auto" in msg
        assert _tree(run) == before and not (run / ".lock").exists()
    for resume in ("auto", str(run / "checkpoints" / "step_00000010")):  # continuing this folder's run
        run_lock.take(run, resume).release()
    run_lock.check_fresh_run_dir(run, resuming=True)


def test_a_fresh_run_may_use_an_empty_or_unfinished_folder(tmp_path):
    run = tmp_path / "run"
    run_lock.check_fresh_run_dir(run, resuming=False)  # missing
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: har\n")
    run_lock.take(run, None).release()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


# ---------------------------------------------------------------- END-TO-END (needs the Trainer wiring)

E2E = [*TINY_HAR, "sched.name=constant", "sched.warmup_ratio=0", "ckpt.every_steps=5"]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    return lines[0]


def test_e2e_one_run_per_folder(tmp_path):
    """A training holds its folder: a second fresh or resumed run on it exits 2 naming the holder;
    after a SIGKILL the stale lock is taken over by resume=auto, with no interleaved rows and no
    lost checkpoint; a fresh run into the finished folder exits 2 and changes nothing."""
    run = tmp_path / "run"
    cmd = [sys.executable, str(RUN_PY), *E2E, "train.max_steps=1000000", f"output_dir={run}"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not (run / "checkpoints" / "latest").is_file():
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.05)
        # A short max_steps: without the lock these would finish in seconds instead of hanging the test.
        others = [subprocess.Popen([sys.executable, str(RUN_PY), *E2E, "train.max_steps=3", f"output_dir={run}",
                                    *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for extra in ([], ["resume=auto"])]  # fmt: skip
        try:
            for proc in others:
                out, err = proc.communicate(timeout=300)
                line = _one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
                assert f"PID {first.pid}" in line and HOST in line and f"output_dir={run}" in line, line
        finally:
            for proc in others:
                proc.kill()
                proc.communicate()
        assert first.poll() is None, "the first run died while others were refused"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    stopped = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert json.loads((run / ".lock").read_text())["pid"] == first.pid  # SIGKILL: the file stays, the flock goes
    checkpoint.verify(run / "checkpoints" / checkpoint.step_name(stopped))  # the refused runs touched no checkpoint

    run_distrain([*E2E, f"train.max_steps={stopped + 7}", f"output_dir={run}", "resume=auto"])
    steps = [r["step"] for r in metrics_rows(run) if "loss" in r]
    assert steps == list(range(1, stopped + 8)), "rows interleaved or repeated"
    assert not (run / ".lock").exists(), "the lock is released when the run ends"

    before = _tree(run)
    proc = run_distrain([*E2E, "train.max_steps=3", f"output_dir={run}"], check=False)
    line = _one_error_line(proc)
    assert f"output_dir={run}" in line and "resume=auto" in line, line
    assert _tree(run) == before, "the refused fresh run changed the finished run's folder"
