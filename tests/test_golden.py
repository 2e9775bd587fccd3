"""Golden losses: distrain against an independent plain-PyTorch loop, and against recorded runs.

`reference` below is the contract written out without distrain: har's model built right after
torch.manual_seed(seed), one permutation of the training set per epoch from
np.random.default_rng([seed, epoch]), steps of `world * micro` samples split over ranks with
np.array_split, the global RNGs re-seeded before every step (and every rank) from splitmix64
of (seed, STEP=1, rank, step), loss = sum of per-sample losses / global samples, global-norm
clipping to 1.0, AdamW with weight decay 0.05 on >= 2-D tensors only, linear warmup then cosine.
Everything else is har's default (dropout 0.1 on, batch 64, lr 2e-3) on the tiny model.

Golden files (tests/golden/har_<backend>.json) hold 30 steps of losses, gradient norms and
learning rates of one run per backend, the exact command and the environment that produced
them. Regenerate them on purpose only (a change of numerics you mean to make), then review
`git diff tests/golden` and commit:

    DISTRAIN_REGEN_GOLDEN=1 PYTHONPATH=. OMP_NUM_THREADS=1 python -m pytest tests/test_golden.py

With the recorded torch (and DeepSpeed) version and CPU kernel set, one thread a process on
CPU, losses and gradient norms must be bitwise equal, for every backend (2-process gloo runs
repeat bitwise: measured 4 times each); elsewhere (another CPU's kernels, or another thread
count, reorder float sums) within PORTABLE_RTOL.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, metrics_rows, run_distrain

sys.path.insert(0, str(REPO))
from recipes.har import HARModel, ModelConfig, load_arrays

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("DISTRAIN_REGEN_GOLDEN") == "1"
STEPS = 30
ARGS = ["recipe=har", "model.width=16", "model.depth=1", "model.heads=2", f"train.max_steps={STEPS}",
        "log.every=1", "log.progress=false"]  # fmt: skip
BACKENDS = {"single": None, "ddp": "cpu_ddp", "fsdp2": "cpu_fsdp", "zero2": "cpu_zero2"}
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the golden runs are CPU, one thread a process
PORTABLE_RTOL = 1e-5  # measured: another kernel set (ATEN_CPU_CAPABILITY=default) or 2 threads: <2e-7
PLURAL = {"loss": "losses", "grad_norm": "grad_norms", "lr": "lrs"}  # the golden files' keys
AGREE_RTOL = 1e-6  # DDP, FSDP2, ZeRO-2 against each other and the reference (measured <2e-7)


# ----------------------------------------------------------------- the independent reference
MASK = (1 << 64) - 1


def mix(x: int) -> int:
    """splitmix64's finaliser, the documented stream-seed contract (distrain/rng.py)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def stream_seed(seed: int, *keys: int) -> int:
    x = mix(seed & MASK)
    for k in keys:
        x = mix(x ^ (k & MASK))
    return x >> 1


def reference(steps: int = STEPS, world: int = 1, micro: int = 64, seed: int = 0) -> list[dict[str, float]]:
    """Plain PyTorch: `world` ranks emulated one after the other in one process."""
    arrays, labels = load_arrays("watch", None, 128, 64)
    x, y = (torch.from_numpy(a) for a in arrays["train"][:2])
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = HARModel(x.shape[1], len(labels), x.shape[2], ModelConfig(width=16, depth=1, heads=2))
    params = list(model.parameters())
    peak, warm = 2e-3, round(0.05 * steps)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999), eps=1e-8)

    def lr_at(s: int) -> float:
        return peak * ((s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))

    global_batch = world * micro
    per_epoch = len(x) // global_batch  # the short tail of an epoch is dropped
    rows = []
    for step in range(steps):
        epoch, pos = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        total = torch.zeros(())
        for rank, part in enumerate(np.array_split(order[pos * global_batch : (pos + 1) * global_batch], world)):
            s = stream_seed(seed, 1, rank, step)
            torch.manual_seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            random.seed(s)
            losses = F.cross_entropy(model(x[part]), y[part], reduction="none")
            (losses.sum() / global_batch).backward()
            total += losses.detach().sum()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        for p in params:
            p.grad.mul_(torch.clamp(1.0 / (norm + 1e-6), max=1.0))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad()
        rows.append({"loss": float(total / global_batch), "grad_norm": float(norm), "lr": lr_at(step)})
    return rows


# ----------------------------------------------------------------- distrain runs


def environment(backend: str) -> dict[str, str]:
    env = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if backend == "zero2":
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    return env


def command(backend: str) -> str:
    launch = BACKENDS[backend]
    prefix = "python" if launch is None else f"accelerate launch --config_file launch_configs/{launch}.yaml"
    return " ".join([*(f"{k}={v}" for k, v in ENV.items()), prefix, "distrain/run.py", *ARGS, "output_dir=<run>"])


def train_rows(run_dir: Path) -> list[dict[str, float]]:
    return [{k: r[k] for k in ("loss", "grad_norm", "lr")} for r in metrics_rows(run_dir) if "loss" in r]


def run_backend(backend: str, run_dir: Path) -> list[dict[str, float]]:
    """The single-process run in this process (one thread, CPU) unless CUDA would take it; others launched."""
    launch = BACKENDS[backend]
    if launch is None and not torch.cuda.is_available():
        from distrain.recipe import resolve_config
        from distrain.train.trainer import Trainer

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cfg, recipe = resolve_config([*ARGS, f"output_dir={run_dir}"])
            Trainer(cfg, recipe).train()
        finally:
            torch.set_num_threads(threads)
    else:
        run_distrain([*ARGS, f"output_dir={run_dir}"], launch, env=ENV)
    return train_rows(run_dir)


def load_golden(backend: str) -> dict:
    path = GOLDEN / f"har_{backend}.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing; create it with DISTRAIN_REGEN_GOLDEN=1 (see this module's docstring)")
    golden = json.loads(path.read_text())
    assert golden["args"] == ARGS and golden["launch_config"] == BACKENDS[backend], (
        f"{path} was made with other settings; regenerate it (see this module's docstring)")  # fmt: skip
    return golden


def write_golden(backend: str, rows: list[dict[str, float]]) -> None:
    GOLDEN.mkdir(exist_ok=True)
    golden = {
        "description": f"har, tiny model, {STEPS} steps of distrain's {backend} backend; tests/test_golden.py",
        "command": command(backend),
        "args": ARGS,
        "launch_config": BACKENDS[backend],
        "environment": environment(backend),
        **{plural: [r[k] for r in rows] for k, plural in PLURAL.items()},
    }
    (GOLDEN / f"har_{backend}.json").write_text(json.dumps(golden, indent=1) + "\n")


def rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS, (len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def single_rows(tmp_path_factory) -> list[dict[str, float]]:
    return run_backend("single", tmp_path_factory.mktemp("golden") / "single")


# ----------------------------------------------------------------- tests


def test_one_process_matches_the_plain_pytorch_reference(single_rows):
    want = reference(world=1)
    for step, (got, ref) in enumerate(zip(single_rows, want, strict=True), 1):
        assert abs(got["loss"] - ref["loss"]) <= 1e-6, (step, got, ref)
        assert abs(got["grad_norm"] - ref["grad_norm"]) <= 1e-6 * ref["grad_norm"], (step, got, ref)
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12, abs=1e-15), (step, got, ref)
    assert len(single_rows) == STEPS


@pytest.mark.parametrize("backend", [pytest.param(b, marks=() if b == "single" else pytest.mark.multiproc)
                                     for b in BACKENDS])  # fmt: skip
def test_losses_match_the_golden_file(backend, single_rows, tmp_path):
    rows = single_rows if backend == "single" else run_backend(backend, tmp_path / backend)
    if REGEN:
        write_golden(backend, rows)
        return
    golden = load_golden(backend)
    same_env = golden["environment"] == environment(backend)
    for key in ("loss", "grad_norm"):
        got, want = [r[key] for r in rows], golden[PLURAL[key]]
        if same_env:
            assert got == want, f"{key}: bitwise differences, largest {rel_diff(got, want):.3g} relative"
        else:
            assert rel_diff(got, want) <= PORTABLE_RTOL, (f"{key}: {rel_diff(got, want):.3g} > {PORTABLE_RTOL} "
                f"(environment {environment(backend)}, golden {golden['environment']})")  # fmt: skip
    assert [r["lr"] for r in rows] == pytest.approx(golden["lrs"], rel=1e-12)


def test_golden_files_agree_with_each_other_and_with_the_reference():
    """The recorded runs: single = the 1-rank reference; DDP, FSDP2 and ZeRO-2 (2 ranks, 64 samples
    each, crossing the epoch end at step 19) = the 2-rank reference, and each other, to AGREE_RTOL."""
    if REGEN:
        pytest.skip("regenerating")
    files = {b: load_golden(b) for b in BACKENDS}
    assert rel_diff(files["single"]["losses"], [r["loss"] for r in reference(world=1)]) <= AGREE_RTOL
    two = reference(world=2)
    for key in ("loss", "grad_norm"):
        for b in ("ddp", "fsdp2", "zero2"):
            assert rel_diff(files[b][PLURAL[key]], [r[key] for r in two]) <= AGREE_RTOL, (b, key)
            for other in ("ddp", "fsdp2", "zero2"):
                assert rel_diff(files[b][PLURAL[key]], files[other][PLURAL[key]]) <= AGREE_RTOL, (b, other, key)
