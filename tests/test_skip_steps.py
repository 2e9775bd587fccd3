"""Skipped steps through Backend.step: a non-finite loss or gradient norm leaves weights and optimizer
state untouched on every backend, fp16 backs its loss scale off and goes on, and DeepSpeed withholds
the update itself (its engine clips and steps in one call). Also: DeepSpeed with data.batch_size=auto
runs the micro-batch and accumulation distrain chose, and ZeRO-3 counts its partitioned parameters.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from distrain.errors import ConfigError
from distrain.parallel.zero import fill_deepspeed_config
from distrain.recipe import resolve_config
from distrain.train.trainer import Trainer

from helpers import TINY_HAR, metrics_rows, run_distrain, weights

# har's defaults, dropout included, on a tiny model
HAR = [a for a in TINY_HAR if not a.startswith("model.dropout")]


def _trainer(out: Path, *extra: str) -> Trainer:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per trainer
    GradientState._reset_state()
    cfg, recipe = resolve_config([*HAR, f"output_dir={out}", *extra])
    return Trainer(cfg, recipe)


def _step(trainer: Trainer, batch: dict[str, torch.Tensor], poison: str | None = None) -> tuple[float, bool]:
    """One optimizer step as Trainer.train_step makes it: backward of the mean loss, then backend.step."""
    if poison == "input":  # NaN inputs: a NaN loss and NaN gradients
        batch = {**batch, "x": batch["x"].clone()}
        batch["x"][0] = float("nan")
    per_sample = trainer.forward(batch).loss.float()
    loss = per_sample.sum() / len(per_sample)
    if poison == "loss":  # a NaN loss whose gradients are finite
        loss = loss + torch.tensor(float("nan"))
    trainer.backend.backward(loss)
    norm, applied = trainer.backend.step(trainer.model, trainer.optimizer, clip_norm=trainer.cfg.train.clip_norm,
                                         loss_finite=math.isfinite(float(loss.detach())))  # fmt: skip
    return float(norm), applied


def _snapshot(trainer: Trainer) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    state = [v.detach().clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return params, state


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]), "weights changed"
    assert len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])), "optimizer state changed"


def _skip_and_go_on(trainer: Trainer, scaler: torch.amp.GradScaler, poison: str) -> None:
    """Good step, poisoned step (skipped: nothing changes, the scale halves), good step (applied)."""
    data = trainer.datasets["train"]
    batches = [data.__getitems__(list(range(i * 16, i * 16 + 16))) for i in range(3)]
    assert _step(trainer, batches[0])[1]
    before, scale = _snapshot(trainer), scaler.get_scale()
    assert scaler.state_dict()["_growth_tracker"] == 1
    norm, applied = _step(trainer, batches[1], poison)
    assert not applied
    _assert_same(_snapshot(trainer), before)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert scaler.get_scale() == scale * 0.5, "a skipped fp16 step must back the loss scale off"
    assert scaler.state_dict()["_growth_tracker"] == 0
    norm, applied = _step(trainer, batches[2])  # the old code raised here: unscale_() called twice
    assert applied and math.isfinite(norm)
    after = _snapshot(trainer)[0]
    assert any(not torch.equal(after[k], before[0][k]) for k in after), "the step after the skip was applied"


@pytest.mark.parametrize("poison", ["input", "loss"])
def test_fp16_skipped_step_backs_the_scale_off_and_training_goes_on(tmp_path: Path, poison: str):
    # accelerate has no fp16 on CPU: the same backend code runs with torch's CPU grad scaler put in
    # accelerate's place (the backend reads accelerator.scaler for backward and step).
    scaled = _trainer(tmp_path / "scaled")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled.accelerator.scaler = scaler
    _skip_and_go_on(scaled, scaler, poison)
    # The same three steps without a scaler (its scale is a power of two: unscaled gradients are exact).
    plain = _trainer(tmp_path / "plain")
    data = plain.datasets["train"]
    for i, p in enumerate([None, poison, None]):
        assert _step(plain, data.__getitems__(list(range(i * 16, i * 16 + 16))), p)[1] == (p is None)
    for (name, a), b in zip(scaled.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=f"{name}: the skipped step left a trace")


@pytest.mark.gpu
@pytest.mark.parametrize("poison", ["input", "loss"])
def test_fp16_skipped_step_on_cuda(tmp_path: Path, poison: str):
    trainer = _trainer(tmp_path, "precision=fp16")
    assert trainer.accelerator.scaler is not None
    _skip_and_go_on(trainer, trainer.accelerator.scaler, poison)


# ---------------------------------------------------------------- DeepSpeed: skipped steps and batch=auto

POISON_RECIPE = '''"""A linear regression with two poisoned samples (test recipe)."""
from dataclasses import dataclass

import torch
from distrain import DataConfig as Base, Splits, StepOutput, opt


@dataclass
class ModelConfig:
    poison: bool = opt(True, "sample 0: NaN loss with finite gradients; sample 1: NaN inputs")


@dataclass
class DataConfig(Base):
    pass


def build_datasets(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(128, generator=g)
    flag = torch.zeros(128)
    if cfg.model.poison:
        flag[0] = 1.0
        x[1] = float("nan")
    return Splits(train={"x": x, "y": y, "flag": flag}, val={"x": x[64:], "y": y[64:], "flag": flag[64:]})


def build_model(cfg, info):
    return torch.nn.Linear(4, 1)


def step(cfg, info, model, batch):
    loss = (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2
    nan = torch.where(batch["flag"] > 0, float("nan"), 0.0)  # no gradient flows through it
    return StepOutput(loss=loss + nan)


def metrics(cfg, info, preds, targets):
    return {}
'''

# 128 samples, global batch 16: 8 steps per epoch; each poisoned sample lands in one step per epoch.
COMMON = ["log.progress=false", "log.every=1", "train.max_epochs=2", "optim.lr=0.05", "ckpt.save_best=false",
          "ckpt.save_final=false"]  # fmt: skip


@pytest.fixture(scope="module")
def poison_runs(tmp_path_factory) -> dict[str, Path]:
    """1 process x batch 16 (the reference), then ZeRO-2 and ZeRO-3 on 2 processes with data.batch_size=auto
    for a global batch of 16, capped at micro-batch 4: 4 micro x 2 accumulation x 2 ranks."""
    base = tmp_path_factory.mktemp("poison")
    recipe = base / "poison_recipe.py"
    recipe.write_text(POISON_RECIPE)
    runs = {"ref": base / "ref"}
    run_distrain([f"recipe={recipe}", *COMMON, "data.batch_size=16", f"output_dir={runs['ref']}"])
    for name in ("cpu_zero2", "cpu_zero3"):
        runs[name] = base / name
        run_distrain([f"recipe={recipe}", *COMMON, "data.batch_size=auto", "data.global_batch=16",
                      "data.auto_max_batch=4", f"output_dir={runs[name]}"], launch_config=name)  # fmt: skip
    return runs


def _losses(run: Path) -> list[float]:
    return [float(r["loss"]) for r in metrics_rows(run) if "loss" in r]


@pytest.mark.multiproc
@pytest.mark.parametrize("launch", ["cpu_zero2", "cpu_zero3"])
def test_deepspeed_skips_nonfinite_steps_like_one_process(poison_runs: dict[str, Path], launch: str):
    ref, run = poison_runs["ref"], poison_runs[launch]
    summary, ref_summary = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert summary["backend"] == f"deepspeed_zero{launch[-1]}" and summary["steps"] == ref_summary["steps"] == 16
    assert summary["skipped_steps"] == ref_summary["skipped_steps"] >= 3  # both samples, both epochs
    got, want = _losses(run), _losses(ref)
    assert [math.isnan(x) for x in got] == [math.isnan(x) for x in want]
    for step, (a, b) in enumerate(zip(got, want), 1):
        if not math.isnan(b):  # every later loss matches: the skipped steps changed nothing
            assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} vs {b}"
    w, ref_w = weights(run), weights(ref)
    for k in ref_w:
        assert torch.isfinite(w[k]).all(), f"{k} is not finite"
        torch.testing.assert_close(w[k], ref_w[k], rtol=0, atol=1e-5, msg=f"final {k}")


@pytest.mark.multiproc
@pytest.mark.parametrize("launch", ["cpu_zero2", "cpu_zero3"])
def test_deepspeed_runs_the_batch_auto_chose(poison_runs: dict[str, Path], launch: str):
    log = (poison_runs[launch] / "train.log").read_text()
    assert re.search(r"batch\s+4 micro x 2 accum x 2 ranks = 16 global", log), log[:3000]
    # read back from the engine: what DeepSpeed runs, not what distrain asked for
    assert re.search(r"ds batch\s+train_micro_batch_size_per_gpu 4, gradient_accumulation_steps 2, "
                     r"train_batch_size 16", log), log[:3000]  # fmt: skip
    assert re.search(r"params\s+5 total, 5 trainable", log), log[:3000]  # ZeRO-3 partitions: still 5


def test_deepspeed_config_is_filled_from_the_resolved_batch():
    cfg, _ = resolve_config([*HAR, "data.batch_size=auto", "data.global_batch=96"])
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    fill_deepspeed_config(ds, cfg, world_size=2, micro_batch=16, grad_accum=3)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        16, 3, 96)  # fmt: skip
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=2 but distrain has train\.grad_accum=3 "
                                          r"\(chosen by data\.batch_size=auto\)"):  # fmt: skip
        fill_deepspeed_config({"gradient_accumulation_steps": 2}, cfg, world_size=2, micro_batch=16, grad_accum=3)
    with pytest.raises(ValueError, match=r"data\.batch_size=auto"):
        fill_deepspeed_config({}, cfg, world_size=2)
