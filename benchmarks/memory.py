"""Peak memory per rank and bytes per parameter, per backend, for a 103M-parameter Llama.

    python benchmarks/memory.py [--backends single,ddp,fsdp2,zero1,zero2,zero3] [--no-ckpt] [--out DIR]

Each backend trains benchmarks/llama_recipe.py (transformers `LlamaForCausalLM` from config:
hidden 1024, 8 layers, FFN 2816, 16 heads; AdamW; synthetic tokens) through the real launcher,
`accelerate launch --config_file launch_configs/cpu_<backend>.yaml` at 2 processes (`single`: one
plain process), for 2 steps with one evaluation and the default final and best checkpoints, then
the same run with a 0.13M-parameter model of the same recipe. Every rank records its own peak at
exit: the resident-set high-water mark (`ru_maxrss`, what observe.metrics.peak_memory_mb reads) on CPU,
`torch.cuda.max_memory_allocated` on CUDA. The figure is the largest rank's peak minus that of
the tiny run, divided by the difference in parameter count: bytes per parameter net of the
interpreter, the libraries and the activations, to set beside the ideal of fp32 weights +
gradients + two Adam moments (16 B) split as each backend splits it (at 2 processes: DDP 16,
FSDP2 8, ZeRO-1 14 and ZeRO-2 12, since they keep a cloned fp32 master partition even in fp32,
ZeRO-3 8).

Every rank runs `python benchmarks/memory.py --worker DIR -- <distrain arguments>`, which is
`distrain.run` plus one file DIR/rank<r>.json written on the way out (also when distrain leaves
through os._exit, as multi-process runs do after their final barrier).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "benchmarks" / "llama_recipe.py"
BACKENDS = ("single", "ddp", "fsdp2", "zero1", "zero2", "zero3")
LAUNCH = {"ddp": "cpu_ddp", "fsdp2": "cpu_fsdp", "zero1": "cpu_zero1", "zero2": "cpu_zero2", "zero3": "cpu_zero3"}
# fp32 weights + grads + 2 Adam moments at 2 processes, as each backend splits them
IDEAL = {"single": 16.0, "ddp": 16.0, "fsdp2": 8.0, "zero1": 14.0, "zero2": 12.0, "zero3": 8.0}
TARGET = {"ddp": 17.0, "fsdp2": 9.0, "zero1": 15.0, "zero2": 13.0, "zero3": 9.0}  # issue 16
TINY = ["model.hidden=64", "model.layers=2", "model.ffn=176", "model.heads=4"]  # 133,440 parameters
RUN = ["train.max_steps=2", "data.batch_size=1", "log.progress=false", "log.every=1"]


# ---------------------------------------------------------------- inside each rank


def peak_bytes() -> dict[str, int]:
    """This process's peak so far: resident set high-water mark, and CUDA's allocator peak when used."""
    import torch

    from distrain.observe.metrics import peak_memory_mb

    out = {"rss_peak": int(peak_memory_mb(torch.device("cpu")) * 2**20)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak"] = int(peak_memory_mb(torch.device("cuda")) * 2**20)
    return out


def worker(out_dir: Path, argv: list[str]) -> int:
    """distrain.run with this rank's peak written to out_dir/rank<r>.json however the process ends."""
    rank = int(os.environ.get("RANK", "0"))

    def record() -> None:
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "pid": os.getpid(), **peak_bytes()}))

    real_exit = os._exit

    def exit_recorded(code: int) -> None:  # multi-process runs leave with os._exit after their last barrier
        record()
        real_exit(code)

    os._exit = exit_recorded
    # as distrain/run.py does: this script's folder (checkpoint.py, gpu.py, ...) must not shadow other modules
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    from distrain.cli import run_main

    code = run_main(argv)
    record()
    return code


# ---------------------------------------------------------------- the driver


@dataclass
class Measured:
    backend: str
    params: int
    peaks: list[int]  # bytes per rank
    wall: float

    @property
    def peak(self) -> int:
        return max(self.peaks)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(backend: str, run_dir: Path, extra: list[str] = (), timeout: float = 1800) -> Measured:
    """One run of the recipe under `backend`; the peak of every rank (CUDA's when it ran on CUDA)."""
    ranks_dir = run_dir.with_name(run_dir.name + ".ranks")
    shutil.rmtree(ranks_dir, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    ranks_dir.mkdir(parents=True)
    args = [f"recipe={RECIPE}", *RUN, f"output_dir={run_dir}", *extra]
    me = [str(Path(__file__).resolve()), "--worker", str(ranks_dir), "--"]
    if backend == "single":
        cmd = [sys.executable, *me, *args]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        cmd = [str(accelerate), "launch", "--config_file", str(REPO / "launch_configs" / f"{LAUNCH[backend]}.yaml"),
               "--main_process_port", str(_port()), *me, *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(":"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} {' '.join(extra)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    rows = [json.loads(p.read_text()) for p in sorted(ranks_dir.glob("rank*.json"))]
    want = 1 if backend == "single" else 2
    if len(rows) != want:
        raise RuntimeError(f"{backend}: {len(rows)} rank records in {ranks_dir}, expected {want}")
    key = "cuda_peak" if all("cuda_peak" in r for r in rows) else "rss_peak"
    return Measured(backend, count_params(run_dir / "model.safetensors"), [r[key] for r in rows], wall)


def count_params(weights: Path) -> int:
    """Parameters in the run's exported weights, from the file's header only."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        total = 0
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            n = 1
            for d in f.get_slice(name).get_shape():
                n *= d
            total += n
    return total


def bytes_per_param(big: Measured, tiny: Measured) -> float:
    """The largest rank's peak net of the tiny model's run, per parameter of the difference."""
    return (big.peak - tiny.peak) / (big.params - tiny.params)


def table(results: dict[str, tuple[Measured, Measured]]) -> str:
    lines = [
        "| backend | processes | ideal B/param | measured B/param | target | met | peak of the largest rank, "
        "100M / tiny (MiB) | per rank, 100M (MiB) | wall, 100M (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for backend, (big, tiny) in results.items():
        b = bytes_per_param(big, tiny)
        target = TARGET.get(backend)
        met = "-" if target is None else ("yes" if b <= target else "no")
        lines.append(
            f"| {backend} | {len(big.peaks)} | {IDEAL[backend]:g} | {b:.1f} | "
            f"{'-' if target is None else f'<= {target:g}'} | {met} | {big.peak / 2**20:,.0f} / "
            f"{tiny.peak / 2**20:,.0f} | {', '.join(f'{p / 2**20:,.0f}' for p in big.peaks)} | {big.wall:.0f} |"
        )
    return "\n".join(lines)


def run_all(backends: list[str], root: Path, extra: list[str],
            log: Any = print) -> dict[str, tuple[Measured, Measured]]:  # fmt: skip
    results = {}
    for backend in backends:
        big = measure(backend, root / f"{backend}-100m", extra)
        log(f"{backend}: 100M model ({big.params:,} params) peaks {[p // 2**20 for p in big.peaks]} MiB, "
            f"{big.wall:.0f} s")
        tiny = measure(backend, root / f"{backend}-tiny", [*TINY, *extra])
        log(f"{backend}: tiny model ({tiny.params:,} params) peaks {[p // 2**20 for p in tiny.peaks]} MiB")
        results[backend] = (big, tiny)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        rest = argv[2:]
        return worker(Path(argv[1]), rest[1:] if rest[:1] == ["--"] else rest)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of " + ", ".join(BACKENDS))
    parser.add_argument("--no-ckpt", action="store_true", help="no best/ or final checkpoint (ckpt.save_*=false)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    extra = ["ckpt.save_best=false", "ckpt.save_final=false"] if args.no_ckpt else []
    root = args.out or Path(tempfile.mkdtemp(prefix="distrain-memory-"))
    try:
        results = run_all(backends, root, extra, log=lambda s: print(s, flush=True))
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
