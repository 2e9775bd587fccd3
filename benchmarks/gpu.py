"""GPU: bf16 + torch.compile vs fp32 eager on `har` and a transformer-heavy har, one CUDA device.

For each model the two settings run through `distrain bench` (a process per setting, the real
train_step, warm-up steps first so compilation is not timed): samples/s, the speedup of
bf16+compile over fp32 eager, MFU (FLOPs counted once with torch.utils.flop_counter, peak from
distrain.observe.throughput.PEAK_TFLOPS) and peak GPU memory. Without CUDA it says so and exits 0.

    python benchmarks/gpu.py [--steps 30] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MODELS = {
    "har (default)": ["recipe=har"],
    "har transformer-heavy": ["recipe=har", "model.width=512", "model.depth=8", "model.heads=8", "model.dropout=0"],
}
SETTINGS = {"fp32 eager": ["--precision", "no"], "bf16 + compile": ["--precision", "bf16", "train.compile=true"]}


def bench(args: list[str], steps: int, warmup: int, batch: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "distrain.cli", "bench", *args, "--batch-sizes", str(batch),
               "--steps", str(steps), "--warmup", str(warmup), "--json", out.name]  # fmt: skip
        subprocess.run(cmd, check=False, cwd=REPO)  # a failed setting is a row with "error"
        return json.loads(Path(out.name).read_text())[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing measured")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d}")
    print(f"{'model':<24} {'setting':<15} {'samples/s':>10} {'speedup':>8} {'TFLOP/s':>8} {'MFU':>7} {'peak MiB':>9}")
    for model, model_args in MODELS.items():
        base = None
        for setting, setting_args in SETTINGS.items():
            r = bench([*model_args, *setting_args], args.steps, args.warmup, args.batch)
            if "error" in r:
                print(f"{model:<24} {setting:<15} error: {r['error']}")
                continue
            base = base or r["samples_per_s"]
            mfu = f"{r['mfu'] * 100:6.2f}%" if "mfu" in r else "    n/a"
            print(f"{model:<24} {setting:<15} {r['samples_per_s']:>10.0f} {r['samples_per_s'] / base:>7.2f}x "
                  f"{r.get('tflops', 0):>8.2f} {mfu:>7} {r['peak_mem_mb']:>9.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
