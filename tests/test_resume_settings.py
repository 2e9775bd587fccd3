"""Settings changed at resume: applied when they may change mid-run, refused with exit 2 when they
change the data order or what a step means (unless `resume_allow` names them), every decision in
train.log.

In-process trainers on the tiny har model with the recipe's defaults (dropout 0.1, adamw lr 2e-3,
weight decay 0.05, cosine schedule with 5% warmup, batch 64). The base run trains 6 steps and saves
at 2, 4 and 6; 6 steps give round(0.05 * 6) = 0 warmup steps, so the schedule is a plain cosine.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from distrain import cli
from distrain.checkpoint.resume_check import ALLOWED, APPLIED, BATCH_KEYS, LIVE_KEYS, kind
from distrain.config import all_keys
from distrain.errors import ConfigError
from distrain.recipe import resolve_config
from distrain.train.trainer import Trainer

TINY = ["recipe=har", "model.width=16", "model.depth=1", "model.heads=2", "log.progress=false", "log.every=1"]
BASE = [*TINY, "train.max_steps=6", "ckpt.every_steps=2"]


def build(out: Path, *extra: str) -> Trainer:
    cfg, recipe = resolve_config([*BASE, f"output_dir={out}", *extra])
    return Trainer(cfg, recipe)


def cosine(step: int, total: int) -> float:
    """har's schedule factor at 0-based step `step` of `total` without warmup (min_lr 0), from its definition."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


def notes(trainer: Trainer) -> dict[str, str]:
    return {d.key: d.verdict for d in trainer.resume_notes}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("drift") / "base"
    build(run).train()
    return run


def step_ckpt(run: Path, step: int) -> str:
    return f"resume={run}/checkpoints/step_{step:08d}"


def test_changed_lr_is_applied_and_every_decision_reaches_train_log(base_run, tmp_path):
    trainer = build(tmp_path / "res", step_ckpt(base_run, 2), "optim.lr=1e-2", "ckpt.every_steps=3")
    want = 1e-2 * cosine(2, 6)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([want, want], rel=1e-12)
    assert notes(trainer) == {"optim.lr": APPLIED, "ckpt.every_steps": APPLIED, "peak lr": APPLIED}
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "res" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(lrs) == [3, 4, 5, 6]
    for step, lr in lrs.items():  # the lr of step s is the one set before it: schedule at s - 1
        assert lr == pytest.approx(1e-2 * cosine(step - 1, 6), rel=1e-12), step


def test_every_decision_reaches_train_log(base_run, tmp_path):
    build(tmp_path / "res", step_ckpt(base_run, 2), "optim.lr=1e-2", "ckpt.every_steps=3", "train.seed=1",
          "resume_allow=[train.seed]")  # fmt: skip
    lines = (tmp_path / "res" / "train.log").read_text().splitlines()
    resumed = next(i for i, line in enumerate(lines) if "resumed from" in line)
    notes = [line.split("] ", 1)[1] for line in lines[resumed + 1 :]]
    assert notes == [
        "resume: train.seed 0 -> 1: allowed by resume_allow (changes the data order or what a step means)",
        "resume: optim.lr 0.002 -> 0.01: applied",
        "resume: ckpt.every_steps 2 -> 3: applied",
        "resume: peak lr 0.002 -> 0.01: applied (the schedule goes on from step 2 with the new peak)",
    ]
    assert " WARNING " in lines[resumed + 1] and " INFO " in lines[resumed + 2]


def test_changed_weight_decay_and_betas_are_applied(base_run, tmp_path):
    trainer = build(tmp_path / "res", step_ckpt(base_run, 4), "optim.weight_decay=0.2", "optim.betas=[0.8,0.99]")
    decay, no_decay = trainer.optimizer.param_groups  # matrices decay; biases and norms never do
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.2, 0.0)
    assert tuple(decay["betas"]) == tuple(no_decay["betas"]) == (0.8, 0.99)
    assert decay["lr"] == pytest.approx(2e-3 * cosine(4, 6), rel=1e-12)  # the lr is untouched
    assert notes(trainer) == {"optim.weight_decay": APPLIED, "optim.betas": APPLIED}


def test_interval_length_and_patience_changes_are_applied(base_run, tmp_path):
    trainer = build(tmp_path / "res", step_ckpt(base_run, 2), "train.max_steps=8", "log.every=5", "train.patience=3",
                    "train.eval_every=2", "train.clip_norm=0.5", "data.num_workers=0")  # fmt: skip
    assert trainer.total_steps == 8
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * cosine(2, 8), rel=1e-12)
    changed = notes(trainer)
    assert set(changed) == {"train.max_steps", "train.eval_every", "train.clip_norm", "train.patience",
                            "log.every", "data.num_workers"}  # fmt: skip
    assert set(changed.values()) == {APPLIED}


def test_seed_change_is_refused_with_exit_2_and_nothing_written(base_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(base_run, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code = cli.main(["run", *BASE, f"output_dir={run}", "resume=auto", "train.seed=1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith(f"error: resume from {run}/checkpoints/step_00000006 would change settings"), err
    assert "train.seed 0 -> 1" in err and "resume_allow=[train.seed]" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # into a new run dir: not even the folder stays
    code = cli.main(["run", *BASE, f"output_dir={tmp_path / 'new'}", step_ckpt(base_run, 2), "train.seed=1",
                     "model.dropout=0.2", "sched.name=linear"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not (tmp_path / "new").exists()
    assert "train.seed 0 -> 1; sched.name cosine -> linear; model.dropout 0.1 -> 0.2" in err, err
    assert "resume_allow=[train.seed,sched.name,model.dropout]" in err


def test_refused_changes_are_allowed_by_resume_allow(base_run, tmp_path):
    trainer = build(tmp_path / "a", step_ckpt(base_run, 2), "train.seed=1", "model.dropout=0.2",
                    "resume_allow=[train.seed,model]")  # fmt: skip
    assert notes(trainer) == {"train.seed": ALLOWED, "model.dropout": ALLOWED}
    assert trainer.plan.seed == 1 and trainer.state.step == 2
    assert all(d.level == logging.WARNING for d in trainer.resume_notes)  # warnings: another experiment now


def test_global_batch_change_is_refused_unless_kept_or_allowed(base_run, tmp_path):
    with pytest.raises(ConfigError) as e:
        build(tmp_path / "a", step_ckpt(base_run, 2), "data.batch_size=32")
    msg = str(e.value)
    assert (
        "global_batch 64 -> 32 (now 32 micro x 1 accum x 1 processes, data.batch_size 64 -> 32, "
        "train.grad_accum=2 keeps 64" in msg
    ), msg
    assert "resume_allow=[data.batch_size]" in msg and "\n" not in msg
    assert not (tmp_path / "a").exists()
    kept = build(tmp_path / "b", step_ckpt(base_run, 2), "data.batch_size=32", "train.grad_accum=2")
    assert notes(kept) == {"data.batch_size": APPLIED, "train.grad_accum": APPLIED}
    allowed = build(tmp_path / "c", step_ckpt(base_run, 2), "data.batch_size=32", "resume_allow=[data.batch_size]")
    assert notes(allowed) == {"data.batch_size": ALLOWED, "global_batch": ALLOWED}
    assert allowed.plan.global_batch == 32


def test_unchanged_settings_give_no_decisions(base_run, tmp_path):
    trainer = build(tmp_path / "a", step_ckpt(base_run, 2))
    assert trainer.resume_notes == []
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * cosine(2, 6), rel=1e-12)


def test_resume_allow_entries_must_name_keys_and_every_live_key_exists():
    with pytest.raises(ConfigError, match=r"resume_allow entry 'train\.sed' is not a key.*closest: train\.seed"):
        resolve_config([*TINY, "resume_allow=[train.sed]"])
    cfg, _ = resolve_config([*TINY, "resume_allow=[data,global_batch,model.dropout]"])
    assert cfg.resume_allow == ["data", "global_batch", "model.dropout"]
    keys = set(all_keys(cfg))
    assert keys >= LIVE_KEYS | BATCH_KEYS  # a renamed key would silently fall to refused
    assert {kind(k) for k in ("train.seed", "data.window", "optim.name", "sched.warmup_ratio", "recipe")} == {"fixed"}
