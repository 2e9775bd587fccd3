"""The recipe contract: what build_datasets learns (Splits.info) reaches every later recipe call,
each call gets the run's cfg, and checkpoints and exports carry the info so that load_model
builds the model without reading the data again."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import distrain
from distrain.checkpoint.export import export
from distrain.checkpoint.weights import save_weights
from distrain.recipe import resolve_config
from distrain.train.trainer import Trainer

# Every function appends what it received to calls.jsonl beside the recipe file.
RECIPE = textwrap.dedent('''
    """Records the cfg and info each recipe function receives."""
    import json
    from dataclasses import dataclass
    from pathlib import Path

    import torch

    from distrain import DataConfig as Base, Splits, StepOutput, opt

    LOG = Path(__file__).with_name("calls.jsonl")


    def record(fn, cfg, info, **extra):
        with LOG.open("a") as f:
            f.write(json.dumps({"fn": fn, "hidden": cfg.model.hidden, "info": info, **extra}) + "\\n")


    @dataclass
    class ModelConfig:
        hidden: int = opt(8, "hidden units")


    @dataclass
    class DataConfig(Base):
        pass


    def build_datasets(cfg):
        record("build_datasets", cfg, None)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 5, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        cols = lambda s: {"x": x[s], "y": y[s]}  # noqa: E731
        info = {"features": 5, "classes": 3, "pair": (1, 2)}  # the tuple comes back as JSON gives it: a list
        return Splits(train=cols(slice(0, 32)), val=cols(slice(32, 40)), test=cols(slice(40, 48)), info=info)


    def build_model(cfg, info):
        record("build_model", cfg, info)
        return torch.nn.Sequential(torch.nn.Linear(info["features"], cfg.model.hidden), torch.nn.ReLU(),
                                   torch.nn.Linear(cfg.model.hidden, info["classes"]))


    def SHARD_BLOCKS(cfg, info, model):
        record("SHARD_BLOCKS", cfg, info, model=type(model).__name__)
        return ("Linear",)


    def step(cfg, info, model, batch):
        record("step", cfg, info)
        logits = model(batch["x"])
        loss = torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")
        return StepOutput(loss=loss, preds=logits.argmax(-1), targets=batch["y"])


    def metrics(cfg, info, preds, targets):
        record("metrics", cfg, info)
        return {"score": float((preds == targets).float().mean())}


    def tokens(cfg, info, batch):
        record("tokens", cfg, info)
        return len(batch["x"])


    def report(cfg, info, run_dir, split, preds, targets):
        record("report", cfg, info, run_dir=str(run_dir), split=split, n=len(preds))
''')

INFO = {"features": 5, "classes": 3, "pair": [1, 2]}


def calls(folder: Path) -> list[dict]:
    path = folder / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(the recipe file, its run dir) after 2 steps with model.hidden=6 and activation checkpointing."""
    tmp = tmp_path_factory.mktemp("contract")
    recipe = tmp / "recording.py"
    recipe.write_text(RECIPE)
    run = tmp / "run"
    cfg, rec = resolve_config([f"recipe={recipe}", "model.hidden=6", "train.max_steps=2", "data.batch_size=8",
                               "train.metric=score", "train.mode=max", "train.activation_checkpointing=true",
                               "log.progress=false", f"output_dir={run}"])  # fmt: skip
    trainer = Trainer(cfg, rec)
    assert trainer.backend.shard_blocks == ("Linear",)  # what the SHARD_BLOCKS function returned
    trainer.train()
    return recipe, run


def test_info_and_cfg_reach_every_recipe_function(trained):
    recipe, run = trained
    seen = calls(recipe.parent)
    assert [c["fn"] for c in seen].count("build_datasets") == 1
    later = [c for c in seen if c["fn"] != "build_datasets"]
    assert {c["fn"] for c in later} == {"build_model", "SHARD_BLOCKS", "step", "metrics", "tokens", "report"}
    assert all(c["info"] == INFO and c["hidden"] == 6 for c in later), later
    assert next(c for c in later if c["fn"] == "SHARD_BLOCKS")["model"] == "Sequential"
    (rep,) = [c for c in later if c["fn"] == "report"]
    assert rep["split"] == "test" and rep["n"] == 8 and Path(rep["run_dir"]) == run


def test_checkpoint_and_export_carry_the_info_so_load_model_reads_no_data(trained, tmp_path):
    recipe, run = trained
    before = len(calls(recipe.parent))
    ckpt = run / "checkpoints" / "step_00000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["recipe_info"] == INFO
    out = export(run, tmp_path / "export")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["recipe_info"]) == INFO
    for folder in (run, ckpt, out):
        model = distrain.load_model(folder, trust_recipe=True)
        assert [m.out_features for m in model if isinstance(m, torch.nn.Linear)] == [6, 3]
    new = calls(recipe.parent)[before:]
    assert [c["fn"] for c in new] == ["build_model"] * 3 and all(c["info"] == INFO for c in new), new

    # A folder whose weights carry no info (an export by an older distrain): build_datasets supplies it.
    old = tmp_path / "old"
    old.mkdir()
    save_weights(load_file(str(out / "model.safetensors")), old / "model.safetensors")
    (old / "config.yaml").write_text((out / "config.yaml").read_text())
    distrain.load_model(old, trust_recipe=True)
    assert [c["fn"] for c in calls(recipe.parent)[before + 3 :]] == ["build_datasets", "build_model"]
