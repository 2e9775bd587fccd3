"""The har recipe: UCI HAR loader on a generated fixture, the default data's subject split, end-to-end runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from helpers import NO_DROPOUT, REPO, RUN_PY, TINY_HAR, metrics_rows, run_distrain, train_losses, weights

sys.path.insert(0, str(REPO))
from recipes import har


def write_uci_fixture(root, rng, subjects_train=range(1, 9), subjects_test=(9, 10), rows_per_subject=6):
    """The official UCI HAR layout: <split>/Inertial Signals/<channel>_<split>.txt, y_ and subject_<split>.txt."""
    written = {}
    for split, subjects in (("train", subjects_train), ("test", subjects_test)):
        n = rows_per_subject * len(subjects)
        sig = root / split / "Inertial Signals"
        sig.mkdir(parents=True)
        x = rng.normal(size=(n, 9, 128)).astype(np.float32)
        y = rng.integers(1, 7, size=n)
        s = np.repeat(np.array(subjects), rows_per_subject)
        for c, name in enumerate(har.UCI_CHANNELS):
            np.savetxt(sig / f"{name}_{split}.txt", x[:, c, :], fmt="%.7e")
        np.savetxt(root / split / f"y_{split}.txt", y, fmt="%d")
        np.savetxt(root / split / f"subject_{split}.txt", s, fmt="%d")
        written[split] = (x, y, s)
    return written


def test_uci_har_loader_reads_the_official_layout(tmp_path):
    written = write_uci_fixture(tmp_path / "UCI HAR Dataset", np.random.default_rng(0))
    d = har.load_uci_har(tmp_path / "UCI HAR Dataset")
    for split in ("train", "test"):
        x, y, s = written[split]
        np.testing.assert_allclose(d[f"x_{split}"], x, rtol=1e-6)
        np.testing.assert_array_equal(d[f"y_{split}"], y - 1)  # labels 1..6 -> 0..5
        np.testing.assert_array_equal(d[f"s_{split}"], s)
    assert d["x_train"].shape == (48, 9, 128)


def test_uci_har_splits_by_subject_and_trains(tmp_path):
    root = tmp_path / "UCI HAR Dataset"
    write_uci_fixture(root, np.random.default_rng(1))
    arrays, labels = har.load_arrays("uci_har", str(root), 128, 64)
    subjects = {k: set(np.unique(s)) for k, (_, _, s) in arrays.items()}
    assert subjects == {"train": {1, 2, 3, 4}, "val": {5, 6, 7, 8}, "test": {9, 10}}
    assert labels == har.UCI_LABELS
    out = tmp_path / "run"
    run_distrain([*TINY_HAR, "data.source=uci_har", f"data.path={root}", f"output_dir={out}", "data.batch_size=4",
                  "train.max_steps=4"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert len(summary["test"]["per_class_accuracy"]) == 6


def test_watch_file_reader_matches_seglearn():
    from seglearn.datasets import load_watch

    ours, theirs = har.load_watch(), load_watch()
    assert len(ours["X"]) == len(theirs["X"]) == 140
    assert all(np.array_equal(a, b) for a, b in zip(ours["X"], theirs["X"]))
    for key in ("y", "subject"):
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_watch_data_is_split_by_subject_and_standardised():
    arrays, labels = har.load_arrays("watch", None, 128, 64)
    subjects = {k: set(np.unique(s).tolist()) for k, (_, _, s) in arrays.items()}
    assert subjects == {"train": set(range(1, 8)), "val": {8}, "test": {9, 10}}
    x_train = arrays["train"][0]
    np.testing.assert_allclose(x_train.mean(axis=(0, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(x_train.std(axis=(0, 2)), 1, atol=1e-3)
    assert len(labels) == 7 and x_train.shape[1:] == (6, 128)


def test_end_to_end_single_process(tmp_path):
    out = tmp_path / "run"
    run_distrain([*TINY_HAR, f"output_dir={out}", "train.max_steps=6", "train.eval_every=3"])
    for name in ("config.yaml", "train.log", "metrics.jsonl", "summary.json", "model.safetensors",
                 "confusion_test.json", "confusion_test.png"):
        assert (out / name).is_file(), name
    rows = metrics_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val/accuracy" in r] == [3, 6]
    for key in ("lr", "grad_norm", "samples_per_s", "step_time", "peak_mem_mb", "epoch"):
        assert key in rows[0], key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 6
    assert set(summary["test"]) >= {"loss", "accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix"}
    cm = np.array(summary["test"]["confusion_matrix"])
    assert cm.sum() == 773 and cm.trace() / cm.sum() == pytest.approx(summary["test"]["accuracy"])
    # config.yaml starts the same run again
    again = tmp_path / "again"
    run_distrain([f"config={out / 'config.yaml'}", f"output_dir={again}"])
    assert train_losses(again) == train_losses(out)
    saved = yaml.safe_load((again / "config.yaml").read_text())
    assert saved | {"output_dir": None} == yaml.safe_load((out / "config.yaml").read_text()) | {"output_dir": None}


def test_console_script_and_launcher_single_process(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "distrain") if (REPO / ".venv/bin/distrain").exists()
                           else "distrain", "run", *TINY_HAR, f"output_dir={out}", "train.max_steps=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    # plain `accelerate launch distrain/run.py` (no config file) on this machine: one process
    out = tmp_path / "launched"
    accelerate = REPO / ".venv" / "bin" / "accelerate"
    proc = subprocess.run([str(accelerate) if accelerate.exists() else "accelerate", "launch", str(RUN_PY), *TINY_HAR,
                           f"output_dir={out}", "train.max_steps=2"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1


@pytest.mark.multiproc
def test_ddp_two_processes_world_size_and_identical_ranks(tmp_path):
    """2 CPU processes through launch_configs/cpu_ddp.yaml: both ranks end with the same weights, the
    LR schedule is stepped once per optimizer step, and the logged loss is that of the global batch."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    # SGD: Adam divides by sqrt(v) and turns float noise in exactly-zero gradients (the attention key
    # bias) into full-size updates, so weights would differ by reduction order alone.
    common = [*TINY_HAR, *NO_DROPOUT, "train.max_steps=8", "sched.warmup_steps=3", "data.batch_size=16",
              "optim.name=sgd", "optim.lr=0.05"]  # compared with one process: the ranks' dropout masks differ
    proc = run_distrain([*common, f"output_dir={ddp}", "log.save_rank_weights=true"], launch_config="cpu_ddp")
    assert "2 x cpu" in proc.stderr and "ddp" in proc.stderr
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "ddp"
    assert np.array(summary["test"]["confusion_matrix"]).sum() == 773  # odd: the eval pad is dropped, no duplicates
    r0, r1 = weights(ddp, "rank_0.safetensors"), weights(ddp, "rank_1.safetensors")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    # The same global batch of 32 from one process with accumulation 2 gives the same numbers.
    run_distrain([*common, f"output_dir={single}", "train.grad_accum=2"])
    lr_ddp = [r["lr"] for r in metrics_rows(ddp) if "lr" in r]
    lr_single = [r["lr"] for r in metrics_rows(single) if "lr" in r]
    assert lr_ddp == lr_single and len(lr_ddp) == 8
    np.testing.assert_allclose(train_losses(ddp), train_losses(single), rtol=1e-5)
    final = weights(ddp)
    for k, v in weights(single).items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.multiproc
def test_cpu_flag_with_two_processes_is_refused(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: distrain must refuse, not train alone."""
    out = tmp_path / "run"
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "accelerate") if (REPO / ".venv/bin/accelerate").exists()
                           else "accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(RUN_PY), *TINY_HAR,
                           f"output_dir={out}", "train.max_steps=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "runs ONE process" in proc.stderr
    assert not out.exists()


def test_ctrl_c_saves_weights_and_exits_130(tmp_path):
    out = tmp_path / "run"
    log_file = tmp_path / "stderr.txt"
    with open(log_file, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(RUN_PY), *TINY_HAR, f"output_dir={out}",
                                 "train.max_steps=100000"], stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size
        ):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert proc.returncode == 130, log_file.read_text()[-3000:]
    assert (out / "model.safetensors").is_file()
    w = weights(out)
    assert w and all(torch.isfinite(t).all() for t in w.values())


def test_trackers_tensorboard_and_wandb_offline(tmp_path):
    out = tmp_path / "run"
    env = {"WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    proc = run_distrain([*TINY_HAR, f"output_dir={out}", "train.max_steps=3", "log.tensorboard=true", "log.wandb=true"],
                        env=env)
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    offline = list(out.rglob("offline-run-*"))
    assert offline, sorted(str(p) for p in out.rglob("*"))[:20]
    secret = "distrain-test-secret-key-0123456789abcdef"
    proc = run_distrain([*TINY_HAR, f"output_dir={tmp_path / 'keyed'}", "train.max_steps=2", "log.wandb=true",
                         "log.wandb_mode=offline"], env={**env, "WANDB_API_KEY": secret})
    assert secret not in proc.stdout + proc.stderr
    for path in (tmp_path / "keyed").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_early_stopping_stops_after_patience_evaluations(tmp_path):
    """With a learning rate of ~0 the validation loss cannot improve by min_delta: the first
    evaluation is the best and the run stops `patience` evaluations later."""
    out = tmp_path / "run"
    run_distrain([*TINY_HAR, f"output_dir={out}", "optim.lr=1e-12", "train.max_steps=50", "train.eval_every=2",
                  "train.metric=loss", "train.mode=min", "train.patience=3", "train.min_delta=0.01"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is True
    assert summary["best_step"] == 2 and summary["steps"] == 8
    assert [r["step"] for r in metrics_rows(out) if "val/loss" in r] == [2, 4, 6, 8]


def test_freeze_encoder_trains_only_the_head(tmp_path):
    out = tmp_path / "run"
    proc = run_distrain([*TINY_HAR, f"output_dir={out}", "train.max_steps=3", "model.freeze_encoder=true",
                         "optim.weight_decay=0"])
    assert "trainable" in proc.stderr
    sys.path.insert(0, str(REPO))
    from distrain.recipe import resolve_config

    cfg, recipe = resolve_config([*TINY_HAR, "model.freeze_encoder=true"])
    torch.manual_seed(0)  # the trainer seeds the same way before building the model
    initial = recipe.bind(cfg, recipe.load_datasets(cfg).info).build_model().state_dict()
    final = weights(out)
    for name, value in final.items():
        changed = not torch.equal(value, initial[name])
        assert changed == name.startswith("head."), name
