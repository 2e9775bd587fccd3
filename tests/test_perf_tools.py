"""Throughput accounting in the loop (FLOPs, TFLOP/s, tokens/s, time split), `distrain profile`, `distrain bench`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from distrain.observe.throughput import count_flops, mfu, peak_flops

from helpers import REPO, TINY_HAR, metrics_rows, run_distrain


def test_count_flops_matches_hand_count():
    d, h, o, b = 12, 24, 5, 8
    model = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, o))
    x = torch.randn(b, d)
    with count_flops() as total:
        model(x).sum().backward()
    forward = 2 * b * (d * h + h * o)
    # backward: weight grads of both layers, input grad of layer 2 only (x needs no grad)
    backward = 2 * b * d * h + 2 * (2 * b * h * o)
    assert total() == forward + backward


def test_mfu_and_peaks():
    assert peak_flops(torch.device("cpu"), "bf16") is None
    assert mfu(1e9, 100.0, 2, 1e12) == pytest.approx(0.05)
    assert mfu(1e9, 100.0, 1, None) is None


TOKENS_RECIPE = '''"""har, counting every time step of a window as a token."""
from recipes.har import *  # noqa: F403
from recipes.har import DataConfig, ModelConfig, build_datasets, build_model, metrics, step  # noqa: F401


def tokens(cfg, info, batch):
    return batch["x"].shape[0] * batch["x"].shape[-1]
'''


@pytest.mark.multiproc
def test_loop_logs_flops_tokens_and_a_consistent_time_split(tmp_path):
    recipe = tmp_path / "har_tokens.py"
    recipe.write_text(TOKENS_RECIPE)
    run_dir = tmp_path / "run"
    args = [a for a in TINY_HAR if not a.startswith("recipe=")]
    run_distrain([f"recipe={recipe}", *args, "train.max_steps=4", "log.every=2", "data.batch_size=32",
                  "log.flops=true", f"output_dir={run_dir}"])  # fmt: skip
    rows = [r for r in metrics_rows(run_dir) if "samples_per_s" in r]
    assert len(rows) == 2

    # Independent FLOP count: the same model on a batch of the same size, counted by torch directly.
    from torch.utils.flop_counter import FlopCounterMode

    from distrain.recipe import resolve_config

    cfg, rec = resolve_config(TINY_HAR)
    splits = rec.load_datasets(cfg)
    rec = rec.bind(cfg, splits.info)
    model = rec.build_model()
    x = splits.train
    batch = {k: v[:32].clone() for k, v in x.items()}
    with FlopCounterMode(display=False) as counter:
        rec.step(model, batch).loss.sum().backward()
    per_sample = counter.get_total_flops() / 32
    for r in rows:
        assert r["flops_per_sample"] == pytest.approx(per_sample, rel=1e-9)
        assert r["tflops"] == pytest.approx(per_sample * r["samples_per_s"] / 1e12, rel=1e-6)
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 128, rel=1e-6)  # 128 steps per window
        assert "mfu" not in r  # no peak for a CPU
        split = r["data_time"] + r["compute_time"] + r["optim_time"]
        assert 0 < split <= r["step_time"] * 1.001
        assert r["compute_time"] > 0 and r["optim_time"] > 0


@pytest.mark.multiproc
def test_profile_writes_a_trace_and_prints_top_ops(tmp_path):
    out = tmp_path / "prof"
    proc = subprocess.run([sys.executable, "-m", "distrain.cli", "profile", *TINY_HAR, f"output_dir={out}",
                           "--steps", "2", "--warmup", "1", "--top", "5"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top 5 operators" in proc.stdout and "aten::" in proc.stdout
    traces = list((out / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert sum(n == "distrain.optimizer_step" for n in names) == 1  # the step annotation is in the trace
    assert any(n.startswith("aten::addmm") for n in names)
    steps = [e for e in events if e.get("name") == "distrain.optimizer_step"]
    assert len(steps) == 2  # only the active steps, not the warm-up


@pytest.mark.multiproc
def test_bench_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "distrain.cli", "bench", *TINY_HAR, "--batch-sizes", "16,32",
                           "--precision", "no", "--steps", "3", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["batch_size"], r["precision"], r["global_batch"]) for r in rows] == [(16, "no", 16), (32, "no", 32)]
    for r in rows:
        assert r["samples_per_s"] == pytest.approx(r["global_batch"] / (r["step_ms"] / 1e3), rel=1e-6)
        assert r["peak_mem_mb"] > 50  # a Python process with torch loaded
    assert "samples/s" in proc.stdout and "peak MiB" in proc.stdout


def test_bench_bad_option_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "distrain.cli", "bench", "recipe=har", "--batch-sizes", "a,b"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--batch-sizes" in proc.stderr


@pytest.mark.gpu
def test_cuda_run_logs_mfu_and_auto_batch(tmp_path):
    run_dir = tmp_path / "gpu"
    args = ["train.max_steps=4", "log.every=2", "data.batch_size=auto", f"output_dir={run_dir}"]
    proc = run_distrain([*TINY_HAR, *args])
    assert "auto batch" in proc.stderr + proc.stdout
    rows = [r for r in metrics_rows(run_dir) if "samples_per_s" in r]
    assert rows and all(r["flops_per_sample"] > 0 and r["tflops"] > 0 for r in rows)
    name = torch.cuda.get_device_name()
    if peak_flops(torch.device("cuda"), "no") is not None:
        assert all(0 < r["mfu"] < 1 for r in rows), name
