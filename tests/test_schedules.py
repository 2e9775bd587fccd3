"""LR traces for every schedule, against closed-form formulas written independently here."""

from __future__ import annotations

import math

import pytest
import torch

from distrain.config import OptimConfig, SchedConfig
from distrain.train.optim import build_optimizer, build_scheduler, effective_lr

PEAK, TOTAL, WARM, FLOOR = 0.1, 40, 5, 0.01


def trace(sched: SchedConfig, total: int = TOTAL) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimConfig(name="sgd"), PEAK)
    s = build_scheduler(opt, sched, total, PEAK)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return lrs


def expected(name: str, step: int, warm: int = WARM) -> float:
    if step < warm:
        return PEAK * (step + 1) / warm
    p = (step - warm) / (TOTAL - warm)
    return {
        "constant": PEAK,
        "cosine": FLOOR + (PEAK - FLOOR) * (1 + math.cos(math.pi * p)) / 2,
        "linear": FLOOR + (PEAK - FLOOR) * (1 - p),
        "step": PEAK * 0.5 ** ((step - warm) // 10),
        "exponential": PEAK * 0.9 ** (step - warm),
    }[name]


@pytest.mark.parametrize("name", ["constant", "cosine", "linear", "step", "exponential"])
def test_lr_trace_with_warmup(name):
    cfg = SchedConfig(name=name, warmup_steps=WARM, min_lr=FLOOR, step_size=10,
                      gamma=0.5 if name == "step" else 0.9)
    got = trace(cfg)
    want = [expected(name, s) for s in range(TOTAL)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[WARM - 1] == pytest.approx(PEAK)  # warmup ends at the peak


def test_warmup_ratio_and_no_warmup():
    got = trace(SchedConfig(name="cosine", warmup_ratio=0.125, min_lr=FLOOR))
    assert got == pytest.approx([expected("cosine", s, warm=5) for s in range(TOTAL)])
    got = trace(SchedConfig(name="linear", min_lr=FLOOR))
    assert got[0] == pytest.approx(PEAK) and got[-1] == pytest.approx(FLOOR + (PEAK - FLOOR) / TOTAL)


def test_scale_lr_rules():
    assert effective_lr(OptimConfig(lr=0.1, scale_lr="linear", base_batch=256), 1024) == pytest.approx(0.4)
    assert effective_lr(OptimConfig(lr=0.1, scale_lr="sqrt", base_batch=256), 1024) == pytest.approx(0.2)
    assert effective_lr(OptimConfig(lr=0.1), 1024) == 0.1


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.1), 1e-3)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}
