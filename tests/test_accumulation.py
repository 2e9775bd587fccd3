"""Gradient of an optimizer step = mean over all its samples, whatever the micro-batch split.

With SGD(lr=1, no momentum, no decay, no clipping) one applied step moves every parameter by
exactly minus its gradient, so the update is compared with an independent big-batch gradient.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distrain.recipe import resolve_config
from distrain.train.data import BatchPlan
from distrain.train.trainer import Trainer

from helpers import NO_DROPOUT, TINY_HAR


def make_trainer(tmp_path, extra=()):
    cfg, recipe = resolve_config([*TINY_HAR, *NO_DROPOUT, f"output_dir={tmp_path}", "optim.name=sgd", "optim.lr=1.0",
                                  "optim.momentum=0", "optim.weight_decay=0", "train.clip_norm=0",
                                  "sched.name=constant", "sched.warmup_ratio=0", *extra])
    return Trainer(cfg, recipe)


def big_batch_grad(model, x, y):
    ref = copy.deepcopy(model)
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()  # mean over the whole batch
    return {n: p.grad.detach().clone() for n, p in ref.named_parameters()}


@pytest.mark.parametrize("sizes", [[16], [8, 8], [5, 3, 8], [1, 10, 2, 3]])
def test_accumulated_update_equals_big_batch_gradient(tmp_path, sizes):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [f"train.grad_accum={len(sizes)}"])
    data = trainer.datasets["train"]
    idx = list(range(100, 100 + sum(sizes)))
    full = data.__getitems__(idx)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    want = big_batch_grad(trainer.model, full["x"], full["y"])
    bounds = np.cumsum([0, *sizes])
    micro = [data.__getitems__(idx[a:b]) for a, b in itertools.pairwise(bounds)]
    assert trainer.train_step(micro, global_count=sum(sizes)).applied
    for n, p in trainer.model.named_parameters():
        got = before[n] - p.detach()
        torch.testing.assert_close(got, want[n], rtol=0, atol=1e-6, msg=f"{n} with micro-batches {sizes}")


def test_step_loss_is_mean_over_all_samples(tmp_path):
    trainer = make_trainer(tmp_path, ["train.grad_accum=2"])
    data = trainer.datasets["train"]
    a, b = data.__getitems__(list(range(0, 3))), data.__getitems__(list(range(3, 12)))
    with torch.no_grad():
        want = F.cross_entropy(trainer.model(torch.cat([a["x"], b["x"]])), torch.cat([a["y"], b["y"]])).item()
    loss = trainer.train_step([a, b], global_count=12).loss
    assert float(loss) == pytest.approx(want, rel=1e-6)  # not the mean of the two micro-batch means


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_batch_plan_is_world_size_independent(world, accum):
    ref = BatchPlan(num_samples=103, micro_batch=5, grad_accum=4, world_size=1, rank=0, seed=3)
    plans = [BatchPlan(num_samples=103, micro_batch=5 * 4 // (world * accum), grad_accum=accum,
                       world_size=world, rank=r, seed=3) for r in range(world)]
    for epoch in range(2):
        order = ref.order(epoch)
        assert sorted(order.tolist()) == list(range(103))
        assert not np.array_equal(order, ref.order(epoch + 1))
        for consumed in range(0, 100, 20):
            step = ref.step_samples(order, consumed)
            parts = [m for p in plans for m in p.micro_batches(p.step_samples(p.order(epoch), consumed))]
            assert sorted(np.concatenate(parts).tolist()) == sorted(step.tolist())
