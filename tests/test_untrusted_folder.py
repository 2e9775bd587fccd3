"""A folder from someone else: `load_model` and `distrain export` run no code its config names.

Its config.yaml may name any .py file as the recipe, and importing that file runs it. Only
built-in recipes load by default; a recipe file needs trust_recipe=True / --trust-recipe.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import distrain
from distrain import checkpoint
from distrain.checkpoint.export import main as export_main
from distrain.checkpoint.weights import save_weights
from distrain.errors import ConfigError
from distrain.recipe import RECIPES_DIR, is_builtin_recipe

# A valid recipe (a 3 -> 2 linear model) that leaves a marker file when it is imported.
FOREIGN = textwrap.dedent('''
    """Someone else's recipe."""
    from dataclasses import dataclass
    from pathlib import Path

    import torch

    import distrain

    Path(__file__).with_name("MARKER").write_text("imported")


    @dataclass
    class ModelConfig:
        width: int = 3


    @dataclass
    class DataConfig(distrain.DataConfig):
        pass


    def build_model(cfg, info):
        return torch.nn.Linear(cfg.model.width, 2)


    def build_datasets(cfg):
        return distrain.Splits(train={}, val={})


    def step(cfg, info, model, batch):
        raise NotImplementedError


    def metrics(cfg, info, preds, targets):
        return {}
''')


@pytest.fixture
def foreign(tmp_path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(an export folder naming recipe file foreign.py, the marker path, the folder's weights)."""
    code = tmp_path / "theirs" / "foreign.py"
    code.parent.mkdir()
    code.write_text(FOREIGN)
    folder = tmp_path / "received"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"recipe": str(code), "model": {"width": 3}}))
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in torch.nn.Linear(3, 2).state_dict().items()}
    save_weights(state, folder / "model.safetensors")
    return folder, code.with_name("MARKER"), state


def test_load_model_refuses_a_recipe_file_without_trust(foreign):
    folder, marker, state = foreign
    with pytest.raises(ConfigError) as e:
        distrain.load_model(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / "config.yaml") in msg and "trust_recipe=True" in msg
    assert "foreign.py" in msg
    assert not marker.exists(), "the folder's recipe file ran"

    model = distrain.load_model(folder, trust_recipe=True)
    assert marker.exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_export_refuses_a_recipe_file_without_trust(foreign, tmp_path, capsys):
    folder, marker, state = foreign
    run = tmp_path / "run"
    config_text = (folder / "config.yaml").read_text()
    checkpoint.save_checkpoint(run, "step_00000001", state, {"state": {}, "param_groups": []}, {"step": 1}, config_text)
    checkpoint.flush_pending()
    out = tmp_path / "export"

    assert export_main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-recipe" in err[0] and "foreign.py" in err[0], err
    assert str(run / "checkpoints" / "step_00000001" / "config.yaml") in err[0]
    assert not out.exists() and not marker.exists()

    assert export_main([str(run), "--out", str(out), "--trust-recipe"]) == 0
    model = distrain.load_model(out, trust_recipe=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_built_in_recipes_load_without_trust(tmp_path, monkeypatch):
    har = RECIPES_DIR / "har.py"
    assert is_builtin_recipe("har") and is_builtin_recipe(str(har))
    assert is_builtin_recipe(str(RECIPES_DIR / ".." / "recipes" / "har.py"))
    monkeypatch.chdir(RECIPES_DIR.parent)
    assert is_builtin_recipe("recipes/har.py")
    monkeypatch.chdir(tmp_path)
    assert not is_builtin_recipe("recipes/har.py")  # a recipes/ folder of wherever the loader runs
    copy = tmp_path / "har.py"
    copy.write_text(har.read_text())
    assert not is_builtin_recipe(str(copy))
    link = tmp_path / "recipes" / "evil.py"
    link.parent.mkdir()
    link.symlink_to(copy)
    assert not is_builtin_recipe(str(link))
