"""data.batch_size=auto: the search, the CPU memory estimate, and a real run that keeps the global batch."""

from __future__ import annotations

import re

import pytest
import torch

from distrain.train.batch_size import largest_divisor_at_most, largest_fitting, saved_activation_bytes

from helpers import TINY_HAR, run_distrain, train_losses


@pytest.mark.parametrize("halving", [True, False])
@pytest.mark.parametrize("limit", [0, 1, 5, 64, 100, 1000])
def test_largest_fitting_matches_brute_force(halving, limit):
    cap = 100
    tried = []

    def fits(size):
        tried.append(size)
        return size <= limit

    found = largest_fitting(fits, cap, halving)
    # Reference: the largest candidate of the search's own ladder that fits, by enumeration.
    ladder = [cap // 2**k for k in range(8) if cap // 2**k >= 1] if halving else [min(2**k, cap) for k in range(8)]
    expected = max((s for s in ladder if s <= limit), default=0)
    assert found == expected
    assert all(s <= cap for s in tried)


def test_largest_divisor():
    for n, limit in [(96, 32), (96, 40), (7, 5), (256, 100), (10, 1)]:
        assert largest_divisor_at_most(n, limit) == max(d for d in range(1, limit + 1) if n % d == 0)


def test_saved_activation_bytes_matches_hand_count():
    d, h, o = 10, 20, 3
    model = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, o))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for b in (4, 16):
        x = torch.randn(b, d)
        # Saved for backward: the input of layer 1, the ReLU output (also layer 2's input), the square's input.
        assert saved_activation_bytes(lambda x=x: (model(x) ** 2).sum(), params) == 4 * b * (d + h + o)


def _activation_bytes(micro: int) -> int:
    """Independent count for the tiny har model: saved tensors of one forward+backward, params excluded."""
    from distrain.recipe import resolve_config

    cfg, recipe = resolve_config(TINY_HAR)
    splits = recipe.load_datasets(cfg)
    recipe = recipe.bind(cfg, splits.info)
    model = recipe.build_model()
    train = splits.train
    batch = {k: v[:micro].clone() for k, v in train.items()}  # own storage, like a loader batch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = recipe.step(model, batch).loss.mean()
    loss.backward()
    n_params = sum(p.numel() for p in model.parameters())
    inputs = sum(v.numel() * v.element_size() for v in batch.values())
    return sum(storages.values()) + n_params * 4 * 4 + inputs  # weights, grads, two AdamW slots


@pytest.mark.multiproc
def test_auto_batch_keeps_global_batch_and_fits_budget(tmp_path):
    budget_mb = 2.0
    auto = run_distrain([*TINY_HAR, "train.max_steps=3", "data.batch_size=auto", "data.global_batch=96",
                         f"data.auto_memory_mb={budget_mb}", f"output_dir={tmp_path / 'auto'}"])  # fmt: skip
    log = auto.stderr + auto.stdout
    m = re.search(r"batch\s+(\d+) micro x (\d+) accum x 1 ranks = 96 global", log)
    assert m, log[-3000:]
    micro, accum = int(m.group(1)), int(m.group(2))
    assert micro * accum == 96
    assert "auto batch" in log and f"micro-batch {micro}" in log
    # The pick fits the budget, and the next size up of the ladder (doubling to 96) would not.
    assert _activation_bytes(micro) <= budget_mb * 2**20
    largest_power = max(2**k for k in range(8) if 2**k <= micro)
    step_up = min(2 * largest_power, 96)
    assert step_up == micro or _activation_bytes(step_up) > budget_mb * 2**20
    # Same plan given by hand: identical losses, step by step.
    manual = tmp_path / "manual"
    run_distrain([*TINY_HAR, "train.max_steps=3", f"data.batch_size={micro}", f"train.grad_accum={accum}",
                  f"output_dir={manual}"])  # fmt: skip
    assert train_losses(tmp_path / "auto") == train_losses(manual)


@pytest.mark.multiproc
def test_auto_batch_too_small_budget_is_a_config_error(tmp_path):
    out = tmp_path / "never"
    proc = run_distrain([*TINY_HAR, "data.batch_size=auto", "data.auto_memory_mb=0.01", f"output_dir={out}"],
                        check=False)  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "data.auto_memory_mb=0.01" in lines[0]
    assert not out.exists()
