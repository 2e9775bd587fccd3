"""Crash injection for real distrain runs, shared by tests/test_resume_exact.py and
benchmarks/crash_resume.py.

A chain runs one configuration in one run dir as a series of segments: each segment is
`distrain/run.py ... resume=auto` with the same output_dir, ended by a kill point, until a
segment finishes. Kill points:

- sigkill: SIGKILL after the segment has written `rows` training rows and `delay` seconds more
  (between steps, inside a step, or inside a save, by chance); target "all" kills the launcher
  and every rank at once (a lost node), "rank0"/"rank1" one training process (the launcher
  then stops the other);
- crash: DISTRAIN_CRASH_AT=<stage>:<step> SIGKILLs rank 0 at that stage of the segment's
  `nth` periodic save (a best/ save at the same step comes first and is the one killed);
- sigterm/sigusr1: shorthand for a "signal" kill of SIGTERM/SIGUSR1 to every training process
  after `rows` rows (see Kill): exit 143/138, a checkpoint at the step where it stopped, the
  next segment resumes there.

Every segment's rows (training: loss, grad norm, lr; evaluation: every val/ value) must equal
the uninterrupted reference run's rows of the same steps bitwise, and the segment must start
from the newest checkpoint an earlier segment logged as saved (else a checkpoint was lost).
At the end of a chain, metrics.jsonl holds each step once (rows superseded by a resume moved
aside), and summary.json's test metrics and best step, model.safetensors and
best_model.safetensors equal the reference's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RUN_PY = REPO / "distrain" / "run.py"
BIN = Path(sys.executable).parent
CRASH_ENV = "DISTRAIN_CRASH_AT"
CRASH_STAGES = ("before_shards", "between_shards", "before_complete", "before_latest")

# har's defaults (dropout 0.1, AdamW 2e-3, cosine with warmup, clipping 1.0) on a tiny model:
# 19 steps per epoch at a global batch of 128, so a 24-step run crosses an epoch end (with its
# evaluation at step 19), evaluates every 4 steps (best/ saves) and saves every 3.
STEPS, EVERY = 24, 3
BASE = ("recipe=har", "model.width=16", "model.depth=1", "model.heads=2", "log.every=1", "log.progress=false",
        f"train.max_steps={STEPS}", "train.eval_every=4", f"ckpt.every_steps={EVERY}")  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Setup:
    name: str
    launch: str | None  # launch_configs/<launch>.yaml, None: one process
    args: tuple[str, ...]
    launcher: str = "accelerate"  # "torchrun" (2 processes, the launch config's backend as parallel.backend),
    # or "distrain"

    @property
    def steps(self) -> int:
        """train.max_steps of the run (the last one given wins, as on distrain's command line)."""
        return [int(a.split("=")[1]) for a in self.args if a.startswith("train.max_steps=")][-1]

    @property
    def eval_every(self) -> int:
        return [int(a.split("=")[1]) for a in self.args if a.startswith("train.eval_every=")][-1]


SETUPS = {
    "single": Setup("single", None, (*BASE, "data.batch_size=128")),
    "ddp": Setup("ddp", "cpu_ddp", BASE),  # 2 ranks x 64
    "fsdp2": Setup("fsdp2", "cpu_fsdp", BASE),
}


def constant_lr(setup: Setup, steps: int | None = None) -> Setup:
    """The setup with a constant schedule, whose lr at a step does not depend on max_steps, so a
    run stopped by max_steps and continued with a larger one can equal a straight run."""
    more = ("sched.name=constant", *((f"train.max_steps={steps}",) if steps else ()))
    return replace(setup, args=(*setup.args, *more))


def under(launcher: str, setup: Setup) -> Setup:
    """The setup started by `torchrun --nproc_per_node 2` or `distrain launch` instead of `accelerate launch`."""
    return replace(setup, name=f"{setup.name}-{launcher}", launcher=launcher)


@dataclass
class Kill:
    """kind sigkill | crash | signal (sigterm / sigusr1: to the workers). A "signal" sends `sig` to `target`:
    "launcher", its process "group" (what a terminal's Ctrl-C reaches), "workers" (every training
    process), "rank1", or "all" (the launcher and every worker: a signal echoed by the launcher);
    after `rows` rows, or with a `stage` ("eval" or a save stage) from inside rank 0 at the
    `nth` evaluation or save of the segment (DISTRAIN_CRASH_AT, target launcher or self)."""

    kind: str
    rows: int = 1
    delay: float = 0.0
    target: str = "all"
    stage: str = ""
    nth: int = 1
    sig: str = ""

    def __post_init__(self) -> None:
        if self.kind in ("sigterm", "sigusr1"):
            self.kind, self.sig, self.target = "signal", self.kind.upper(), "workers"

    def __str__(self) -> str:
        if self.kind == "crash":
            return f"crash {self.stage} at save #{self.nth}"
        if self.kind == "sigkill":
            return f"sigkill {self.target} after {self.rows} rows +{self.delay * 1000:.0f} ms"
        if self.kind == "signal":
            when = f"inside {self.stage} #{self.nth}" if self.stage else f"after {self.rows} rows"
            return f"{self.sig} to {self.target} {when}"
        return f"{self.kind} after {self.rows} rows"


def random_kills(rng: random.Random, n: int, multi: bool) -> list[Kill]:
    """n kill points, half SIGKILLs at random moments, half crashes inside saves."""
    kills = []
    for _ in range(n):
        if rng.random() < 0.5:
            target = rng.choice(["all", "all", "rank0", "rank1"]) if multi else "all"
            kills.append(Kill("sigkill", rows=rng.randint(1, 5), delay=rng.uniform(0, 0.08), target=target))
        else:
            kills.append(Kill("crash", stage=rng.choice(CRASH_STAGES), nth=rng.randint(1, 2)))
    return kills


# ----------------------------------------------------------------- running


def command(setup: Setup, args: list[str], port: int) -> list[str]:
    if setup.launch is None:
        return [sys.executable, str(RUN_PY), *args]
    if setup.launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), str(RUN_PY), *args]
    if setup.launcher == "distrain":
        return [str(BIN / "distrain"), "launch", "--config_file", str(REPO / "launch_configs" / f"{setup.launch}.yaml"),
                "--main_process_port", str(port), *args]  # fmt: skip
    return [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch_configs" / f"{setup.launch}.yaml"),
            "--main_process_port", str(port), str(RUN_PY), *args]  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def parse(lines: list[str]) -> tuple[list[dict[str, Any]], int]:
    """Rows of metrics.jsonl lines, and how many lines were torn (a killed writer's last line)."""
    rows, torn = [], 0
    for line in lines:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return rows, torn


def key_of(row: dict[str, Any]) -> tuple[str, int] | None:
    if "event" in row:
        return None
    return ("train" if "loss" in row else "eval", row["step"])


def compared(row: dict[str, Any]) -> dict[str, Any]:
    """The deterministic fields of a row (no timings)."""
    if "loss" in row:
        return {k: row.get(k) for k in ("step", "epoch", "loss", "lr", "grad_norm", "skipped_steps")}
    return {k: v for k, v in row.items() if k in ("step", "epoch") or k.startswith("val/")}


def same(a: Any, b: Any) -> bool:
    """Bitwise equality of JSON values, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def newest_complete(run_dir: Path) -> int:
    """Step of the newest step_* checkpoint with COMPLETE (what resume=auto should pick), or 0."""
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*")
             if p.name[5:].isdigit() and (p / "COMPLETE").is_file()]  # fmt: skip
    return max(steps, default=0)


def workers(pid: int) -> dict[int, int]:
    """{local rank: pid} of the training processes under a launcher."""
    import psutil

    out = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            rank = child.environ().get("LOCAL_RANK")
        except (psutil.Error, OSError):
            continue
        if rank is not None:
            out[int(rank)] = child.pid
    return out


@dataclass
class Segment:
    kill: Kill | None
    start: int  # the step it resumed from (0: from scratch)
    rc: int | None  # None: hung, killed by the harness
    rows: list[dict[str, Any]]
    torn: int
    saved: list[int]  # step checkpoints its rank 0 logged as saved
    interrupted_at: int | None  # the step a signal stopped it at (train.log)
    signal_rc: int | None  # exit code the signalled ranks reported
    left_tmp: bool  # it left a .tmp-* save folder new or changed (the kill landed inside a save)
    crash_step: int | None
    wall: float
    output: str = ""
    left_behind: int = 0  # processes of the run still alive when it was over (for signals: a leak)


def run_segment(setup: Setup, run_dir: Path, kill: Kill | None, extra: tuple[str, ...] = (),
                timeout: float = 300) -> Segment:  # fmt: skip
    """One `run.py ... resume=auto` in run_dir, ended by `kill` (None: let it run to its end)."""
    metrics, log = run_dir / "metrics.jsonl", run_dir / "train.log"
    n_lines, n_events = len(read_lines(metrics)), sum('"event"' in x for x in read_lines(metrics))
    n_log = len(read_lines(log))
    tmp_before = _tmp_dirs(run_dir)
    # torch elastic's own defaults (what accelerate launch and torchrun do unless told otherwise)
    env = {k: v for k, v in {**os.environ, **ENV}.items() if not k.startswith(("PET_", "TORCH_ELASTIC_"))}
    crash_step = None
    predicted = newest_complete(run_dir)
    if kill is not None and kill.kind == "crash":
        crash_step = min((predicted // EVERY + kill.nth) * EVERY, setup.steps)
        env[CRASH_ENV] = f"{kill.stage}:{crash_step}"
    if kill is not None and kill.kind == "signal" and kill.stage:
        every = setup.eval_every if kill.stage == "eval" else EVERY
        crash_step = min((predicted // every + kill.nth) * every, setup.steps)
        to = "launcher" if setup.launch is not None and kill.target in ("launcher", "group", "all") else "self"
        env[CRASH_ENV] = f"{kill.stage}:{crash_step}:{kill.sig}:{to}"
    args = [*setup.args, *extra, f"output_dir={run_dir}", "resume=auto"]
    if setup.launcher == "torchrun" and setup.launch == "cpu_fsdp":
        args.append("parallel.backend=fsdp2")  # torchrun has no launch config: distrain's config asks
    out_path = run_dir.parent / f"{run_dir.name}.out"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out_path, "a") as out:
        out.write(f"\n=== segment: {kill} (predicted start {predicted})\n")
        out.flush()
        proc = subprocess.Popen(command(setup, args, free_port()), cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        procs = Procs(proc)
        try:
            if kill is not None and kill.kind != "crash" and not (kill.kind == "signal" and kill.stage):
                _wait_rows(procs, metrics, n_lines, n_events, kill.rows, t0 + timeout)
                if proc.poll() is None:
                    time.sleep(kill.delay)
                    procs.scan()
                    _deliver(procs, setup, kill)
            while proc.poll() is None and time.perf_counter() < t0 + timeout:
                procs.scan(every=0.5)
                time.sleep(0.05)
            rc = proc.poll()  # None: hung
            if kill is not None and kill.kind == "signal":  # the workers outlive a launcher that died
                while procs.alive() and time.perf_counter() < t0 + timeout:
                    time.sleep(0.05)
            left_behind = len(procs.alive())
        finally:
            _kill_all(procs)
    lines = read_lines(metrics)
    events = sum('"event"' in x for x in lines)
    if events > n_events:  # resumed from a checkpoint: its rows follow its resume event
        last = max(i for i, x in enumerate(lines) if '"event"' in x)
        mine = lines[last + 1 :]
    else:
        mine = lines[n_lines:]
    rows, torn = parse(mine)
    new_log = "\n".join(read_lines(log)[n_log:])
    resumed = re.search(r"\[rank 0\] resumed from \S+ at step (\d+)", new_log)
    start = int(resumed.group(1)) if resumed else 0
    saved = [int(m) for m in re.findall(r"\[rank 0\] checkpoint saved: \S*step_(\d+)", new_log)]
    stop = re.search(r"\[rank 0\] interrupted at step (\d+): saving a checkpoint and exiting with (\d+)", new_log)
    output = out_path.read_text()[-6000:]
    return Segment(kill=kill, start=start, rc=rc, rows=rows, torn=torn, saved=saved,
                   interrupted_at=int(stop.group(1)) if stop else None,
                   signal_rc=int(stop.group(2)) if stop else None,
                   left_tmp=any(tmp_before.get(k) != v for k, v in _tmp_dirs(run_dir).items()), crash_step=crash_step,
                   wall=time.perf_counter() - t0, output=output, left_behind=left_behind)  # fmt: skip


def _tmp_dirs(run_dir: Path) -> dict[str, int]:
    """Unfinished save folders and their mtimes: one new or changed after a kill was being written."""
    out = {}
    for p in (run_dir / "checkpoints").glob(".tmp-*"):
        with contextlib.suppress(OSError):
            out[p.name] = p.stat().st_mtime_ns
    return out


class Procs:
    """Every process of a run seen alive, so that none outlives its segment."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.seen: list[Any] = []  # psutil.Process objects
        self.last = 0.0

    def alive(self) -> list[Any]:
        import psutil

        out = []
        for p in self.seen:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        return out

    def scan(self, every: float = 0.0) -> None:
        """Add the launcher's descendants; with `every`, at most that often (a scan of /proc costs
        ~3 ms, which polling every few ms must not spend on a 2-core machine)."""
        import psutil

        now = time.perf_counter()
        if now - self.last < every:
            return
        self.last = now
        with contextlib.suppress(psutil.Error):
            known = {p.pid for p in self.seen}
            self.seen += [c for c in psutil.Process(self.proc.pid).children(recursive=True) if c.pid not in known]


def _kill_all(procs: Procs) -> None:
    """SIGKILL the launcher, its process group and every process of the run seen alive (the
    launcher starts the ranks in sessions of their own, so killing its group misses them)."""
    import psutil

    if procs.proc.poll() is None:
        procs.scan()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(procs.proc.pid, signal.SIGKILL)
    for p in procs.seen:
        with contextlib.suppress(psutil.Error):
            if p.is_running():  # compares the start time too: never a recycled pid
                p.kill()
    procs.proc.wait()


def _wait_rows(procs: Procs, metrics: Path, n_lines: int, n_events: int, rows: int, deadline: float) -> None:
    """Until the segment has written `rows` training rows (or ended)."""
    while procs.proc.poll() is None and time.perf_counter() < deadline:
        procs.scan(every=0.5)
        lines = read_lines(metrics)
        events = [i for i, x in enumerate(lines) if '"event"' in x]
        mine = lines[events[-1] + 1 :] if len(events) > n_events else lines[n_lines:]
        if sum('"loss"' in x for x in mine) >= rows:
            return
        time.sleep(0.002)


def _deliver(procs: Procs, setup: Setup, kill: Kill) -> None:
    proc = procs.proc
    ranks = workers(proc.pid) if setup.launch is not None else {0: proc.pid}
    try:
        if kill.kind == "signal":
            sig = signal.Signals[kill.sig]
            if kill.target in ("group", "all"):
                os.killpg(proc.pid, sig)  # the launcher started this session: it leads the group
            if kill.target == "launcher":
                os.kill(proc.pid, sig)
            if kill.target == "workers" or (kill.target == "all" and setup.launch is not None):
                for pid in ranks.values():
                    os.kill(pid, sig)
            if kill.target == "rank1":
                os.kill(ranks[1], sig)
        elif kill.target == "all":
            _kill_all(procs)
        else:
            os.kill(ranks[int(kill.target[-1])], signal.SIGKILL)
    except (ProcessLookupError, KeyError):
        pass  # it ended in the meantime


# ----------------------------------------------------------------- checking


@dataclass
class Reference:
    rows: dict[tuple[str, int], dict[str, Any]]
    summary: dict[str, Any]
    weights: dict[str, Any]  # file name -> {tensor name: tensor}, for the files the run wrote


def weight_files(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {n: load_file(str(run_dir / n)) for n in ("model.safetensors", "best_model.safetensors")
            if (run_dir / n).is_file()}  # fmt: skip


SUMMARY_KEYS = ("steps", "epochs_completed", "best_step", "best_epoch", "best_metric", "test", "stopped_early",
                "skipped_steps")  # fmt: skip


def reference(setup: Setup, run_dir: Path) -> Reference:
    seg = run_segment(setup, run_dir, None)
    if seg.rc != 0:
        raise AssertionError(f"reference run of {setup.name} exited {seg.rc}\n{seg.output}")
    rows, _ = parse(read_lines(run_dir / "metrics.jsonl"))
    keyed = {key_of(r): compared(r) for r in rows if key_of(r) is not None}
    summary = json.loads((run_dir / "summary.json").read_text())
    return Reference(keyed, {k: summary[k] for k in SUMMARY_KEYS}, weight_files(run_dir))


@dataclass
class Verdict:
    """One kill point: was the segment after it exact, and did it start from the newest saved checkpoint."""

    kill: Kill
    killed: Segment
    exact: bool = True
    lost: bool = False
    problems: list[str] = field(default_factory=list)

    def line(self, setup: str, i: int) -> str:
        s = self.killed
        at = f" at step {s.crash_step}" if s.crash_step else ""
        what = "exact" if self.exact and not self.problems else "; ".join(self.problems)
        return (
            f"[{setup} #{i}] {self.kill}{at} (segment from step {s.start}, rc {s.rc}"
            f"{', inside a save' if s.left_tmp else ''}): {what}"
        )


def check_rows(seg: Segment, ref: Reference) -> list[str]:
    problems = []
    if seg.torn > (0 if seg.rc == 0 else 1):
        problems.append(f"{seg.torn} torn metrics lines")
    for row in seg.rows:
        key = key_of(row)
        if key is None:
            problems.append(f"unexpected event row {row}")
        elif key not in ref.rows:
            problems.append(f"{key} not in the reference")
        elif not same(compared(row), ref.rows[key]):
            want = ref.rows[key]
            diff = {k: (row.get(k), want.get(k)) for k in want if not same(row.get(k), want.get(k))}
            problems.append(f"{key[0]} row of step {key[1]} differs (got, want): {diff}")
            break  # the first difference says it; the later ones follow from it
    return problems


def check_chain(run_dir: Path, ref: Reference) -> list[str]:
    """The finished run dir against the reference: lineage of rows, summary, weights."""
    problems = []
    rows, torn = parse(read_lines(run_dir / "metrics.jsonl"))
    if torn:
        problems.append(f"{torn} torn lines left in metrics.jsonl")
    keys = [key_of(r) for r in rows if key_of(r) is not None]
    if sorted(keys, key=lambda k: (k[1], k[0] == "eval")) != sorted(ref.rows, key=lambda k: (k[1], k[0] == "eval")):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        missing = sorted(set(ref.rows) - set(keys))
        problems.append(f"metrics.jsonl rows are not the reference's steps once each: repeated {dup[:6]}, "
                        f"missing {missing[:6]}")  # fmt: skip
    for r in rows:
        k = key_of(r)
        if k is not None and k in ref.rows and not same(compared(r), ref.rows[k]):
            problems.append(f"final metrics.jsonl: {k[0]} row of step {k[1]} differs from the reference")
            break
    events = [r for r in rows if "event" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    for k in SUMMARY_KEYS:
        if not same(summary.get(k), ref.summary[k]):
            problems.append(f"summary.json {k}: {summary.get(k)!r} != reference {ref.summary[k]!r}")
    # The lineage of the final state: a segment counts when the next one resumed from a checkpoint
    # it saved (started later than it did), and the last one counts.
    starts = [0, *(e["step"] for e in events)]
    lineage = 1 + sum(b > a for a, b in itertools.pairwise(starts))
    if summary.get("segments") != lineage:
        problems.append(f"summary.json segments {summary.get('segments')}, but resumes from steps {starts[1:]} "
                        f"make a lineage of {lineage}")  # fmt: skip
    got = weight_files(run_dir)
    if got.keys() != ref.weights.keys():
        problems.append(f"weight files {sorted(got)} != reference {sorted(ref.weights)}")
    import torch

    for name in got.keys() & ref.weights.keys():
        a, b = got[name], ref.weights[name]
        if a.keys() != b.keys() or not all(torch.equal(a[t], b[t]) for t in a):
            problems.append(f"{name} differs from the reference")
    return problems


@dataclass
class ChainResult:
    verdicts: list[Verdict]
    chains: int
    bad_chains: int  # chains whose final run dir differs from the reference's (records, summary, weights)
    problems: list[str]  # not about one kill point: a first segment, a max_steps stop, the final checks
    wall: float


def expected_codes(kill: Kill, setup: Setup) -> tuple[int, int]:
    """(the ranks' exit code, the command's) for a "signal" kill. accelerate's and torchrun's agent
    passes SIGINT/SIGTERM/SIGHUP on and then exits 1 (so does it when a worker stops on a signal
    of its own); SIGUSR1 or SIGKILL kills the agent, and its workers, re-parented, stop as on SIGHUP
    (129). `distrain launch` forwards SIGUSR1 too and exits with the ranks' code."""
    sig = signal.Signals[kill.sig]
    ranks = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138, signal.SIGHUP: 129}.get(sig, 0)
    if sig == signal.SIGKILL and setup.launch is not None:
        return 129, -sig  # the agent died without a word to its workers
    if setup.launch is None or setup.launcher == "distrain":  # distrain launch forwards SIGUSR1 too
        return ranks, ranks
    if sig == signal.SIGUSR1 and kill.target in ("launcher", "group", "all"):
        return (ranks if kill.target == "all" else 129), -sig
    return ranks, 1


def signal_problems(seg: Segment, setup: Setup) -> list[str]:
    """A signal segment: the exit codes, one checkpoint at the step it stopped at, no process left."""
    assert seg.kill is not None and seg.kill.kind == "signal"
    want, want_rc = expected_codes(seg.kill, setup)
    problems = []
    last = max((r["step"] for r in seg.rows if "loss" in r), default=None)
    if seg.signal_rc != want or seg.rc != want_rc:
        problems.append(f"exit code {seg.rc} (ranks said {seg.signal_rc}), want {want_rc} (ranks {want})")
    if seg.interrupted_at is None or seg.interrupted_at != last or seg.saved[-1:] != [seg.interrupted_at]:
        problems.append(f"stopped at step {seg.interrupted_at}, rows up to {last}, saved {seg.saved}")
    if seg.saved.count(seg.interrupted_at) != 1:
        problems.append(f"step {seg.interrupted_at} saved {seg.saved.count(seg.interrupted_at)} times")
    if seg.kill.stage and seg.interrupted_at != seg.crash_step:
        problems.append(f"signalled inside {seg.kill.stage} at step {seg.crash_step}, "
                        f"stopped at {seg.interrupted_at}")
    if seg.left_behind:
        problems.append(f"{seg.left_behind} processes left running")
    segment_output = seg.output.rsplit("=== segment:", 1)[-1]
    if (setup.launch is None or setup.launcher == "distrain") and "Traceback" in segment_output:
        problems.append("a traceback in the output")
    return problems


def run_kills(setup: Setup, root: Path, ref: Reference, kills: list[Kill], first_stop: int | None = None,
              report=print) -> ChainResult:  # fmt: skip
    """Spend `kills` on chains in fresh run dirs under root; a chain ends when a segment finishes,
    and a kill point that did not fire (the run finished first) goes to the next chain.

    first_stop: the first chain starts with a segment of train.max_steps=first_stop run to its
    end (a finished run), which the next segments continue to the setup's max_steps.
    """
    t0 = time.perf_counter()
    verdicts: list[Verdict] = []
    problems: list[str] = []
    queue = list(kills)
    chains = bad_chains = 0
    while queue:
        chains += 1
        run_dir = root / f"chain{chains}"
        prev: Verdict | None = None  # the kill point the next segment is the verdict on
        max_saved = 0
        stop = first_stop if chains == 1 else None
        for _ in range(3 * len(kills) + 10):
            is_stop = stop is not None
            if is_stop:
                seg = run_segment(setup, run_dir, None, (f"train.max_steps={stop}",))
                stop = None
            elif newest_complete(run_dir) >= setup.steps or not queue:  # nothing left to interrupt
                seg = run_segment(setup, run_dir, None)
            else:
                kill = queue.pop(0)
                if kill.kind != "crash":  # fire before the run ends: rows left after the newest checkpoint
                    kill = replace(kill, rows=max(1, min(kill.rows, setup.steps - newest_complete(run_dir) - 1)))
                seg = run_segment(setup, run_dir, kill)
            found = check_rows(seg, ref)
            if seg.start < max_saved:
                found.append(f"resumed from step {seg.start} but step {max_saved} was saved: lost checkpoint")
            if seg.rc is None:
                found.append("hung: killed by the harness after its timeout")
            if prev is not None:
                prev.problems += found
                prev.lost = any("lost checkpoint" in p for p in found)
                prev.exact = not prev.problems
                verdicts.append(prev)
                report(prev.line(setup.name, len(verdicts)))
                prev = None
            else:
                problems += [f"chain {chains} {'max_steps stop' if is_stop else 'first segment'}: {p}" for p in found]
            max_saved = max([max_saved, *seg.saved])
            finished = seg.rc == 0 and not is_stop
            if finished or seg.rc is None:
                if seg.kill is not None and finished:
                    report(f"[{setup.name}] {seg.kill}: did not fire (the run finished first); next chain")
                    queue.insert(0, seg.kill)
                break
            if is_stop:
                if seg.rc != 0:
                    problems.append(f"the max_steps={first_stop} segment exited {seg.rc}\n{seg.output}")
                    break
                report(f"[{setup.name}] train.max_steps={first_stop}: finished, continued with max_steps={setup.steps}")
                continue
            if seg.kill is None:
                problems.append(f"chain {chains}: a segment without a kill point exited {seg.rc}\n{seg.output}")
                break
            prev = Verdict(seg.kill, seg)
            if seg.kill.kind == "signal":
                prev.problems += signal_problems(seg, setup)
                max_saved = max(max_saved, seg.interrupted_at or 0)
        else:
            problems.append(f"chain {chains} does not finish")
        final = check_chain(run_dir, ref)
        problems += [f"chain {chains} at the end: {p}" for p in final]
        if final:
            bad_chains += 1
    return ChainResult(verdicts, chains, bad_chains, problems, time.perf_counter() - t0)


def run_kills_in_lanes(setup: Setup, root: Path, ref: Reference, kills: list[Kill], lanes: int = 2,
                       report=print) -> ChainResult:  # fmt: skip
    """run_kills with the kill points dealt over `lanes` independent run dirs run side by side
    (one-process runs use one core each, so two lanes keep two cores busy)."""
    from concurrent.futures import ThreadPoolExecutor

    dealt = [kills[i::lanes] for i in range(lanes)]
    with ThreadPoolExecutor(lanes) as pool:
        futures = [pool.submit(run_kills, replace(setup, name=f"{setup.name}/{i + 1}"), root / f"lane{i + 1}", ref,
                               part, None, report) for i, part in enumerate(dealt) if part]  # fmt: skip
        results = [f.result() for f in futures]
    return ChainResult([v for r in results for v in r.verdicts], sum(r.chains for r in results),
                       sum(r.bad_chains for r in results), [p for r in results for p in r.problems],
                       max(r.wall for r in results))  # fmt: skip
