"""Checkpoints in one process: exact resume, interrupts, crash points, corruption, mismatches, export.

Every training run here is a real `python distrain/run.py` process on the tiny har model.
The straight reference run saves at steps 20, 40 and 45 (38 steps per epoch), so resuming
from step 20 crosses an epoch boundary and starts mid-epoch.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distrain import checkpoint as ck
from distrain import fault_points
from distrain.checkpoint import load as checkpoint_load
from distrain.checkpoint.export import export, load_weights_dir
from distrain.checkpoint.layout import live_states, set_live_states

from helpers import REPO, RUN_PY, TINY_HAR, metrics_rows, run_distrain, train_losses, weights

BASE = [*TINY_HAR, "train.max_steps=45", "ckpt.every_steps=20", "ckpt.keep_last=3"]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_rows(run_dir) if "loss" in r}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "straight"
    run_distrain([*BASE, f"output_dir={run}"])
    return run


def test_checkpoint_layout_has_no_pickle(straight):
    root = straight / "checkpoints"
    assert [p.name for p in ck.step_dirs(root)] == ["step_00000020", "step_00000040", "step_00000045"]
    assert (root / "latest").read_text().strip() == "step_00000045"
    assert (root / "best" / "COMPLETE").is_file()
    for path in root.rglob("*"):
        if path.is_file():
            assert path.suffix in (".safetensors", ".json", ".yaml", "") and path.name != "latest.tmp", path
            assert path.suffix not in (".bin", ".pkl", ".pt", ".distcp")
    state = json.loads((root / "step_00000020" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["consumed"]) == (20, 0, 20 * 64)
    assert state["world_size"] == 1 and state["backend"] == "single" and state["recipe"] == "har"
    # the final checkpoint holds exactly the final weights
    assert_same_weights(checkpoint_load.full_model_state(root / "step_00000045"), weights(straight))


def test_resume_mid_epoch_is_bitwise_exact(straight, tmp_path):
    run = tmp_path / "resumed"
    run_distrain([*BASE, f"output_dir={run}", f"resume={straight}/checkpoints/step_00000020"])
    ref, got = losses_by_step(straight), losses_by_step(run)
    assert sorted(got) == list(range(21, 46))
    assert [got[s] for s in got] == [ref[s] for s in got]  # bitwise, steps 21..45 across the epoch end
    assert_same_weights(weights(run), weights(straight))


def test_interrupt_saves_and_auto_resume_continues_exactly(tmp_path):
    """SIGUSR1 mid-run -> checkpoint + exit 138; resume=auto continues; a finished run continues
    when max_steps is raised. Constant schedule, so runs of different lengths share their steps."""
    cfg = [*TINY_HAR, "sched.name=constant", "sched.warmup_ratio=0", "model.width=32"]
    run = tmp_path / "interrupted"
    cmd = [sys.executable, str(RUN_PY), *cfg, "train.max_steps=5000", f"output_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(train_losses(run)) >= 3:
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 138, out[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.removeprefix("step_"))
    assert 3 <= stopped < 5000
    assert max(losses_by_step(run)) == stopped  # saved at the step boundary where it stopped

    run_distrain([*cfg, f"train.max_steps={stopped + 10}", f"output_dir={run}", "resume=auto"])
    ref = tmp_path / "ref"  # straight to stopped+5: a finished run, then raised to stopped+10
    keep_two = ["ckpt.every_steps=2", "ckpt.keep_last=2"]
    run_distrain([*cfg, f"train.max_steps={stopped + 5}", f"output_dir={ref}", *keep_two])
    kept = [p.name for p in ck.step_dirs(ref / "checkpoints")]  # retention: only the newest two remain
    assert len(kept) == 2 and kept[-1] == ck.step_name(stopped + 5), kept
    run_distrain([*cfg, f"train.max_steps={stopped + 10}", f"output_dir={ref}", "resume=auto"])
    got, want = losses_by_step(run), losses_by_step(ref)
    assert sorted(got) == sorted(want) == list(range(1, stopped + 11))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]
    assert_same_weights(weights(run), weights(ref))


@pytest.mark.parametrize("stage", fault_points.CRASH_STAGES)
def test_crash_during_save_keeps_previous_checkpoint(stage, straight, tmp_path):
    run = tmp_path / "crashed"
    proc = run_distrain([*BASE, f"output_dir={run}"], env={fault_points.CRASH_ENV: f"{stage}:40"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000020"
    ck.verify(root / "step_00000020")
    found = ck.find_resumable(run)
    # the new checkpoint counts only once COMPLETE is written (then only `latest` lags behind)
    assert found is not None and found.name == ("step_00000040" if stage == "before_latest" else "step_00000020")
    if stage == "between_shards":  # the full path: resume=auto finishes the run with the straight weights
        run_distrain([*BASE, f"output_dir={run}", "resume=auto"])
        assert_same_weights(weights(run), weights(straight))
        assert [p.name for p in ck.step_dirs(root)] == ["step_00000020", "step_00000040", "step_00000045"]
        assert not list(root.glob(".tmp-*"))


def test_retention_keeps_the_newest_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        (root / ck.step_name(step)).mkdir(parents=True)
        if step != 5:  # step 5 is still being written
            (root / ck.step_name(step) / ck.COMPLETE).write_text("")
    (root / "best").mkdir()
    ck.apply_retention(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["best", ck.step_name(3), ck.step_name(4), ck.step_name(5)]


def test_in_process_saves_point_latest_and_apply_retention_after_the_commit(tmp_path):
    """`latest` and retention run after save_checkpoint returns; flush_pending waits for them."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in range(1, 5):
        path = ck.save_checkpoint(tmp_path, ck.step_name(step), *live_states(model, opt), {"step": step}, "x: 1\n",
                                  keep_last=2)  # fmt: skip
        assert path.name == ck.step_name(step) and (path / ck.COMPLETE).is_file()  # committed on return
    ck.flush_pending()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == ck.step_name(4)
    assert [p.name for p in ck.step_dirs(root)] == [ck.step_name(3), ck.step_name(4)]
    complete = json.loads((root / ck.step_name(4) / ck.COMPLETE).read_text())
    assert complete["step"] == 4 and set(complete["files"]) == {ck.shard_name(0), *ck.TEXT_FILES}
    shard = root / ck.step_name(4) / ck.shard_name(0)
    assert complete["files"][ck.shard_name(0)]["bytes"] == shard.stat().st_size
    import xxhash  # an independent reference: each eighth of the file hashed from its bytes

    data = shard.read_bytes()
    eighths = [data[ck.block_span(len(data), b)[0] : ck.block_span(len(data), b)[1]] for b in range(ck.BLOCKS)]
    assert b"".join(eighths) == data
    assert complete["files"][ck.shard_name(0)]["xxh3_128"] == [xxhash.xxh3_128(e).hexdigest() for e in eighths]
    (root / ck.step_name(4) / ck.COMPLETE).write_text('{"step": 4}\n')  # a damaged commit record
    with pytest.raises(ck.CheckpointError, match="COMPLETE does not record the checkpoint's files"):
        ck.verify(root / ck.step_name(4))
    assert ck.find_resumable(tmp_path).name == ck.step_name(3)


def test_each_checkpoint_manager_owns_its_threads_and_pending_saves(tmp_path, monkeypatch):
    """Two trainers in one process (a sweep's trials): one manager's flush does not wait for the
    other's bookkeeping, and close() ends the manager's writer threads."""
    from distrain.checkpoint import save as checkpoint_save
    from distrain.recipe import resolve_config
    from distrain.train.trainer import Trainer

    before = set(threading.enumerate())
    a, b = (Trainer(*resolve_config([*TINY_HAR, f"output_dir={tmp_path / n}"])) for n in "ab")
    release = threading.Event()
    point_latest = checkpoint_save.point_latest

    def held_for_a(root: Path, name: str, keep_last: int | None = None) -> None:
        if root.parent.name == "a":
            assert release.wait(20), "a's bookkeeping was waited for before it was released"
        point_latest(root, name, keep_last)

    monkeypatch.setattr(checkpoint_save, "point_latest", held_for_a)
    path = a.checkpoints.save(ck.step_name(0))
    assert ck.read_json(path / ck.STATE) == json.loads(json.dumps(a.state_dict()))  # trainer_state.json
    assert a.checkpoints.last_saved_step == 0
    b.checkpoints.save(ck.step_name(0))
    b.checkpoints.flush()  # returns although a's `latest` is still held
    assert (tmp_path / "b" / "checkpoints" / ck.LATEST).read_text().strip() == ck.step_name(0)
    assert not (tmp_path / "a" / "checkpoints" / ck.LATEST).exists()
    release.set()
    for trainer in (a, b):
        trainer.checkpoints.close()
        trainer.release_run_dir()
    assert (tmp_path / "a" / "checkpoints" / ck.LATEST).read_text().strip() == ck.step_name(0)
    left = [t.name for t in threading.enumerate() if t not in before and t.name.startswith("distrain-ckpt")]
    assert left == []


def test_hashing_while_loading_copies_large_tensors_in_chunks_and_catches_damage(tmp_path, monkeypatch):
    """load_verified on a state with tensors of several copy chunks: the loaded values equal the
    saved ones, and a flipped byte deep inside a large tensor raises ChecksumError naming the file."""
    from distrain.checkpoint.find import choose

    monkeypatch.setenv(ck.HASH_WHILE_LOADING_ENV, "0")

    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(700, 600), torch.nn.Linear(600, 5))  # 1.7 MB weight
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(4, 700)).sum().backward()
        opt.step()
        return model, opt

    model, opt = build(0)
    path = ck.save_checkpoint(tmp_path, ck.step_name(1), *live_states(model, opt), {"step": 1}, "x: 1\n")
    model2, opt2 = build(1)
    chosen, index = choose("auto", tmp_path)
    assert chosen == path
    lm, lo = checkpoint_load.load_verified(chosen, *live_states(model2, opt2), index)
    set_live_states(model2, opt2, lm, lo)
    assert_same_weights(model.state_dict(), model2.state_dict())
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[p2][key]), key
    shard = path / ck.shard_name(0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside the big weight or its moments
    shard.write_bytes(bytes(data))
    chosen, index = choose(str(path), tmp_path)  # the size is right: only the checksum can tell
    with pytest.raises(checkpoint_load.ChecksumError, match=r"shard-00000\.safetensors fails its checksum"):
        checkpoint_load.load_verified(chosen, *live_states(model2, opt2), index)


def _copy_run(straight: Path, dest: Path) -> Path:
    shutil.copytree(straight / "checkpoints", dest / "checkpoints")
    return dest


def test_truncated_and_flipped_shards_are_detected(straight, tmp_path):
    run = _copy_run(straight, tmp_path / "corrupt")
    newest = run / "checkpoints" / "step_00000045"
    shard = newest / "shard-00000.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(ck.CheckpointError, match=r"shard-00000\.safetensors.*truncated"):
        ck.verify(newest)
    assert ck.find_resumable(run).name == "step_00000040"

    flipped = run / "checkpoints" / "step_00000040" / "shard-00000.safetensors"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=r"shard-00000\.safetensors.*checksum"):
        ck.verify(flipped.parent)
    assert ck.find_resumable(run).name == "step_00000020"


@pytest.mark.parametrize("while_loading", [False, True], ids=["verify-first", "hash-while-loading"])
def test_resume_auto_stops_when_every_checkpoint_is_damaged(while_loading, straight, tmp_path):
    """Damaged checkpoints are skipped; when none is left, resume=auto stops (exit 2) rather than
    silently starting from scratch. With hashing while loading (forced for this small state) the
    newest is found bad only after part of it was loaded, and the message says so."""
    run = _copy_run(straight, tmp_path / "all_bad")
    for step_dir in ck.step_dirs(run / "checkpoints"):
        shard = step_dir / ck.shard_name(0)
        data = bytearray(shard.read_bytes())
        data[-100] ^= 0xFF  # in the last tensor's bytes: header intact, so only the checksum can tell
        shard.write_bytes(bytes(data))
    env = {ck.HASH_WHILE_LOADING_ENV: "0"} if while_loading else {}
    proc = run_distrain([*BASE, f"output_dir={run}", "resume=auto"], env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "skipping checkpoint" not in proc.stderr and err.count("fails its checksum") == 3, proc.stderr[-3000:]
    assert err.startswith("error: no checkpoint in") and "verifies" in err, err
    assert ("step_00000020 was partly loaded before its checksums failed" in err) == while_loading, err
    assert not (run / "metrics.jsonl").exists()  # nothing trained, nothing written


def test_incompatible_checkpoint_is_refused_and_nothing_overwritten(straight, tmp_path):
    run = _copy_run(straight, tmp_path / "other")
    (run / "config.yaml").write_text("marker: unchanged\n")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = run_distrain([*BASE, "model.width=32", f"output_dir={run}", "resume=auto"], check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint") and "does not fit this model" in err and "shape of" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert (run / "config.yaml").read_text() == "marker: unchanged\n"
    # another recipe: refused by name
    index = ck.read_json(run / "checkpoints" / "step_00000045" / ck.INDEX)
    state = ck.read_json(run / "checkpoints" / "step_00000045" / ck.STATE)
    model_state = {k.removeprefix("model."): torch.empty(v["shape"]) for k, v in index["tensors"].items()
                   if k.startswith("model.")}  # fmt: skip
    with pytest.raises(ck.CheckpointError, match="from recipe=har, not recipe=regression"):
        checkpoint_load.check_fits(run, index, state, model_state, "regression")


def test_save_then_load_in_the_same_process(tmp_path, monkeypatch):
    """No process group, one process: save, then load into fresh objects; never torch.load."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, opt = build(0)
    for _ in range(3):
        model(torch.randn(8, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    path = ck.save_checkpoint(tmp_path, "step_00000003", msd, osd, {"step": 3}, "recipe: none\n")

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must not be used on checkpoints")

    monkeypatch.setattr(torch, "load", no_torch_load)
    ck.verify(path)
    model2, opt2 = build(1)
    tm, to = get_state_dict(model2, opt2)
    lm, lo = checkpoint_load.load_states(path, tm, to)
    set_state_dict(model2, opt2, model_state_dict=lm, optim_state_dict=lo)
    assert_same_weights(model.state_dict(), model2.state_dict())
    x = torch.randn(8, 6)
    for m, o in ((model, opt), (model2, opt2)):  # the next step is identical too (optimizer state restored)
        m(x).square().mean().backward()
        o.step()
    assert_same_weights(model.state_dict(), model2.state_dict())


def test_export_single_and_sharded_equal_trained_weights(straight, tmp_path):
    import distrain

    want = weights(straight)
    out = export(straight, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    assert_same_weights(load_file(str(out / "model.safetensors")), want)
    source = str(straight / "checkpoints" / "step_00000045")
    proc = subprocess.run([sys.executable, "-m", "distrain.cli", "export", source, "--out", str(tmp_path / "sharded"),
                           "--max-shard-size", "8KB"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) > 1 and all(p.stat().st_size < 8000 + 4096 for p in (tmp_path / "sharded").glob("model-*"))
    assert_same_weights(load_weights_dir(tmp_path / "sharded"), want)
    model = distrain.load_model(tmp_path / "sharded")
    assert type(model).__name__ == "HARModel" and not model.training
    assert_same_weights(model.state_dict(), want)
    bad = subprocess.run([sys.executable, "-m", "distrain.cli", "export", str(tmp_path), "--out", str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "holds no complete checkpoint" in bad.stderr


def test_resume_restores_the_best_weights_for_the_test_split(tmp_path):
    """A run resumed after its best evaluation still tests with the best weights, like the straight run.
    `train.mode=min` on accuracy makes an early evaluation the best one, before the resume point."""
    cfg = [*TINY_HAR, "sched.name=constant", "sched.warmup_ratio=0", "train.eval_every=5", "train.mode=min"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_distrain([*cfg, "train.max_steps=30", f"output_dir={straight}"])
    run_distrain([*cfg, "train.max_steps=15", f"output_dir={split}"])
    run_distrain([*cfg, "train.max_steps=30", f"output_dir={split}", "resume=auto"])
    want = json.loads((straight / "summary.json").read_text())
    got = json.loads((split / "summary.json").read_text())
    assert want["best_step"] < 15 and got["best_step"] == want["best_step"]
    assert got["test"] == want["test"]
    assert_same_weights(weights(split, "best_model.safetensors"), weights(straight, "best_model.safetensors"))


def test_read_json_reads_what_json_writes_and_names_unreadable_files(tmp_path):
    # trainer_state.json is written by json.dumps, which writes NaN and Infinity (a best metric or
    # a loss can be one); read_json's fast parser rejects those, so it must fall back, not fail.
    state = {"step": 3, "best_metric": float("inf"), "last_loss": float("nan"), "note": "\u00fc"}
    path = tmp_path / ck.STATE
    path.write_text(json.dumps(state))
    back = ck.read_json(path)
    assert back["step"] == 3 and back["best_metric"] == float("inf") and back["note"] == "\u00fc"
    assert back["last_loss"] != back["last_loss"]  # NaN
    for bad in (b'{"step": ', b'{"step": \x80\x81}', b""):
        path.write_bytes(bad)
        with pytest.raises(ck.CheckpointError, match=r"trainer_state\.json is unreadable"):
            ck.read_json(path)
    with pytest.raises(ck.CheckpointError, match=r"missing\.json is unreadable"):
        ck.read_json(tmp_path / "missing.json")
