"""Loss normalisation by loss terms, the recipe's collate, and evaluation of ragged and dict outputs.

The recipe is tests/token_recipe.py: variable-length token lists padded by its collate, a per-token
loss [B, T] with a padding mask and loss_terms. With SGD(lr=1, no momentum, no decay, no clipping)
one applied step moves every parameter by minus its gradient, which is compared with the gradient
of one big batch's token-mean loss computed in plain PyTorch (cross_entropy with ignore_index).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distrain.errors import ConfigError
from distrain.recipe import StepOutput, load_recipe, resolve_config
from distrain.train.gather import gather_outputs
from distrain.train.trainer import Trainer

from helpers import BIN, REPO, free_port, metrics_rows

RECIPE = str(REPO / "tests" / "token_recipe.py")
SGD = ["optim.name=sgd", "optim.lr=1.0", "optim.momentum=0", "optim.weight_decay=0", "train.clip_norm=0",
       "sched.name=constant", "sched.warmup_ratio=0", "log.progress=false", "data.num_workers=0"]  # fmt: skip


def make_trainer(tmp_path, extra=(), recipe=None):
    cfg, loaded = resolve_config([f"recipe={RECIPE}", f"output_dir={tmp_path}", *SGD, *extra])
    return Trainer(cfg, recipe or loaded)


def token_mean_grad(model, batch, ignore=True):
    """Plain PyTorch: the gradient of one big batch's mean over its counted tokens."""
    ref = copy.deepcopy(model)
    ref.zero_grad()
    logits = ref(batch["x"]).transpose(1, 2)
    y = batch["y"] if ignore else batch["y"].clamp(min=0)
    F.cross_entropy(logits, y, ignore_index=-100).backward()
    return {n: p.grad.detach().clone() for n, p in ref.named_parameters()}


def update(trainer, before):
    return {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}


def assert_grads(got, want, what):
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6, msg=f"{n}: {what}")


def test_accumulated_token_loss_equals_big_batch_token_mean(tmp_path):
    """Two micro-batches with unequal token counts: the step's gradient is the big batch's token mean,
    not the mean of per-sample sums over the sample count."""
    trainer = make_trainer(tmp_path, ["train.grad_accum=2", "data.batch_size=3"])
    data, collate = trainer.datasets["train"], trainer.recipe.collate
    micro = [collate([data[i] for i in range(0, 3)]), collate([data[i] for i in range(3, 6)])]
    counts = [int((b["y"] != -100).sum()) for b in micro]
    assert counts[0] != counts[1] and micro[0]["x"].shape[1] != micro[1]["x"].shape[1]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    big = collate([data[i] for i in range(6)])
    want = token_mean_grad(trainer.model, big)
    with torch.no_grad():
        want_loss = F.cross_entropy(trainer.model(big["x"]).transpose(1, 2), big["y"], ignore_index=-100)
    result = trainer.train_step(micro, global_count=6)
    assert result.applied
    assert_grads(update(trainer, before), want, f"micro-batches of {counts} tokens")
    assert float(result.loss) == pytest.approx(float(want_loss), rel=1e-6)  # the logged loss: the token mean


def test_loss_terms_contradicting_the_mask_stops_the_step(tmp_path):
    trainer = make_trainer(tmp_path, ["train.grad_accum=1", "data.batch_size=3"])
    good = trainer.recipe.loss_terms
    trainer.recipe = dataclasses.replace(trainer.recipe, loss_terms=lambda batch: good(batch) + 1)
    batch = trainer.recipe.collate([trainer.datasets["train"][i] for i in range(3)])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ConfigError, match=r"differ from loss_terms\(cfg, info, batch\) by 1 terms"):
        trainer.train_step([batch], global_count=3)
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # no optimizer step
    trainer.recipe = dataclasses.replace(trainer.recipe, loss_terms=lambda batch: 2.5)
    with pytest.raises(ConfigError, match=r"loss_terms\(cfg, info, batch\) returned 2.5"):
        trainer.train_step([batch], global_count=3)


def test_mask_without_loss_terms_is_refused_before_anything_is_written(tmp_path):
    recipe = load_recipe(RECIPE)
    recipe.loss_terms = None
    with pytest.raises(ConfigError, match=r"StepOutput.mask but the recipe defines no loss_terms"):
        make_trainer(tmp_path / "run", recipe=recipe)
    assert not (tmp_path / "run").exists()


def test_per_token_loss_without_mask_counts_every_term(tmp_path):
    """No loss_terms, no mask: a [B, T] loss is divided by samples x T; a T that differs is refused."""
    trainer = make_trainer(tmp_path, ["train.grad_accum=2", "data.batch_size=2"])
    step = trainer.recipe.step

    def unmasked(model, batch):
        out = step(model, batch)
        return StepOutput(loss=out.loss)

    trainer.recipe = dataclasses.replace(trainer.recipe, loss_terms=None, step=unmasked)
    data, collate = trainer.datasets["train"], trainer.recipe.collate
    same = [i for i in range(len(data)) if len(data[i]["tokens"]) == len(data[0]["tokens"])][:4]
    assert len(same) == 4
    micro = [collate([data[i] for i in same[:2]]), collate([data[i] for i in same[2:]])]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    want = token_mean_grad(trainer.model, collate([data[i] for i in same]), ignore=False)
    assert trainer.train_step(micro, global_count=4).applied
    assert_grads(update(trainer, before), want, "unmasked [B, T] loss")
    ragged = [collate([data[i] for i in range(2)]), collate([data[i] for i in range(2, 4)])]
    assert ragged[0]["x"].shape[1] != ragged[1]["x"].shape[1]
    with pytest.raises(ConfigError, match="terms per sample"):
        trainer.train_step(ragged, global_count=4)


def test_evaluation_of_ragged_and_dict_outputs_in_one_process(tmp_path):
    """13 samples in batches of 4 padded to their own longest: each sample once, as its batch gave it."""
    trainer = make_trainer(tmp_path, ["data.eval_batch_size=4"])
    val, collate = trainer.datasets["val"], trainer.recipe.collate
    result = trainer.evaluate("val")
    assert isinstance(result.preds, dict) and torch.equal(result.preds["id"], torch.arange(13))
    assert isinstance(result.targets, list) and len(result.targets) == 13
    for i, row in enumerate(result.targets):
        start = i - i % 4
        width = max(len(val[j]["tokens"]) for j in range(start, min(start + 4, 13)))
        want_row = F.pad(collate([val[i]])["y"][0], (0, width - len(val[i]["tokens"])), value=-100)
        assert torch.equal(row, want_row)
    whole = collate([val[i] for i in range(13)])
    with torch.no_grad():
        logits = trainer.model(whole["x"])
    want_loss = F.cross_entropy(logits.transpose(1, 2), whole["y"], ignore_index=-100)
    keep = whole["y"] != -100
    m = result.metrics
    assert m["loss"] == pytest.approx(float(want_loss), rel=1e-6)
    assert m["accuracy"] == pytest.approx(float((logits.argmax(-1)[keep] == whole["y"][keep]).float().mean()))
    assert (m["samples"], m["labels"], m["ids_in_order"], m["ragged"]) == (13, int(keep.sum()), 1.0, 1.0)


def test_collate_trains_samples_default_collation_cannot_batch(tmp_path):
    cfg, recipe = resolve_config([f"recipe={RECIPE}", f"output_dir={tmp_path}", "train.max_steps=3", "log.every=1",
                                  "log.progress=false", "data.num_workers=1"])  # fmt: skip
    trainer = Trainer(cfg, recipe)
    trainer.train()
    losses = [r["loss"] for r in metrics_rows(trainer.run_dir) if "loss" in r]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)


def test_gather_keeps_uniform_outputs_one_tensor():
    """Uniform rows come back as one tensor, bitwise what the parts held (bool included)."""
    parts = [torch.randn(4, 3), torch.randn(2, 3)]
    valid = torch.tensor([True] * 5 + [False])
    got = gather_outputs(parts, valid, 1, "x")
    assert torch.equal(got, torch.cat(parts)[:5])
    flags = gather_outputs([{"b": torch.tensor([True, False])}, {"b": torch.tensor([True])}], valid, 1, "x")
    assert flags["b"].dtype == torch.bool and flags["b"].tolist() == [True, False, True]
    with pytest.raises(ConfigError, match="different keys"):
        gather_outputs([{"a": torch.ones(1)}, {"b": torch.ones(1)}], valid, 1, "x")


@pytest.mark.multiproc
def test_two_ranks_accumulation_and_uneven_evaluation(tmp_path):
    """2-process DDP, 2 micro-batches a rank, all with unequal label counts: the update is one big batch's
    token-mean gradient; evaluation of 13 samples over 2 ranks equals the whole split in one process."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch_configs" / "cpu_ddp.yaml"),
           "--main_process_port", str(free_port()), str(REPO / "tests" / "loss_terms_script.py"), str(out),
           f"recipe={RECIPE}", f"output_dir={tmp_path / 'run'}", *SGD, "data.batch_size=2", "train.grad_accum=2",
           "data.eval_batch_size=4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    terms = [json.loads((out / f"rank{r}.json").read_text())["terms"] for r in range(2)]
    assert len({t for rank in terms for t in rank}) > 1, terms  # unequal counts across micro-batches and ranks
    assert sum(terms[0]) != sum(terms[1]), terms
    errors = [json.loads((out / f"rank{r}.json").read_text())["error"] for r in range(2)]
    assert all(e and "terms per sample" in e for e in errors), errors  # both ranks, not only the odd one
    res = json.loads((out / "result.json").read_text())
    recipe = load_recipe(RECIPE)
    cfg, _ = resolve_config([f"recipe={RECIPE}"])
    splits = recipe.build_datasets(cfg)
    model = recipe.build_model(cfg, splits.info)
    before, after = load_file(str(out / "before.safetensors")), load_file(str(out / "after.safetensors"))
    model.load_state_dict(before)
    collate = recipe.bind(cfg, splits.info).collate
    train, val = splits.train, splits.val
    want = token_mean_grad(model, collate([train[i] for i in res["step_samples"]]))
    assert_grads({n: before[n] - after[n] for n in want}, want, f"2 ranks, micro-batch label counts {terms}")
    model.load_state_dict(after)
    whole = collate([val[i] for i in range(len(val))])
    with torch.no_grad():
        logits = model(whole["x"])
    keep = whole["y"] != -100
    m = res["metrics"]
    assert m["loss"] == pytest.approx(float(F.cross_entropy(logits.transpose(1, 2), whole["y"])), rel=1e-6)
    assert m["accuracy"] == pytest.approx(float((logits.argmax(-1)[keep] == whole["y"][keep]).float().mean()))
    assert (m["samples"], m["labels"], m["ids_in_order"], m["ragged"]) == (13, int(keep.sum()), 1.0, 1.0)
    assert res["ids"] == list(range(13))
    for i, row in enumerate(res["targets"]):  # each sample once, its labels then its batch's padding
        n = len(val[i]["tokens"])
        assert row[: n - 1] == val[i]["tokens"][1:] and set(row[n - 1 :]) == {-100}
