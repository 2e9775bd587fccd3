"""Data pipeline: the fraction of step time spent waiting for data, with distrain's default settings.

`recipe=har` as shipped (pre-tensorised columns: one index operation per batch, loaded in-process)
vs the same data behind a per-sample torch Dataset (Python `__getitem__` per sample, default
collate, distrain's default worker count for such datasets). Both run the real training loop
(`python distrain/run.py`); the figures come from the loop's own metrics.jsonl rows
(data_time / step_time), the first row dropped as warm-up. Repetitions are interleaved.

    python benchmarks/data_pipeline.py [--reps 2] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PER_SAMPLE_RECIPE = '''"""har behind a per-sample Dataset (for the data-pipeline benchmark)."""
import torch

from distrain import Splits
from recipes.har import *  # noqa: F403
from recipes.har import DataConfig, ModelConfig, build_model, metrics, step  # noqa: F401
from recipes.har import build_datasets as _columns


class PerSample(torch.utils.data.Dataset):
    def __init__(self, columns):
        self.columns = columns

    def __len__(self):
        return len(self.columns["y"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def build_datasets(cfg):
    s = _columns(cfg)
    return Splits(PerSample(s.train), PerSample(s.val), PerSample(s.test), info=s.info)
'''


def run(recipe: str, steps: int, out: Path) -> list[dict]:
    cmd = [sys.executable, str(REPO / "distrain" / "run.py"), f"recipe={recipe}", f"train.max_steps={steps}",
           "log.every=10", "log.progress=false", f"output_dir={out}", "data.batch_size=64"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "data_time" in r][1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=36, help="steps per run (har at batch 64 has 38 per epoch)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"pre-tensorised (default)": [], "per-sample Dataset": []}
    with tempfile.TemporaryDirectory(prefix="distrain-data-") as tmp:
        per_sample = Path(tmp) / "har_per_sample.py"
        per_sample.write_text(PER_SAMPLE_RECIPE)
        (Path(tmp) / "har_per_sample.yaml").write_text((REPO / "recipes" / "har.yaml").read_text())
        recipes = {"pre-tensorised (default)": "har", "per-sample Dataset": str(per_sample)}
        for rep in range(args.reps):
            for name, recipe in recipes.items():
                results[name] += run(recipe, args.steps, Path(tmp) / f"{rep}-{len(results[name])}")
    print(f"har, batch 64, default data settings, {args.reps} interleaved reps x {args.steps} steps; "
          "medians over logged windows of 10 steps")  # fmt: skip
    print(f"{'data path':<26} {'step ms':>9} {'data wait ms':>13} {'data wait %':>12}")
    for name, rows in results.items():
        step = statistics.median(r["step_time"] for r in rows)
        wait = statistics.median(r["data_time"] for r in rows)
        share = statistics.median(r["data_time"] / r["step_time"] for r in rows)
        print(f"{name:<26} {step * 1e3:>9.2f} {wait * 1e3:>13.3f} {share * 100:>11.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
