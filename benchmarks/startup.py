"""Start-up: seconds from the command to the first optimizer step of `recipe=har`, vs a bare import.

The baseline is `python -c "import torch, accelerate"`. The distrain command is
`python distrain/run.py recipe=har train.max_steps=1 log.every=1 ...`; the first optimizer step
has happened when its metrics.jsonl row appears (polled every 5 ms from here, no hooks inside).
Runs are interleaved; medians are reported. A second pass with `python -X importtime` lists
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


def bare_import() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, accelerate"], check=True)
    return time.perf_counter() - start


def first_step(out_dir: Path) -> float:
    """Seconds from spawning the run to its first metrics row (written right after optimizer step 1)."""
    metrics = out_dir / "metrics.jsonl"
    start = time.perf_counter()
    cmd = [*RUN, f"output_dir={out_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        if metrics.exists() and metrics.stat().st_size > 0:
            elapsed = time.perf_counter() - start
            break
        if proc.poll() is not None:
            raise RuntimeError(f"run exited {proc.returncode} before its first step:\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.communicate()
    return elapsed


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
    b, f = statistics.median(bare), statistics.median(first)
    print(f"{args.reps} interleaved repetitions, medians (all runs: bare {[round(x, 2) for x in bare]}, "
          f"distrain {[round(x, 2) for x in first]})")  # fmt: skip
    bare_cmd = 'python -c "import torch, accelerate"'
    print(f"{bare_cmd:<48} {b:6.2f} s")
    print(f"{'distrain run recipe=har -> first optimizer step':<48} {f:6.2f} s")
    print(f"{'ratio (target <= 2.0)':<48} {f / b:6.2f}")
    print(f"optional heavy packages imported before training: {', '.join(heavy) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
