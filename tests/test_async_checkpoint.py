"""Asynchronous checkpoints (ckpt.async_save=true): the loop waits only for the host copy.

The files are written and committed in the background with the synchronous save's protocol, so a
run that saves asynchronously resumes exactly as a synchronous one, a kill inside the background
write leaves the newest complete checkpoint to resume from and no step_* folder that is not
complete, and the training loop takes its next step while a write is still going on (with the
checkpoint holding the state of the step it was taken at, not of a later one).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch
from crash_harness import SETUPS, Kill, check_chain, check_rows, newest_complete, reference, run_segment

from distrain import checkpoint as ck

from helpers import TINY_HAR

ASYNC = ("ckpt.async_save=true",)


# fsdp2 covers the multi-rank path (sharded pieces, the gather on the save's own group); DDP adds CI time, not a path.
@pytest.mark.parametrize("name", ["single", pytest.param("fsdp2", marks=pytest.mark.multiproc)])
def test_a_kill_inside_a_background_write_resumes_exactly_from_the_last_complete_checkpoint(name, tmp_path):
    """Killed (SIGKILL, rank 0) inside step 6's background write, just before COMPLETE: only the
    temp folder of step 6 exists, every step_* folder is complete, the next segment resumes from
    step 3 and, like the first one, equals an uninterrupted synchronous run bitwise (rows, test
    metrics, final and best weights)."""
    sync = replace(SETUPS[name], args=(*SETUPS[name].args, "train.max_steps=9"))  # evaluations at 4 and 8
    ref = reference(sync, tmp_path / "reference")
    setup = replace(sync, args=(*sync.args, *ASYNC))
    run = tmp_path / "async"
    killed = run_segment(setup, run, Kill("crash", stage="before_complete", nth=2))
    assert killed.crash_step == 6 and killed.rc not in (0, None), killed.output
    root = run / ck.CKPT_DIR
    assert (root / f".tmp-{ck.step_name(6)}").is_dir()  # the kill did land inside step 6's write
    assert all((p / ck.COMPLETE).is_file() for p in ck.step_dirs(root)), sorted(p.name for p in root.iterdir())
    assert newest_complete(run) == 3 and killed.saved == [3]
    assert check_rows(killed, ref) == []
    resumed = run_segment(setup, run, None)
    assert resumed.rc == 0 and resumed.start == 3, resumed.output
    assert check_rows(resumed, ref) == []
    assert check_chain(run, ref) == []
    assert not list(root.glob(".tmp-*"))


def test_the_loop_takes_its_next_step_while_the_write_is_pending(tmp_path, monkeypatch):
    """The shard write of step 2's save is held until the loop has started step 3: with a
    synchronous save that never happens (the hold times out). The checkpoint then holds step 2's
    weights although the optimizer changed the live ones twice more before they were written."""
    from distrain.checkpoint import save as checkpoint_save
    from distrain.recipe import resolve_config
    from distrain.train.trainer import Trainer

    cfg, recipe = resolve_config([*TINY_HAR, "train.max_steps=4", "ckpt.every_steps=2", "train.eval_every=0",
                                  *ASYNC, f"output_dir={tmp_path}"])  # fmt: skip
    trainer = Trainer(cfg, recipe)
    release, written, reached = threading.Event(), threading.Event(), threading.Event()
    write_shard = checkpoint_save.write_shard

    def held(path, tensors, metadata):
        if ck.step_name(2) in str(path):
            release.wait(10)
            write_shard(path, tensors, metadata)
            written.set()
        else:
            write_shard(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_save, "write_shard", held)
    step = trainer.train_step
    at_save: dict[str, torch.Tensor] = {}

    def train_step(micro, count):
        if trainer.state.step == 2:  # step 2's save was taken just before this step
            at_save.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        if trainer.state.step == 3 and not written.is_set():  # the loop is a step further, the write held
            reached.set()
            release.set()
        return step(micro, count)

    trainer.train_step = train_step  # type: ignore[method-assign]
    trainer.train()
    assert reached.is_set(), "the loop waited for the background write"
    saved = ck.step_dirs(tmp_path / ck.CKPT_DIR)
    assert [p.name for p in saved] == [ck.step_name(2), ck.step_name(4)]
    assert all((p / ck.COMPLETE).is_file() for p in saved)
    from safetensors.torch import load_file

    shard = load_file(str(saved[0] / ck.shard_name(0)))
    assert at_save.keys() == {k.removeprefix("model.") for k in shard if k.startswith("model.")}
    assert all(torch.equal(shard[f"model.{k}"], v) for k, v in at_save.items())
    live = trainer.model.state_dict()
    assert any(not torch.equal(v, live[k]) for k, v in at_save.items())  # trained on after the save


def test_an_error_ending_the_run_waits_for_the_save_in_flight(tmp_path, monkeypatch):
    """A step that raises while step 2's write is still held: train() raises only once that
    checkpoint is committed (the process may exit right after, skipping the writer's thread)."""
    from distrain.checkpoint import save as checkpoint_save
    from distrain.recipe import resolve_config
    from distrain.train.trainer import Trainer

    cfg, recipe = resolve_config([*TINY_HAR, "train.max_steps=4", "ckpt.every_steps=2", "train.eval_every=0",
                                  *ASYNC, f"output_dir={tmp_path}"])  # fmt: skip
    trainer = Trainer(cfg, recipe)
    write_shard = checkpoint_save.write_shard

    def slow(path, tensors, metadata):
        time.sleep(1.0)  # still writing when the next step fails
        write_shard(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_save, "write_shard", slow)
    step = trainer.train_step

    def train_step(micro, count):
        if trainer.state.step == 2:
            raise RuntimeError("a bad step")
        return step(micro, count)

    trainer.train_step = train_step  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a bad step"):
        trainer.train()
    assert [p.name for p in ck.step_dirs(tmp_path / ck.CKPT_DIR)] == [ck.step_name(2)]
    ck.verify(tmp_path / ck.CKPT_DIR / ck.step_name(2))
    trainer.release_run_dir()
