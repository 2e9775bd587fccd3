"""Crash injection at scale: N random kill points over one process, DDP and FSDP2, each resumed
with resume=auto and compared with an uninterrupted run bitwise.

    python benchmarks/crash_resume.py [--trials 100] [--backends single,ddp,fsdp2] [--seed 0]
                                      [--out DIR] [--keep]

The trials are split evenly over the backends. A trial is one kill point (tests/crash_harness.py
describes them): SIGKILL at a random moment (of the whole run, or under a launcher of one rank)
or SIGKILL of rank 0 at a random stage of a save (DISTRAIN_CRASH_AT). Kill points are spent on
chains of segments in one run dir, each segment resuming the one before; the segment after a
kill point is its verdict:

- exact: its training rows (loss, grad norm, lr) and evaluation rows equal the reference's;
- lost: it resumed from an older checkpoint than one logged as saved before the kill.

A chain's finished run dir is also compared with the reference's (each row once in
metrics.jsonl, summary.json's test metrics and best step, model.safetensors and
best_model.safetensors): "bad chains" counts those that differ. har's defaults (dropout on) on
the tiny model, 24 steps, a checkpoint every 3, an evaluation every 4 (see crash_harness.BASE).
Each verdict is printed as it comes, then a table; exit 1 when anything was not exact or lost.
Run it with OMP_NUM_THREADS=1 (and `nice`) on a shared machine; 100 trials take ~20-30 min on
2 cores.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from crash_harness import SETUPS, random_kills, reference, run_kills


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # through the harness's clean-up: no run outlives the script


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100, help="kill points in all (split over the backends)")
    p.add_argument("--backends", default="single,ddp,fsdp2", help="comma-separated: single, ddp, fsdp2")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the run dirs")
    args = p.parse_args(argv)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in SETUPS]
    if unknown:
        p.error(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(SETUPS)}")
    root = Path(args.out or tempfile.mkdtemp(prefix="crash_resume-"))
    root.mkdir(parents=True, exist_ok=True)
    share = [args.trials // len(names) + (i < args.trials % len(names)) for i in range(len(names))]
    print(f"{args.trials} kill points (seed {args.seed}) over {', '.join(names)}; runs in {root}", flush=True)
    table = []
    problems: list[str] = []
    for i, (name, n) in enumerate(zip(names, share, strict=True)):
        setup = SETUPS[name]
        kills = random_kills(random.Random(args.seed * 1000 + i), n, setup.launch is not None)
        t0 = time.perf_counter()
        ref = reference(setup, root / name / "reference")
        result = run_kills(setup, root / name, ref, kills, report=lambda line: print(line, flush=True))
        verdicts = result.verdicts
        table.append({
            "backend": name,
            "trials": len(verdicts),
            "exact": sum(v.exact for v in verdicts),
            "lost ckpt": sum(v.lost for v in verdicts),
            "inside a save": sum(v.killed.left_tmp or v.kill.kind == "crash" for v in verdicts),
            "one rank": sum(v.kill.target.startswith("rank") and v.kill.kind == "sigkill" for v in verdicts),
            "chains": result.chains,
            "bad chains": result.bad_chains,
            "wall s": round(time.perf_counter() - t0),
        })  # fmt: skip
        problems += [f"[{name}] {p}" for p in result.problems]
        problems += [v.line(name, j) for j, v in enumerate(verdicts, 1) if not v.exact]
    if not args.keep and args.out is None:
        shutil.rmtree(root, ignore_errors=True)
    cols = list(table[0])
    widths = [max(len(c), *(len(str(r[c])) for r in table)) for c in cols]
    print("\n" + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in table:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))
    total = {c: sum(r[c] for r in table) for c in cols[1:]}
    cells = ["all", *(str(total[c]) for c in cols[1:])]
    print("  ".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True)))
    if problems:
        print("\nproblems:\n" + "\n".join(problems))
    return 1 if total["exact"] < total["trials"] or total["lost ckpt"] or problems else 0


if __name__ == "__main__":
    sys.exit(main())
