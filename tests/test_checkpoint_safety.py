"""Checkpoint lineage and integrity (issue 13, defects 7, 10, 11, 12, 15).

- 7: resuming an earlier checkpoint into its own run dir moves the abandoned run's later
  checkpoints aside, so retention and resume=auto continue the lineage that ran last;
- 10: COMPLETE checksums every file of a checkpoint; index.json and COMPLETE may only name
  the folder's own files; resume=auto falls back on any failure to verify or load;
- 11: the best/ swap is recoverable at every point, a folder half-deleted by retention never
  looks complete, a failed save leaves no temp folder and says why in one line;
- 12: `distrain export` replaces only its own files and refuses an --out inside its input;
- 15: one rank failing while verifying, loading or saving stops every rank with the same
  verdict, never leaves one waiting (two real gloo ranks).

Most tests build checkpoints in-process from a tiny module; the ones that need the Trainer's
resume run real `distrain/run.py` processes on the tiny har model with the recipe's defaults
(dropout on).
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distrain import checkpoint as ck
from distrain.checkpoint import export
from distrain.checkpoint import integrity as ck_verify
from distrain.checkpoint import load as checkpoint_load
from distrain.checkpoint import save as ck_save
from distrain.checkpoint.layout import live_states

from helpers import free_port, run_distrain, weights

# The tiny har model with the recipe's defaults otherwise (dropout 0.1 on). mode=min on accuracy
# makes the first evaluation the best one, so best/ lies before the last step checkpoint.
HAR = ["recipe=har", "model.width=16", "model.depth=1", "model.heads=2", "log.progress=false", "log.every=1",
       "train.eval_every=4", "train.mode=min", "ckpt.every_steps=4", "ckpt.keep_last=2"]  # fmt: skip


class Killed(BaseException):
    """Stands for a SIGKILL at that point: nothing after it runs, no except-Exception cleanup."""


def tiny(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def save(run: Path, step: int, name: str | None = None, best_step: int = -1, **kw) -> Path:
    model, opt = tiny(step)
    state = {"step": step, "train_state": {"step": step, "best_step": best_step}}
    return ck.save_checkpoint(run, name or ck.step_name(step), *live_states(model, opt), state, "recipe: none\n", **kw)


def rewrite_complete(folder: Path) -> None:
    """Record the folder's files as they are now (what a buggy writer would have vouched for), so
    that only the checks other than the checksums can catch what was changed."""
    record = json.loads((folder / ck.COMPLETE).read_text())
    record["files"] = {name: {"bytes": (folder / name).stat().st_size,
                              "xxh3_128": list(ck.block_checksums(folder / name).values())}
                       for name in record["files"]}  # fmt: skip
    (folder / ck.COMPLETE).write_text(json.dumps(record))


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 10: integrity


@pytest.mark.parametrize("name", ["trainer_state.json", "index.json", "config.yaml"])
def test_an_edited_small_file_fails_verification_and_auto_falls_back(name, tmp_path):
    """trainer_state.json with consumed +64 would resume at the wrong data position; index.json and
    config.yaml are as much part of the checkpoint. COMPLETE checksums them; the edit is caught
    and resume=auto takes the checkpoint before."""
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    path = newest / name
    if name == "trainer_state.json":
        edit_json(path, lambda d: d.update(consumed=d.get("consumed", 0) + 64))
    elif name == "index.json":
        edit_json(path, lambda d: d["optim"]["param_groups"][0].update(lr=1.0))  # would be loaded as is
    else:
        path.write_text("recipe: other\n")
    with pytest.raises(ck.CheckpointError, match=re.escape(name) + r" (fails its checksum|has \d+ bytes)"):
        ck.verify(newest)
    assert ck.find_resumable(tmp_path).name == ck.step_name(1)
    assert set(json.loads((newest / ck.COMPLETE).read_text())["files"]) == {ck.shard_name(0), *ck.TEXT_FILES}


def test_index_pieces_and_complete_must_name_the_folders_own_shards(tmp_path):
    """A piece naming ../step_1/shard-00000 would load (and export) another checkpoint's weights
    unverified; a piece naming a shard that COMPLETE does not record was never verified. Both are
    refused even when COMPLETE vouches for the edited index, and discovery falls back."""
    first = save(tmp_path, 1)
    newest = save(tmp_path, 2)
    index = json.loads((newest / ck.INDEX).read_text())
    key = next(k for k in index["tensors"] if k.startswith("model."))
    for bad, message in ((f"../{first.name}/{ck.shard_name(0)}", "not a file of this checkpoint folder"),
                         (ck.shard_name(7), "COMPLETE does not record as a shard")):  # fmt: skip
        index["tensors"][key]["pieces"][0]["file"] = bad
        (newest / ck.INDEX).write_text(json.dumps(index))
        rewrite_complete(newest)
        with pytest.raises(ck.CheckpointError, match=message):
            ck.verify(newest)
        assert ck.find_resumable(tmp_path).name == first.name  # resume=auto falls back
        assert ck.resolve(tmp_path)[0].name == first.name  # so does `distrain export <run>`
        with pytest.raises(ck.CheckpointError, match=message):
            export.export(newest, tmp_path / "out")
        with pytest.raises(ck.CheckpointError, match=r"not a file of the folder|no readable|unreadable"):
            checkpoint_load.full_model_state(newest, index)  # an index not from verify is checked too
    # COMPLETE itself may only record files of the folder
    edit_json(newest / ck.COMPLETE, lambda d: d["files"].update({"../x": d["files"][ck.shard_name(0)]}))
    with pytest.raises(ck.CheckpointError, match=r"records '\.\./x': not a file of this checkpoint folder"):
        ck.verify(newest)


def test_a_checkpoint_of_format_version_3_still_loads_and_older_ones_are_refused(tmp_path, caplog):
    path = save(tmp_path, 1)
    edit_json(path / ck.INDEX, lambda d: d.update(version=3))
    edit_json(path / ck.COMPLETE, lambda d: (d.pop("version"), [d["files"].pop(n) for n in ck.TEXT_FILES]))
    with caplog.at_level("WARNING", logger="distrain"):
        ck.verify(path)
    assert "format version 3" in caplog.text
    state = checkpoint_load.full_model_state(path)
    model, _ = tiny(1)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    edit_json(path / ck.INDEX, lambda d: d.update(version=2))
    with pytest.raises(ck.CheckpointError, match="has format version 2; this distrain reads versions 3 and 4"):
        ck.verify(path)


def drop_tensor_keeping_checksums(folder: Path) -> str:
    """A shard that lacks a tensor its index maps, with COMPLETE matching it: verification
    passes, loading fails (as a writer bug or a bad header only seen when read would). Returns
    the tensor's name."""
    shard = folder / ck.shard_name(0)
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
        names = list(f.keys())
        dropped = next(k for k in names if k.startswith("model."))
        tensors = {k: f.get_tensor(k) for k in names if k != dropped}
    save_file(tensors, str(shard), metadata=meta)
    rewrite_complete(folder)
    return dropped


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """12 steps of the tiny har model: step_8, step_12 (keep_last=2) and best/ from the first
    evaluation (step 4)."""
    run = tmp_path_factory.mktemp("safety") / "base"
    run_distrain([*HAR, "train.max_steps=12", f"output_dir={run}"])
    root = run / "checkpoints"
    assert [p.name for p in ck.step_dirs(root)] == [ck.step_name(8), ck.step_name(12)]
    assert ck.read_json(root / "best" / ck.STATE)["step"] == 4
    return run


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base / "checkpoints", dest / "checkpoints")
    return dest


def test_resume_auto_falls_back_when_a_verified_checkpoint_fails_to_load(base, tmp_path):
    """Not only a checksum failure: any CheckpointError while loading the newest checkpoint makes
    resume=auto load the one before (which overwrites every tensor), and the skipped one is set
    aside as not part of the lineage that continues."""
    run = copy_run(base, tmp_path / "run")
    dropped = drop_tensor_keeping_checksums(run / "checkpoints" / ck.step_name(12))
    ck.verify(run / "checkpoints" / ck.step_name(12))  # it verifies: only loading can tell
    proc = run_distrain([*HAR, "train.max_steps=14", f"output_dir={run}", "resume=auto"])
    assert re.search(r"skipping checkpoint: checkpoint file \S*step_00000012/shard-00000\.safetensors has no "
                     r"readable tensor " + re.escape(repr(dropped)), proc.stderr), proc.stderr[-3000:]  # fmt: skip
    assert re.search(r"resumed from \S*step_00000008 at step 8", proc.stderr), proc.stderr[-3000:]
    (abandoned,) = (run / "checkpoints").glob(ck.ABANDONED + "*")
    assert (abandoned / ck.step_name(12) / ck.shard_name(0)).is_file()


# ---------------------------------------------------------------- 7: rewinding


def test_rewinding_into_the_same_run_dir_continues_the_new_lineage(base, tmp_path):
    """Resume step_8 of a run that went on to step_12, in the same run dir, saving every step:
    the new step_9 and step_10 are kept (not deleted for the abandoned step_12 by retention),
    step_12 waits in abandoned-*/, and resume=auto later continues from step_10."""
    run = copy_run(base, tmp_path / "run")
    before = listing(run / "checkpoints" / ck.step_name(12))
    proc = run_distrain([*HAR, "train.max_steps=10", "ckpt.every_steps=1", f"output_dir={run}",
                         f"resume={run}/checkpoints/{ck.step_name(8)}"])  # fmt: skip
    root = run / "checkpoints"
    assert [p.name for p in ck.step_dirs(root)] == [ck.step_name(9), ck.step_name(10)]
    assert (root / "latest").read_text().strip() == ck.step_name(10)
    assert ck.find_resumable(run).name == ck.step_name(10)
    (abandoned,) = root.glob(ck.ABANDONED + "*")
    assert listing(abandoned / ck.step_name(12)) == before  # moved whole, nothing deleted
    ck.verify(abandoned / ck.step_name(12))
    assert ck.read_json(root / "best" / ck.STATE)["step"] <= 10  # best/ of step 4 <= 8 is this lineage's: kept
    assert "moved the 1 later checkpoint(s) of the abandoned run (step_00000012)" in proc.stderr


def test_set_aside_future_moves_later_steps_and_a_later_best(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    save(tmp_path, 3, name="best")
    ck.flush_pending()
    files = len(listing(root))
    dest = ck.set_aside_future(root / ck.step_name(2), tmp_path)
    assert dest is not None and dest.parent == root and dest.name.startswith(ck.ABANDONED)
    assert sorted(p.name for p in dest.iterdir()) == ["README", "best", ck.step_name(3), ck.step_name(4)]
    assert [p.name for p in ck.step_dirs(root)] == [ck.step_name(1), ck.step_name(2)]
    assert not (root / "best").exists()  # best of step 3 is the abandoned run's
    assert (root / "latest").read_text().strip() == ck.step_name(2)
    assert len(listing(root)) == files + 1  # + README; nothing deleted
    assert ck.set_aside_future(root / ck.step_name(2), tmp_path) is None  # nothing later any more
    assert ck.set_aside_future(root / ck.step_name(1), tmp_path / "elsewhere") is None  # another run dir


# ---------------------------------------------------------------- 11: best/ swap, retention, failed saves


def crash_between_best_renames(run: Path, step: int, second_done: bool = False) -> None:
    """Save best/ of `step`, SIGKILLed between the two renames of _commit (or just after both)."""
    real = os.replace
    moves = []

    def replace(src, dst):
        moves.append(Path(dst).name)
        if Path(src).name == ".tmp-best" and not second_done:
            raise Killed
        real(src, dst)
        if second_done and Path(dst).name == "best":
            raise Killed

    ck_save.os.replace = replace
    try:
        with pytest.raises(Killed):
            save(run, step, name="best")
    finally:
        ck_save.os.replace = real
    assert ".tmp-old-best" in moves


@pytest.mark.parametrize("second_done", [False, True], ids=["between-renames", "before-removal"])
def test_best_survives_a_crash_at_any_point_of_its_replacement(second_done, tmp_path):
    root = tmp_path / "checkpoints"
    save(tmp_path, 3, name="best")
    resumed = save(tmp_path, 4, best_step=3)
    crash_between_best_renames(tmp_path, 5, second_done)
    assert (root / ".tmp-old-best").is_dir() and (root / "best").exists() == second_done
    state = ck.read_json(resumed / ck.STATE)
    found = ck.find_best(resumed, state)  # what resume loads the best weights from
    assert found is not None and found[0].name == ".tmp-old-best"
    assert ck.read_json(found[0] / ck.STATE)["step"] == 3
    ck.set_aside_future(resumed, tmp_path)  # puts best/ of step 3 back (a best/ of step 5 > 4 goes aside)
    assert ck.read_json(root / "best" / ck.STATE)["step"] == 3 and not (root / ".tmp-old-best").exists()
    ck.verify(root / "best")
    save(tmp_path, 5)  # the next save clears the crash's leftovers
    assert not list(root.glob(".tmp-*"))
    assert ck.read_json(root / "best" / ck.STATE)["step"] == 3


def test_a_save_of_best_interrupted_between_its_renames_restores_it_at_the_next_save(tmp_path):
    root = tmp_path / "checkpoints"
    save(tmp_path, 3, name="best")
    crash_between_best_renames(tmp_path, 5)
    save(tmp_path, 6)
    assert ck.read_json(root / "best" / ck.STATE)["step"] == 3 and not list(root.glob(".tmp-*"))


def test_resume_restores_the_best_weights_after_a_crash_between_the_renames_of_best(base, tmp_path):
    """The on-disk state that crash leaves: best/ moved aside as .tmp-old-best, the new one
    complete as .tmp-best. The resumed run still tests with the best weights (step 4), and
    best/ is back in place."""
    run = copy_run(base, tmp_path / "run")
    root = run / "checkpoints"
    want = checkpoint_load.full_model_state(root / "best")
    os.replace(root / "best", root / ".tmp-old-best")
    shutil.copytree(root / ck.step_name(12), root / ".tmp-best")
    proc = run_distrain([*HAR, "train.max_steps=16", f"output_dir={run}", "resume=auto"])
    assert "not restorable" not in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] == 4
    got = weights(run, "best_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ck.read_json(root / "best" / ck.STATE)["step"] == 4 and not list(root.glob(".tmp-*"))


def test_a_kill_during_retention_never_leaves_a_complete_folder_without_its_shards(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        save(tmp_path, step)

    def killed_rmtree(path, ignore_errors=False):
        for shard in Path(path).glob("shard-*"):  # rmtree got as far as the shard, then the process died
            shard.unlink()
        raise Killed

    monkeypatch.setattr(ck_save.shutil, "rmtree", killed_rmtree)
    with pytest.raises(Killed):
        ck.apply_retention(root, keep_last=1)
    monkeypatch.undo()
    for folder in ck.step_dirs(root):  # every folder under a loadable name is whole
        if (folder / ck.COMPLETE).is_file():
            ck.verify(folder)
    assert ck.find_resumable(tmp_path).name == ck.step_name(3)
    save(tmp_path, 4, keep_last=1)
    ck.flush_pending()
    assert [p.name for p in ck.step_dirs(root)] == [ck.step_name(4)] and not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("where", ["shard", "complete"])
def test_a_failed_save_removes_its_temp_folder_and_says_why_in_one_line(where, tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(tmp_path, 1)
    ck.flush_pending()

    def full_disk(path, *args):
        if where == "shard" or Path(path).name == ck.COMPLETE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args)

    real = ck_save.write_synced
    monkeypatch.setattr(ck_save, "write_shard" if where == "shard" else "write_synced", full_disk)
    with pytest.raises(ck.CheckpointError) as err:
        save(tmp_path, 2)
    message = str(err.value)
    assert "\n" not in message and f"cannot write checkpoint {root / ck.step_name(2)}" in message
    assert "[Errno 28] No space left on device" in message
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["latest", ck.step_name(1)]
    ck.verify(root / ck.step_name(1))
    save(tmp_path, 2)  # and the next save works
    ck.verify(root / ck.step_name(2))


# ---------------------------------------------------------------- 12: export


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    save(run, 1)
    ck.flush_pending()
    return run


def test_export_replaces_only_the_files_it_writes(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    user = {"model_v1_final.safetensors": b"user weights", "notes.txt": b"mine", "model.safetensors.bak": b"x"}
    for name, data in user.items():
        (out / name).write_bytes(data)
    for stale in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", export.INDEX_NAME):
        (out / stale).write_bytes(b"an earlier sharded export")
    export.export(run_dir, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*user, "model.safetensors", "config.yaml"])
    assert all((out / name).read_bytes() == data for name, data in user.items())
    model, _ = tiny(1)
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_export_refuses_an_out_inside_its_input_or_a_file(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / ck.step_name(1)
    (tmp_path / "a_file").write_text("x")
    cases = [(run_dir, run_dir, f"is the input {run_dir};"), (run_dir, ckpt, f"lies inside the input {run_dir};"),
             (ckpt, run_dir, f"is the input {run_dir};"), (ckpt, ckpt / "sub", f"lies inside the input {ckpt};"),
             (run_dir, run_dir / "exported", "lies inside the input"), (ckpt, ckpt, "is the input"),
             (run_dir, run_dir / "checkpoints", "lies inside the input"),
             (run_dir, tmp_path / "a_file", "is an existing file")]  # fmt: skip
    before = listing(tmp_path)
    for source, out, message in cases:
        assert export.main([str(source), "--out", str(out)]) == 2, (source, out)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --out") and message in err[0], err
    assert listing(tmp_path) == before  # nothing written
    assert export.main([str(run_dir), "--out", str(tmp_path / "fine")]) == 0


# ---------------------------------------------------------------- 15: one rank fails, all stop together


def _two_rank_worker(rank: int, port: int, run: str, out: dict) -> None:
    """Scenarios one rank fails in; each records what every rank ended with ("ok ..." or the error)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    root = Path(run) / "checkpoints"
    model, opt = tiny(0)
    load_verified = checkpoint_load.load_verified

    def attempt(name: str, fn) -> None:
        try:
            out[f"{name}/{rank}"] = f"ok {fn()}"
        except ck.CheckpointError as e:
            out[f"{name}/{rank}"] = f"{type(e).__name__}: {e}"
        dist.barrier()

    def save(step: int) -> str:
        state = {"step": step}
        return ck.save_checkpoint(run, ck.step_name(step), *live_states(model, opt), state, "x: 1\n", rank, 2).name

    try:
        attempt("save1", lambda: save(1))
        attempt("save2", lambda: save(2))
        # a full disk on rank 1 only: both ranks stop, no temp folder left, step_2 kept
        real_write = ck_save.write_shard
        if rank == 1:
            ck_save.write_shard = lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        attempt("save3", lambda: save(3))
        ck_save.write_shard = real_write
        out[f"leftovers/{rank}"] = sorted(p.name for p in root.glob(".tmp-*"))
        # an OSError while hashing step_2 on rank 1 only: both ranks skip it and take step_1
        real_hash = ck_verify.block_checksums
        if rank == 1:
            def failing_hash(path, blocks=range(ck.BLOCKS)):
                if ck.step_name(2) in str(path):
                    raise OSError(errno.EIO, "Input/output error")
                return real_hash(path, blocks)

            ck_verify.block_checksums = failing_hash
        attempt("choose", lambda: ck.choose("auto", Path(run), rank, 2)[0].name)
        ck_verify.block_checksums = real_hash
        # A bad shard header found while loading. Hashing while loading: shard-00000 is damaged, rank 0
        # hashes it, rank 1 also reads one of its tensors (the others of its own shard are deferred).
        # Verified first, COMPLETE vouching for the damaged file: shard-00001, only rank 1 reads it.
        for case, step, bad in (("while-loading", 2, 0), ("verified-first", 1, 1)):
            path = root / ck.step_name(step)
            if rank == 0:
                shard = path / ck.shard_name(bad)
                data = bytearray(shard.read_bytes())
                data[9] = ord("#")
                shard.write_bytes(bytes(data))
                if case == "verified-first":
                    rewrite_complete(path)
            dist.barrier()
            os.environ[ck.HASH_WHILE_LOADING_ENV] = "0" if case == "while-loading" else str(1 << 40)
            index = ck.verify(path, rank, 2, defer_same_world=True)
            model_state = live_states(model, opt)[0]
            of = {k: index["tensors"][f"model.{k}"]["pieces"][0]["file"] for k in model_state}
            targets = {k: t for k, t in model_state.items() if of[k] == ck.shard_name(rank)}
            if case == "while-loading" and rank == 1:
                k = next(k for k in model_state if of[k] == ck.shard_name(0))
                targets[k] = model_state[k]
            attempt(case, lambda p=path, t=targets, i=index: sorted(load_verified(p, t, None, i, rank, 2)[0]))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("ranks") / "run"
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Manager().dict()
    port = free_port()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, str(run), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        p.kill()
    result = dict(out)
    result["hung"] = hung
    result["run"] = run
    return result


def _both(result: dict, name: str) -> list[str]:
    assert not result["hung"], f"rank(s) {result['hung']} hung; recorded: {result}"
    return [result.get(f"{name}/{r}", "no result") for r in (0, 1)]


def test_a_failed_write_on_one_rank_stops_both_ranks_and_leaves_no_temp_folder(two_ranks):
    assert _both(two_ranks, "save2") == [f"ok {ck.step_name(2)}"] * 2
    rank0, rank1 = _both(two_ranks, "save3")
    assert rank0.startswith("CheckpointError: ") and "shard-00001.safetensors could not be written" in rank0
    assert rank1.startswith("CheckpointError: cannot write checkpoint") and "No space left on device" in rank1
    assert _both(two_ranks, "leftovers") == [[], []]
    assert not (two_ranks["run"] / "checkpoints" / ck.step_name(3)).exists()


def test_an_oserror_on_one_rank_while_verifying_is_a_verdict_for_both(two_ranks):
    assert _both(two_ranks, "choose") == [f"ok {ck.step_name(1)}"] * 2


def test_a_bad_shard_header_found_while_loading_on_one_rank_stops_both_ranks(two_ranks):
    """Hashing while loading: rank 1 reads a piece of the damaged shard-00000 while loading and
    rank 0 finds it unreadable when it hashes it: both raise, neither waits for the other."""
    rank0, rank1 = _both(two_ranks, "while-loading")
    assert rank0 == rank1 and "shard-00000.safetensors: unreadable header" in rank0, (rank0, rank1)
    assert rank0.startswith("CheckpointError: checkpoint file")


def test_a_bad_shard_header_only_rank_1_reads_stops_both_ranks(two_ranks):
    """Verified first (COMPLETE vouching for the damaged file): only rank 1 reads shard-00001;
    rank 0, whose own load went well, raises too instead of training on alone."""
    rank0, rank1 = _both(two_ranks, "verified-first")
    assert rank1.startswith("CheckpointError: checkpoint file"), rank1
    assert "shard-00001.safetensors: unreadable header" in rank1
    assert rank0.startswith("CheckpointError: ") and "failed to load on another rank" in rank0, rank0


def test_checksumming_a_shard_keeps_at_most_one_chunk_of_it_resident(tmp_path):
    # Hashing maps the file; without dropping the hashed pages a rank's resident set grew by its whole
    # shard at every save (6 B per parameter of a 2-process ZeRO-3 run), beside its training state.
    import subprocess
    import sys
    import textwrap

    import xxhash

    from distrain.checkpoint import format as fmt

    path = tmp_path / "shard.bin"
    data = os.urandom(1 << 20) * 192 + b"tail"  # 192 MiB and a partial last page
    path.write_bytes(data)
    want = {b: xxhash.xxh3_128(data[slice(*fmt.block_span(len(data), b))]).hexdigest() for b in range(fmt.BLOCKS)}
    del data
    script = textwrap.dedent(f"""
        import json
        from distrain.checkpoint.format import block_checksums

        def hwm():
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))

        before = hwm()
        sums = block_checksums({str(path)!r})
        print(json.dumps({{"grew_kib": hwm() - before, "sums": sums}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    got = json.loads(out.stdout.splitlines()[-1])
    assert {int(k): v for k, v in got["sums"].items()} == want  # the same digests as hashing the bytes whole
    assert got["grew_kib"] < 112 * 1024, got["grew_kib"]  # one 16 MiB chunk and some slack, not 192 MiB
