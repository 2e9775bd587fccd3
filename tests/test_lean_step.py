"""The step path stays lean, and `distrain bench` / `distrain profile` run the training loop's own steps.

Timings swing with the machine's load, so leanness is checked by counting Python calls per step,
which do not: distrain's loop may make no more of them than a plain PyTorch loop over the same
model and batches (benchmarks/overhead.py measures the time).
"""

from __future__ import annotations

import cProfile
import math
import pstats

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from distrain.config import OptimConfig
from distrain.parallel import launch
from distrain.recipe import resolve_config
from distrain.tools import bench, profiling
from distrain.train.data import BatchPlan, as_dataset
from distrain.train.optim import build_optimizer, param_groups
from distrain.train.trainer import Trainer

from helpers import TINY_HAR, weights

BATCH, FIRST, LAST = 32, 10, 30  # steps FIRST+1 .. LAST are counted: warm caches, two log rows among them


def _calls(run) -> float:
    prof = cProfile.Profile()
    run(prof)
    return pstats.Stats(prof).total_calls / (LAST - FIRST)


def _plain_loop_calls(cfg, recipe) -> float:
    """A hand-written loop: the recipe's model, AdamW, warmup + cosine, clipping, the loss read each step."""
    splits = recipe.load_datasets(cfg)
    train = as_dataset(splits.train)
    plan = BatchPlan(num_samples=len(train), micro_batch=BATCH, grad_accum=1, world_size=1, rank=0, seed=0)
    order = plan.order(0)
    batches = [order[i * BATCH : (i + 1) * BATCH].tolist() for i in range(LAST)]
    model = recipe.bind(cfg, splits.info).build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / LAST)))

    def run(prof: cProfile.Profile) -> None:
        loader = torch.utils.data.DataLoader(train, batch_sampler=batches, collate_fn=lambda b: b)
        for i, batch in enumerate(loader):
            if i == FIRST:
                prof.enable()
            loss = F.cross_entropy(model(batch["x"]), batch["y"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            loss.item()
        prof.disable()

    return _calls(run)


def _distrain_calls(tmp_path) -> float:
    cfg, recipe = resolve_config(["recipe=har", f"data.batch_size={BATCH}", f"train.max_steps={LAST + 1}",
                                  "log.progress=false", f"output_dir={tmp_path}"])  # fmt: skip
    trainer = Trainer(cfg, recipe)
    step = trainer.train_step

    def counted(prof: cProfile.Profile):
        def train_step(micro, count):  # called with state.step = 0, 1, ...: the loop around it is counted too
            if trainer.state.step == FIRST:
                prof.enable()
            elif trainer.state.step == LAST:
                prof.disable()
            return step(micro, count)

        trainer.train_step = train_step  # type: ignore[method-assign]
        trainer.train()

    return _calls(counted)


def test_the_loop_makes_no_more_python_calls_per_step_than_a_plain_loop(tmp_path):
    cfg, recipe = resolve_config(["recipe=har"])
    plain = _plain_loop_calls(cfg, recipe)
    ours = _distrain_calls(tmp_path)
    assert ours <= plain, f"distrain {ours:.0f} Python calls per step, a plain loop {plain:.0f}"


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_cpu_optimizers_run_multi_tensor_with_the_per_parameter_loops_arithmetic(name):
    """On CPU distrain's optimizers take torch's foreach path (one call per operation, not per
    parameter and operation), and end bitwise where torch's default per-parameter loop ends."""
    cfg, recipe = resolve_config(["recipe=har", f"optim.name={name}"])
    splits = recipe.load_datasets(cfg)
    bound = recipe.bind(cfg, splits.info)
    torch.manual_seed(0)
    ours_model = bound.build_model()
    ref_model = bound.build_model()
    ref_model.load_state_dict(ours_model.state_dict())
    o = OptimConfig(name=name, weight_decay=0.05)
    ours = build_optimizer(ours_model, o, lr=2e-3)
    kinds = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
    groups = param_groups(ref_model, o.weight_decay)
    ref = kinds[name](groups, lr=2e-3) if name in kinds else torch.optim.SGD(groups, lr=2e-3, momentum=o.momentum)
    assert all(g["foreach"] for g in ours.param_groups) and not any(g["foreach"] for g in ref.param_groups)
    data = splits.train
    for step in range(4):
        x, y = data["x"][step * 16 : (step + 1) * 16], data["y"][step * 16 : (step + 1) * 16]
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            torch.manual_seed(step)  # the same dropout
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)


def _steps(trainer: Trainer, n: int) -> None:
    runner = bench.StepRunner(trainer)
    for _ in range(n):
        runner.step()


def test_bench_steps_are_the_training_loops_steps(tmp_path):
    """Steps run by bench/profile are the loop's: same batches (the short last one of an epoch
    included), same dropout, same schedule, on into the next epoch: the same weights after them."""
    args = [*TINY_HAR, "data.batch_size=256", "data.drop_last=false", "train.max_steps=11"]
    cfg, recipe = resolve_config([*args, f"output_dir={tmp_path / 'loop'}"])
    Trainer(cfg, recipe).train()  # 2460 samples: 9 full steps and a short one per epoch, then one more
    cfg, recipe = resolve_config([*args, f"output_dir={tmp_path / 'bench'}"])
    trainer = Trainer(cfg, recipe)
    assert trainer.plan.steps_per_epoch == 10
    _steps(trainer, 11)
    s = trainer.state
    assert (s.step, s.epoch, s.consumed) == (11, 1, 256)
    ref = weights(tmp_path / "loop")
    ours = trainer.backend.full_state_dict(trainer.model)
    assert ref.keys() == ours.keys()
    for k in ref:
        assert torch.equal(ref[k], ours[k]), k


@pytest.fixture
def teardown_log(monkeypatch) -> list[int]:
    """Fails accelerate's end_training (it destroys the process group under peers that may still be
    writing) and records the exit codes passed to launch.leave_process_group."""
    left: list[int] = []

    def refuse(self):
        raise AssertionError("end_training destroys the process group; leave it as a training run does")

    def leave(code: int) -> int:
        left.append(code)
        return code

    monkeypatch.setattr(Accelerator, "end_training", refuse)
    monkeypatch.setattr(launch, "leave_process_group", leave)
    return left


def test_bench_leaves_the_process_group_as_training_does(tmp_path, capsys, teardown_log):
    assert bench.main(["--one", "--steps", "1", "--warmup", "0", *TINY_HAR]) == 0
    assert teardown_log == [0]
    assert capsys.readouterr().out.startswith("RESULT ")


def test_profile_leaves_the_process_group_as_training_does(tmp_path, teardown_log):
    out = tmp_path / "prof"
    assert profiling.main([*TINY_HAR, f"output_dir={out}", "--steps", "1", "--warmup", "0", "--top", "3"]) == 0
    assert teardown_log == [0]
    assert (out / "profile").is_dir() and not (out / ".lock").exists()  # the run dir is let go, as a run lets it go


def test_cpu_models_above_the_multi_tensor_limit_step_per_parameter(monkeypatch):
    """foreach holds its temporaries for all parameters at once (a copy of them): large CPU models
    take torch's per-parameter loop, the same arithmetic, with one parameter's temporaries at a time."""
    from distrain.train import optim

    monkeypatch.setattr(optim, "MULTI_TENSOR_MAX", 10)
    assert optim.multi_tensor(torch.nn.Linear(2, 2)) is True  # 6 parameters
    assert optim.multi_tensor(torch.nn.Linear(4, 4)) is None  # 20: torch's default, the loop on CPU
