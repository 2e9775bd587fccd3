"""Trackers: one tracker run per distrain run across SIGKILL and resume (wandb offline, MLflow's
local store), the user's WANDB_* settings and `wandb login` respected, bad names refused."""

from __future__ import annotations

import json
import os
import re

import pytest

from distrain.config import LogConfig
from distrain.errors import ConfigError
from distrain.observe import trackers

from helpers import TINY_HAR, metrics_rows, run_distrain

HERMETIC = {"WANDB_SILENT": "true", "NETRC": "/nonexistent/netrc"}  # no key anywhere: wandb stays offline
USER_SETTINGS = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")  # fmt: skip


@pytest.fixture(autouse=True)
def no_user_settings(monkeypatch):
    """The machine's own tracker settings stay out of the runs (run_distrain passes os.environ on)."""
    for key in USER_SETTINGS:
        monkeypatch.delenv(key, raising=False)


def test_wandb_offline_run_killed_and_resumed_is_one_run(tmp_path):
    out = tmp_path / "run"
    args = [*TINY_HAR, f"output_dir={out}", "log.wandb=true", "ckpt.every_steps=2", "train.max_steps=6",
            "train.eval_every=0"]  # fmt: skip
    killed = run_distrain(args, env={**HERMETIC, "DISTRAIN_CRASH_AT": "before_shards:4"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    run_distrain([*args, "resume=auto"], env=HERMETIC)
    runs = sorted(p.name for p in out.rglob("offline-run-*") if p.is_dir())
    assert len(runs) == 2, runs  # one folder per segment, both of the same wandb run
    assert {re.sub(r"^offline-run-\d{8}_\d{6}-", "", name) for name in runs} == {run_id}
    assert json.loads((out / "trackers.json").read_text())["wandb"]["id"] == run_id


def test_mlflow_local_store_holds_the_metrics_of_both_segments(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    args = [*TINY_HAR, f"output_dir={out}", "log.trackers=[mlflow]", "train.max_steps=4", "train.eval_every=0"]
    run_distrain(args, env=HERMETIC)
    run_distrain([*args[:-2], "train.max_steps=6", "train.eval_every=0", "resume=auto",
                  "resume_allow=[train.max_steps]"], env=HERMETIC)  # fmt: skip
    client = MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("distrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.run_id == json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    logged = {r["step"]: r["loss"] for r in metrics_rows(out) if "loss" in r and "lr" in r}
    assert sorted(m.step for m in history) == sorted(logged) == [1, 2, 3, 4, 5, 6]
    for m in history:
        assert m.value == pytest.approx(logged[m.step], rel=1e-6)
    assert runs[0].data.params["train.max_steps"] == "4"  # MLflow keeps the first segment's parameters

def test_unknown_tracker_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    proc = run_distrain([*TINY_HAR, f"output_dir={out}", "log.trackers=[tensorbord]"], check=False)
    assert proc.returncode == 2
    assert "log.trackers: unknown tracker 'tensorbord'; allowed: tensorboard, wandb, mlflow" in proc.stderr
    assert not out.exists()


def test_requested_trackers_merge_the_switches_and_name_a_missing_package(monkeypatch):
    cfg = LogConfig(trackers=["mlflow"], tensorboard=True, wandb=True)
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: object())
    assert trackers.requested_trackers(cfg) == ["mlflow", "tensorboard", "wandb"]
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"log.trackers=mlflow needs the mlflow package \(pip install mlflow"):
        trackers.requested_trackers(LogConfig(trackers=["mlflow"]))


def test_wandb_respects_the_users_mode_project_and_login(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert trackers.wandb_mode("auto") == "offline"  # no key anywhere
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    os.chmod(tmp_path / "netrc", 0o600)
    assert trackers.wandb_mode("auto") == "online"  # `wandb login` wrote the key to the netrc file
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode("auto") is None  # left to wandb, which reads WANDB_MODE
    assert trackers.wandb_mode("offline") == "offline"  # an explicit log.wandb_mode wins
    assert trackers.project_name(LogConfig()) == "distrain"
    monkeypatch.setenv("WANDB_PROJECT", "theirs")
    assert trackers.project_name(LogConfig()) == "theirs"
    assert trackers.project_name(LogConfig(wandb_project="mine")) == "mine"
