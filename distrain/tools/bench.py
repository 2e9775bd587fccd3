"""`distrain bench recipe=<r> --batch-sizes 32,64,128 --precision no,bf16`: throughput and memory per setting.

Each setting runs in its own process (a fresh Accelerator per precision, and a clean peak-memory
counter: CPU peak RSS only ever grows within a process). A setting runs `--warmup` steps, then
`--steps` timed steps of the real train_step (data, forward, backward, clip, optimizer, schedule);
the table shows the median step time, samples/s from it, and peak memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, NoReturn

from distrain.errors import ConfigError


class ArgParser(argparse.ArgumentParser):
    """argparse whose errors are one-line ConfigErrors (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


class StepRunner:
    """Runs real optimizer steps of a built Trainer outside its epoch loop (no eval, no saving, no logging):
    the trainer's own batches and train_step, with the schedule and the state advanced as the loop does."""

    def __init__(self, trainer: Any):
        self.t = trainer
        self.batches = trainer.epoch_batches()

    def step(self) -> float:
        """One optimizer step; returns its wall time in seconds (the loss is read, so the device has finished)."""
        t, s = self.t, self.t.state
        if not self.batches.count:  # the epoch is over: on to the next one, as Trainer.train goes on
            s.epoch, s.consumed = s.epoch + 1, 0
            self.batches = t.epoch_batches()
        start = time.perf_counter()
        count = self.batches.count
        loss = t.train_step(self.batches.take(), count).loss
        t.scheduler.step()
        s.step, s.consumed = s.step + 1, self.batches.consumed
        float(loss)
        return time.perf_counter() - start


def build_trainer(overrides: list[str], output_dir: str, flops: bool = False) -> Any:
    from distrain.recipe import resolve_config
    from distrain.train.trainer import Trainer

    extra = ["log.flops=true"] if flops else []
    cfg, recipe = resolve_config([*overrides, f"output_dir={output_dir}", "log.progress=false", *extra])
    return Trainer(cfg, recipe)


def measure(overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Median step time, samples/s and peak memory of one setting, in this process."""
    import torch

    from distrain.observe.metrics import peak_memory_mb
    from distrain.observe.throughput import mfu

    with tempfile.TemporaryDirectory(prefix="distrain-bench-") as tmp:
        trainer = build_trainer(overrides, tmp, flops=True)
        runner = StepRunner(trainer)
        for _ in range(warmup):
            runner.step()
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        times = sorted(runner.step() for _ in range(steps))
        median = times[len(times) // 2]
        result = {
            "micro_batch": trainer.plan.micro_batch,
            "global_batch": trainer.plan.global_batch,
            "step_ms": median * 1e3,
            "samples_per_s": trainer.plan.global_batch / median,
            "peak_mem_mb": peak_memory_mb(trainer.device),
            "device": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu",
        }
        if trainer.flops_per_sample:  # counted on the first step
            result["tflops"] = trainer.flops_per_sample * result["samples_per_s"] / 1e12
            util = mfu(trainer.flops_per_sample, result["samples_per_s"], 1, trainer.peak_flops)
            if util is not None:
                result["mfu"] = util
        trainer.release_run_dir()
    return result


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = ArgParser(prog="distrain bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="", help="comma-separated micro-batch sizes (default: the config's)")
    parser.add_argument("--precision", default="no", help="comma-separated precisions: no, bf16, fp16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: measure one setting
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        options = "--batch-sizes, --precision, --steps, --warmup, --json"
        raise ConfigError(f"unknown option {unknown[0]}; options: {options}")
    return args, rest


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}={text!r} must be comma-separated integers, e.g. 32,64,128") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{what}={text!r}: sizes must be >= 1")
    return values


def main(argv: list[str]) -> int:
    try:
        args, overrides = _parse(argv)
        if args.one:
            print("RESULT " + json.dumps(measure(overrides, args.steps, args.warmup)))
            from distrain.parallel.launch import leave_process_group

            return leave_process_group(0)  # as a training run ends: no process group torn down under a peer
        sizes = _ints(args.batch_sizes, "--batch-sizes") or [None]
        precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
        bad = [p for p in precisions if p not in ("no", "bf16", "fp16")]
        if bad or not precisions:
            raise ConfigError(f"--precision={args.precision!r}: choose from no, bf16, fp16 (comma-separated)")
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps must be >= 1 and --warmup >= 0")
        from distrain.recipe import resolve_config

        resolve_config(overrides)  # bad overrides fail here, once, with the usual one-line error
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for size, precision in itertools.product(sizes, precisions):
        setting = [*overrides, f"precision={precision}"] + ([f"data.batch_size={size}"] if size else [])
        rows.append({"batch_size": size or "config", "precision": precision, **_run_one(setting, args)})
        print(_format([rows[-1]], header=len(rows) == 1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


def _run_one(setting: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "distrain.cli", "bench", "--one", "--steps", str(args.steps),
           "--warmup", str(args.warmup), *setting]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": last[:200]}


COLUMNS = [("batch_size", "batch"), ("precision", "precision"), ("global_batch", "global"), ("step_ms", "step ms"),
           ("samples_per_s", "samples/s"), ("peak_mem_mb", "peak MiB"), ("tflops", "TFLOP/s"), ("mfu", "MFU"),
           ("device", "device")]  # fmt: skip


def _format(rows: list[dict[str, Any]], header: bool = True) -> str:
    lines = []
    if header:
        lines.append("  ".join(f"{title:>10}" for _, title in COLUMNS))
    for r in rows:
        if "error" in r:
            lines.append(f"{r['batch_size']!s:>10}  {r['precision']:>10}  error: {r['error']}")
            continue
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key, "")
            if isinstance(v, float):
                cells.append(f"{v:>10.1f}" if v >= 100 else f"{v:>10.4g}")
            else:
                cells.append(f"{v!s:>10}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
