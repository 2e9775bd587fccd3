"""The loop's promises under the recipes' defaults: exact resume with dropout and with data workers
that draw random numbers, FSDP2 saves after an evaluation, non-finite gradients, NaN metrics,
evaluation bookkeeping across a resume, and the records of a resumed run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from distrain.checkpoint.format import step_dirs
from distrain.recipe import resolve_config
from distrain.train.trainer import Trainer

from helpers import TINY_HAR, metrics_rows, run_distrain, weights

# har's defaults (dropout 0.1 included) on a tiny model
HAR = [*TINY_HAR, "log.every=1"]

# A linear model whose data and step are shaped per test by its model.* settings.
RECIPE = '''"""Test recipe: regression with knobs for randomness in the data, bad gradients and bad metrics."""
from dataclasses import dataclass

import torch
from distrain import DataConfig as Base, Splits, StepOutput, opt


@dataclass
class ModelConfig:
    noisy_data: bool = opt(False, "the dataset adds torch.rand noise to every sample it returns")
    bad_grad_every: int = opt(0, "every N-th optimizer step has a finite loss but a NaN gradient (0: never)")
    nan_metric_evals: str = opt("", "comma-separated evaluation numbers (1-based) whose score is NaN")


@dataclass
class DataConfig(Base):
    pass


class Noisy(torch.utils.data.Dataset):
    def __init__(self, x, y, noisy):
        self.x, self.y, self.noisy = x, y, noisy

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        noise = torch.rand(4) * 0.1 if self.noisy else torch.zeros(4)
        return {"x": self.x[i] + noise, "y": self.y[i]}


def build_datasets(cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return Splits(train=Noisy(x[:64], y[:64], cfg.model.noisy_data), val={"x": x[64:], "y": y[64:]})


class Model(torch.nn.Module):
    def __init__(self, bad_grad_every):
        super().__init__()
        self.lin = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
        self.zero = torch.nn.Parameter(torch.zeros(1))  # sqrt(0) has an infinite gradient
        self.bad_grad_every, self.calls = bad_grad_every, 0

    def forward(self, x):
        out = self.lin(x).squeeze(-1)
        if self.training:
            self.calls += 1
            if self.bad_grad_every and self.calls % self.bad_grad_every == 0:
                out = out + 0.0 * torch.sqrt(self.zero).sum()  # value unchanged, gradient NaN
        return out


def build_model(cfg, info):
    return Model(cfg.model.bad_grad_every)


def step(cfg, info, model, batch):
    pred = model(batch["x"])
    return StepOutput(loss=(pred - batch["y"]) ** 2, preds=pred, targets=batch["y"])


EVALS = [-1]  # call 0 is the dry run before training (distrain.train.preflight); evaluations count from 1


def metrics(cfg, info, preds, targets):
    EVALS[0] += 1
    bad = {int(n) for n in cfg.model.nan_metric_evals.split(",") if n}
    score = float("nan") if EVALS[0] in bad else -float(((preds - targets) ** 2).mean())
    return {"score": score}
'''

LINEAR = ["data.batch_size=8", "log.progress=false", "log.every=1", "train.metric=score", "train.mode=max",
          "optim.lr=0.01", "sched.name=constant", "sched.warmup_ratio=0"]  # fmt: skip


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "knobs.py"
    path.write_text(RECIPE)
    return path


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in metrics_rows(run_dir) if "loss" in r}


def test_resume_with_dropout_on_is_bitwise_exact(tmp_path):
    """har's default dropout 0.1: step 5 onwards equal after resuming from step 4 (1.1517 vs 1.1764 before)."""
    args = [*HAR, "train.max_steps=10", "ckpt.every_steps=4"]
    run_distrain([*args, f"output_dir={tmp_path / 'ref'}"])
    run_distrain([*args, f"output_dir={tmp_path / 'res'}", f"resume={tmp_path}/ref/checkpoints/step_00000004"])
    ref, res = losses(tmp_path / "ref"), losses(tmp_path / "res")
    assert sorted(res) == list(range(5, 11))
    assert all(res[s] == ref[s] for s in res), (ref, res)
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "res")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_with_workers_drawing_random_numbers(tmp_path, recipe):
    """A dataset that calls torch.rand, fetched by 2 persistent workers; resumed mid-epoch."""
    args = [f"recipe={recipe}", *LINEAR, "model.noisy_data=true", "data.num_workers=2", "train.max_steps=14",
            "ckpt.every_steps=5"]  # fmt: skip
    run_distrain([*args, f"output_dir={tmp_path / 'ref'}"])
    run_distrain([*args, f"output_dir={tmp_path / 'res'}", f"resume={tmp_path}/ref/checkpoints/step_00000005"])
    ref, res = losses(tmp_path / "ref"), losses(tmp_path / "res")
    assert sorted(res) == list(range(6, 15)) and all(res[s] == ref[s] for s in res), (ref, res)


@pytest.mark.multiproc
def test_fsdp2_saves_after_an_evaluation_that_is_not_a_new_best(tmp_path):
    """lr 1e-12: no evaluation after the first improves; each is followed by a save (KeyError before)."""
    out = tmp_path / "run"
    run_distrain([*HAR, "optim.lr=1e-12", "train.max_steps=6", "train.eval_every=2", "ckpt.every_steps=2",
                  "train.patience=2", "data.batch_size=16", f"output_dir={out}"], launch_config="cpu_fsdp")  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "fsdp2" and summary["stopped_early"] and summary["steps"] == 6
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in step_dirs(out / "checkpoints")] == ["step_00000002", "step_00000004", "step_00000006"]


def test_finite_loss_with_nan_gradient_is_a_bad_step(tmp_path, recipe):
    out = tmp_path / "every"
    proc = run_distrain([f"recipe={recipe}", *LINEAR, "model.bad_grad_every=1", "train.max_bad_steps=3",
                         f"output_dir={out}"], check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 3 consecutive steps with a non-finite loss or")
    assert "non-finite gradient norm" in (out / "train.log").read_text()

    out = tmp_path / "some"  # every 4th step bad: skipped, counted, warned; training goes on
    run_distrain([f"recipe={recipe}", *LINEAR, "model.bad_grad_every=4", "train.max_steps=12", f"output_dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["steps"] == 12
    assert all(torch.isfinite(w).all() for w in weights(out).values())
    assert (out / "train.log").read_text().count("non-finite gradient norm") == 3


def test_nan_validation_metric_is_never_the_best(tmp_path, recipe):
    """Evaluation 2 is NaN: it is not taken as best, it counts as no improvement, and the run goes on."""
    out = tmp_path / "run"
    run_distrain([f"recipe={recipe}", *LINEAR, "model.nan_metric_evals=2", "train.max_steps=8", "train.eval_every=2",
                  "train.patience=3", f"output_dir={out}"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    evals = [r for r in metrics_rows(out) if "val/score" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8] and evals[1]["val/score"] == "nan"
    finite = {r["step"]: r["val/score"] for r in evals if r["val/score"] != "nan"}
    best_step = max(finite, key=finite.get)
    assert summary["best_step"] == best_step and summary["best_metric"]["score"] == finite[best_step]
    assert not summary["stopped_early"]
    assert "validation score is nan" in (out / "train.log").read_text()


def _interrupt_at(trainer: Trainer, step: int) -> None:
    """Make `trainer` receive SIGTERM during optimizer step `step` (1-based), as a signal would."""
    original = trainer.train_step

    def train_step(micro, count):
        if trainer.state.step == step - 1:
            trainer.interrupt.signum = signal.SIGTERM
        return original(micro, count)

    trainer.train_step = train_step  # type: ignore[method-assign]


def test_an_interrupt_at_an_eval_step_keeps_that_evaluation(tmp_path):
    """SIGTERM during step 3 with eval_every=3: the checkpoint is saved before evaluating, and the
    resumed run evaluates step 3 first, so its eval rows equal those of an uninterrupted run."""
    args = [*HAR, "train.max_steps=6", "train.eval_every=3", "data.batch_size=32"]
    cfg, rec = resolve_config([*args, f"output_dir={tmp_path / 'ref'}"])
    Trainer(cfg, rec).train()
    cfg, rec = resolve_config([*args, f"output_dir={tmp_path / 'res'}"])
    trainer = Trainer(cfg, rec)
    _interrupt_at(trainer, 3)
    assert trainer.train()["exit_code"] == 143
    cfg, rec = resolve_config([*args, f"output_dir={tmp_path / 'res'}", "resume=auto"])
    Trainer(cfg, rec).train()

    def evals(run):
        return [(r["step"], r["val/loss"]) for r in metrics_rows(run) if "val/loss" in r]

    assert evals(tmp_path / "res") == evals(tmp_path / "ref") and [s for s, _ in evals(tmp_path / "ref")] == [3, 6]
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ref", "res"))
    assert a["test"] == b["test"] and a["best_step"] == b["best_step"]


def test_resume_from_an_epoch_end_checkpoint_does_not_repeat_its_evaluation(tmp_path, recipe):
    """64 samples / 8 = 8 steps per epoch; ckpt.every_epoch saves right after the epoch-end evaluation."""
    args = [f"recipe={recipe}", *LINEAR, "train.max_epochs=2", "ckpt.every_epoch=true", "train.patience=5"]
    run_distrain([*args, f"output_dir={tmp_path / 'ref'}"])
    res = tmp_path / "res"
    run_distrain([*args, f"output_dir={res}", f"resume={tmp_path}/ref/checkpoints/step_00000008"])
    assert [r["step"] for r in metrics_rows(res) if "val/score" in r] == [16]  # not 8 again
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("ref", "res"))
    assert a["best_step"] == b["best_step"] and a["best_metric"] == b["best_metric"]


def test_records_of_a_resumed_run(tmp_path):
    """A crash in the save at step 8 (checkpoint 4 kept): resume=auto rewrites steps 5-8. metrics.jsonl
    then holds each step once plus a resume marker, the crashed segment's rows are kept aside, and
    summary.json's wall time covers both segments."""
    out = tmp_path / "run"
    args = [*HAR, "train.max_steps=10", "ckpt.every_steps=4", f"output_dir={out}"]
    proc = run_distrain(args, env={"DISTRAIN_CRASH_AT": "before_shards:8"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    first = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    run_distrain([*args, "resume=auto"])
    rows = metrics_rows(out)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 11))
    marker = [r for r in rows if r.get("event") == "resume"]
    assert len(marker) == 1 and marker[0]["step"] == 4 and marker[0]["segment"] == 2
    superseded = [json.loads(line) for line in (out / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded if "loss" in r] == [5, 6, 7, 8]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["segments"] == 2
    assert summary["wall_time_s"] > first["train_state"]["elapsed"] > 0
    times = [r["time"] for r in rows if "loss" in r]
    assert times == sorted(times)  # the clock continues across the resume
