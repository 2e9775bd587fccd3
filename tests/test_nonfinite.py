"""Non-finite losses: the step is skipped and counted; too many in a row stop the run (exit 1)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_distrain

RECIPE = '''"""A linear regression whose data may hold NaNs (test recipe)."""
from dataclasses import dataclass

import torch
from distrain import DataConfig as Base, Splits, StepOutput, opt


@dataclass
class ModelConfig:
    nan_samples: int = opt(1, "how many leading samples hold NaN inputs")


@dataclass
class DataConfig(Base):
    pass


def build_datasets(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    x[: cfg.model.nan_samples] = float("nan")
    y = x.nan_to_num() @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return Splits(train={"x": x, "y": y}, val={"x": x[32:], "y": y[32:]})


def build_model(cfg, info):
    return torch.nn.Linear(4, 1)


def step(cfg, info, model, batch):
    pred = model(batch["x"]).squeeze(-1)
    return StepOutput(loss=(pred - batch["y"]) ** 2)


def metrics(cfg, info, preds, targets):
    return {}
'''


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "nan_recipe.py"
    path.write_text(RECIPE)
    return path


def test_nan_steps_are_skipped_and_counted(tmp_path, recipe_file):
    out = tmp_path / "run"
    # 64 samples, global batch 8: sample 0 lands in exactly one step per epoch.
    run_distrain([f"recipe={recipe_file}", f"output_dir={out}", "data.batch_size=8", "train.max_epochs=3",
                  "log.progress=false", "log.every=1", "train.max_bad_steps=2", "optim.lr=0.01"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["steps"] == 24
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    nan_rows = [r for r in rows if "loss" in r and r["loss"] == "nan"]
    assert len(nan_rows) == 3
    for w in load_file(str(out / "model.safetensors")).values():
        assert torch.isfinite(w).all()  # a NaN step never reached the weights
    assert "non-finite loss" in (out / "train.log").read_text()


def test_consecutive_nan_steps_stop_the_run(tmp_path, recipe_file):
    out = tmp_path / "run"
    proc = run_distrain([f"recipe={recipe_file}", f"output_dir={out}", "data.batch_size=8", "model.nan_samples=64",
                         "log.progress=false", "log.every=1", "train.max_bad_steps=3"], check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 consecutive steps with a non-finite loss") and "train.max_bad_steps=3" in last
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # stopped at the 3rd bad step
