"""Start-up: seconds from the command to the first optimizer step of `recipe=har`, vs a bare import.

The baseline is `python -c "import torch, accelerate"`. The distrain command is
`python distrain/run.py recipe=har train.max_steps=1 log.every=1 ...`; the first optimizer step
has happened when its metrics.jsonl row appears (polled every 5 ms from here, no hooks inside).
The run is killed there, so the CPU time it used (user + sys, from wait4) is exact too: on a shared
machine wall time swings with other load, CPU time much less. Runs are interleaved; medians are
reported. A second pass with `python -X importtime` lists
which of the optional heavy packages were imported before training started.

    python benchmarks/startup.py [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("deepspeed", "wandb", "tensorboard", "torch.utils.tensorboard", "datasets", "matplotlib", "transformers",
         "seglearn", "sklearn", "pandas")  # fmt: skip
RUN = [sys.executable, str(REPO / "distrain" / "run.py"), "recipe=har", "train.max_steps=1", "log.every=1",
       "log.progress=false"]  # fmt: skip


def bare_import() -> tuple[float, float]:
    """(wall, CPU) seconds of `python -c "import torch, accelerate"`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "import torch, accelerate"])
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def first_step(out_dir: Path) -> tuple[float, float]:
    """(wall, CPU) seconds from spawning the run to its first metrics row (written right after optimizer
    step 1); the run is killed there."""
    metrics = out_dir / "metrics.jsonl"
    start = time.perf_counter()
    cmd = [*RUN, f"output_dir={out_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (metrics.exists() and metrics.stat().st_size > 0):
        if proc.poll() is not None:
            raise RuntimeError(f"run exited {proc.returncode} before its first step: {' '.join(cmd)}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    proc.kill()
    _, _, usage = os.wait4(proc.pid, 0)
    return elapsed, usage.ru_utime + usage.ru_stime


def heavy_imports_before_training(out_dir: Path) -> list[str]:
    """Optional heavy packages imported before the plan is logged (training starts right after)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *RUN[1:], f"output_dir={out_dir}"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    found = []
    for line in proc.stderr.splitlines():
        if line.endswith("] plan"):
            break
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name in HEAVY and name not in found:
                found.append(name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    bare, first = [], []
    with tempfile.TemporaryDirectory(prefix="distrain-startup-") as tmp:
        for rep in range(args.reps):
            bare.append(bare_import())
            first.append(first_step(Path(tmp) / f"run{rep}"))
        heavy = heavy_imports_before_training(Path(tmp) / "importtime")
    print(f"{args.reps} interleaved repetitions, medians; wall: bare {[round(x[0], 2) for x in bare]}, "
          f"distrain {[round(x[0], 2) for x in first]}")  # fmt: skip
    print(f"{'':<48} {'wall s':>7} {'CPU s':>7}")
    rows = (('python -c "import torch, accelerate"', bare), ("distrain run recipe=har -> first step", first))
    for label, runs in rows:
        wall_s, cpu_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{label:<48} {wall_s:>7.2f} {cpu_s:>7.2f}")
    wall = statistics.median(r[0] for r in first) / statistics.median(r[0] for r in bare)
    cpu = statistics.median(r[1] for r in first) / statistics.median(r[1] for r in bare)
    print(f"{'ratio (target <= 2.0)':<48} {wall:>7.2f} {cpu:>7.2f}")
    print(f"optional heavy packages imported before training: {', '.join(heavy) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
