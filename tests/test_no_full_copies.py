"""No full copies of the model beyond the backend's own (issue 16): the best weights come back
from best/ on disk instead of an in-memory clone, DeepSpeed checkpoints hold each rank's own
ZeRO partition (and still resume exactly and reshard), and the consolidated weights are
gathered onto rank 0 only.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distrain import checkpoint as ck
from distrain.checkpoint import load as checkpoint_load
from distrain.checkpoint.export import export, load_weights_dir
from distrain.parallel.ddp import DDPBackend
from distrain.recipe import resolve_config
from distrain.train.trainer import Trainer

from helpers import TINY_HAR, metrics_rows, run_distrain, weights

# train.mode=min on accuracy makes an early evaluation the best one, so the end restores it.
BEST = [*TINY_HAR, "sched.name=constant", "sched.warmup_ratio=0", "train.eval_every=5", "train.mode=min",
        "train.max_steps=15"]  # fmt: skip


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _train(run_dir: Path, *extra: str) -> tuple[Trainer, dict]:
    cfg, recipe = resolve_config([*BEST, *extra, f"output_dir={run_dir}"])
    trainer = Trainer(cfg, recipe)
    return trainer, trainer.train()


def test_with_save_best_the_best_weights_come_from_best_on_disk_not_from_memory(tmp_path):
    on, got = _train(tmp_path / "on")
    off, want = _train(tmp_path / "off", "ckpt.save_best=false")  # the in-memory copy: the reference
    assert 0 < got["best_step"] == want["best_step"] < 15
    assert on.best_weights is None  # nothing held in memory: best/ holds them
    assert off.best_weights is not None  # without best/: this rank's copy (one process: the whole model)
    assert got["test"] == want["test"]
    best = weights(on.run_dir, "best_model.safetensors")
    assert_same_weights(best, weights(off.run_dir, "best_model.safetensors"))
    assert_same_weights(best, checkpoint_load.full_model_state(on.run_dir / "checkpoints" / "best"))


def test_only_rank_0_gets_the_consolidated_weights_under_ddp():
    model = torch.nn.Linear(3, 2)
    for rank, want in ((0, set(model.state_dict())), (1, set())):
        accelerator = SimpleNamespace(num_processes=2, process_index=rank, device=torch.device("cpu"))
        assert set(DDPBackend(accelerator, None).full_state_dict(model)) == want  # type: ignore[arg-type]


# ---------------------------------------------------------------- DeepSpeed ZeRO-2, 2 processes

ZERO = [*TINY_HAR, "data.batch_size=32", "train.max_steps=20", "ckpt.every_steps=10"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_rows(run_dir) if "loss" in r}


def _flat_run(shape: list[int], piece: dict) -> tuple[int, int]:
    """The run of the row-major flattened tensor a piece covers (a ZeRO block is one such run)."""
    start = 0
    for o, n in zip(piece["offset"], shape, strict=True):
        start = start * n + o
    return start, start + math.prod(piece["shape"])


def assert_each_rank_holds_its_partition(path: Path, world: int) -> None:
    """Each parameter group's weights and Adam moments are split as ZeRO partitions them: rank r's
    file holds one contiguous run of the group's flattened parameters, the ranks' runs follow each
    other in rank order and tile the group, and the moments lie where the weights do."""
    index = ck.read_json(path / ck.INDEX)
    tensors, split = index["tensors"], False
    for group in index["optim"]["param_groups"]:
        owned: dict[str, list[tuple[int, int]]] = {ck.shard_name(r): [] for r in range(world)}
        base = 0
        for name in group["params"]:
            entry = tensors[f"model.{name}"]
            split |= len({p["file"] for p in entry["pieces"]}) > 1
            for p in entry["pieces"]:
                a, b = _flat_run(entry["shape"], p)
                owned[p["file"]].append((base + a, base + b))
            for moment in ("exp_avg", "exp_avg_sq"):
                assert tensors[f"optim.{name}.{moment}"]["pieces"] == entry["pieces"], (name, moment)
            base += math.prod(entry["shape"])
        end = 0
        for r in range(world):
            for a, b in sorted(owned[ck.shard_name(r)]):  # contiguous, right after the previous rank's run
                assert a == end, (group["params"], r, sorted(owned[ck.shard_name(r)]))
                end = b
        assert end == base
    assert split, "no tensor is split between ranks: whole tensors were written, not partitions"


@pytest.mark.multiproc
def test_zero2_checkpoints_hold_each_ranks_partition_resume_exactly_and_reshard(tmp_path):
    z2 = tmp_path / "z2"
    run_distrain([*ZERO, f"output_dir={z2}"], "cpu_zero2")
    step10 = z2 / "checkpoints" / ck.step_name(10)
    assert_each_rank_holds_its_partition(step10, world=2)
    # the same partitioning: exact (losses and final weights)
    run_distrain([*ZERO, f"output_dir={tmp_path / 'z2_resumed'}", f"resume={step10}"], "cpu_zero2")
    want, got = _losses(z2), _losses(tmp_path / "z2_resumed")
    assert sorted(got) == list(range(11, 21)) and all(got[s] == want[s] for s in got)
    assert_same_weights(weights(tmp_path / "z2_resumed"), weights(z2))
    # resharded to one process and to DDP: the weights loaded are exactly the checkpoint's
    saved = checkpoint_load.full_model_state(step10)
    run_distrain([*ZERO, "train.grad_accum=2", "train.max_steps=10", f"output_dir={tmp_path / 'one'}",
                  f"resume={step10}"])  # fmt: skip
    assert_same_weights(weights(tmp_path / "one"), saved)
    run_distrain([*ZERO, f"output_dir={tmp_path / 'ddp'}", f"resume={step10}"], "cpu_ddp")
    got = _losses(tmp_path / "ddp")  # same ranks, same dropout: DDP continues the ZeRO-2 run
    assert sorted(got) == list(range(11, 21)) and max(abs(got[s] - want[s]) for s in got) <= 1e-5
    # the final weights (gathered to rank 0 tensor by tensor) equal the partitions consolidated
    assert_same_weights(load_weights_dir(export(z2, tmp_path / "export")), weights(z2))


@pytest.mark.multiproc
def test_zero3_restores_the_best_weights_from_best_on_disk_into_the_weights_the_forward_uses(tmp_path):
    """ZeRO-3 at the end of a run whose best evaluation came early: the best weights read back from
    best/ (each rank its own partition) are also the ones the test split's forward uses, the
    parameters ZeRO-3 keeps gathered after a forward included: DDP (same ranks, same dropout) is
    the reference."""
    run_distrain([*BEST, f"output_dir={tmp_path / 'zero3'}"], "cpu_zero3")
    run_distrain([*BEST, f"output_dir={tmp_path / 'ddp'}"], "cpu_ddp")
    got, want = (ck.read_json(tmp_path / name / "summary.json") for name in ("zero3", "ddp"))
    assert 0 < got["best_step"] == want["best_step"] < 15
    assert abs(got["test"]["loss"] / want["test"]["loss"] - 1) < 1e-5, (got["test"], want["test"])
    best = weights(tmp_path / "zero3", "best_model.safetensors")
    assert_same_weights(best, checkpoint_load.full_model_state(tmp_path / "zero3" / "checkpoints" / "best"))
