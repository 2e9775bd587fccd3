"""`distrain profile recipe=<r> [key=value ...]`: a few real training steps under torch.profiler.

Writes a Chrome / TensorBoard trace (`<run dir>/profile/*.pt.trace.json`: open it in
https://ui.perfetto.dev or chrome://tracing, or `tensorboard --logdir <run dir>/profile`) and
prints the top operators by self time. Steps run through the trainer's own train_step.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from distrain.errors import ConfigError
from distrain.tools.bench import ArgParser, StepRunner


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = ArgParser(prog="distrain profile", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before profiling (not recorded)")
    parser.add_argument("--top", type=int, default=20, help="operators in the printed table")
    parser.add_argument("--memory", action="store_true", help="also record memory per operator")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("--")]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]}; options: --steps, --warmup, --top, --memory")
    if args.steps < 1 or args.warmup < 0 or args.top < 1:
        raise ConfigError("--steps and --top must be >= 1, --warmup >= 0")
    return args, rest


def main(argv: list[str]) -> int:
    from distrain.recipe import resolve_config

    try:
        args, overrides = _parse(argv)
        cfg, _ = resolve_config(overrides)  # validate once; the trainer resolves again with output_dir
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = cfg.output_dir or f"runs/{Path(cfg.recipe).stem}/profile-{stamp}"
        from distrain.tools.bench import build_trainer

        trainer = build_trainer(overrides, out_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table, trace_dir = profile(trainer, StepRunner(trainer), args.steps, args.warmup, args.top, args.memory)
    print(table)
    print(f"trace: {trace_dir} (open the .pt.trace.json in ui.perfetto.dev, or tensorboard --logdir {trace_dir})")
    trainer.release_run_dir()
    from distrain.parallel.launch import leave_process_group

    return leave_process_group(0)  # as a training run ends: no process group torn down under a peer


def profile(
    trainer: Any, runner: StepRunner, steps: int, warmup: int, top: int, memory: bool = False
) -> tuple[str, Path]:
    """Profile `steps` optimizer steps after `warmup`; returns the operator table and the trace folder."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    on_cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    trace_dir = Path(trainer.run_dir) / "profile"
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(trace_dir)),
        record_shapes=True,
        profile_memory=memory,
    ) as prof:
        for _ in range(warmup + steps):
            with torch.profiler.record_function("distrain.optimizer_step"):
                runner.step()
            prof.step()
    sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=top)
    return f"top {top} operators by {sort.replace('_', ' ')} over {steps} steps\n{table}", trace_dir
