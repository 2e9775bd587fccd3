"""Config parsing, overrides, --help, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from distrain.cli import main
from distrain.config import parse_overrides
from distrain.errors import ConfigError
from distrain.recipe import resolve_config

from helpers import REPO, RUN_PY


def test_override_values_parse_as_yaml():
    o = parse_overrides(["optim.lr=3e-4", "train.max_epochs=5", "log.tensorboard=true", "output_dir=null",
                         "optim.betas=[0.8, 0.95]", "recipe=har"])
    assert o == {"optim.lr": 3e-4, "train.max_epochs": 5, "log.tensorboard": True, "output_dir": None,
                 "optim.betas": [0.8, 0.95], "recipe": "har"}


def test_resolve_layers_recipe_yaml_then_overrides():
    cfg, recipe = resolve_config(["recipe=har", "optim.lr=3e-4", "data.batch_size=128", "precision=bf16",
                                  "optim.betas=[0.8,0.95]", "model.depth=3"])
    assert recipe.name == "har"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 128 and cfg.precision == "bf16"
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.model.depth == 3
    har_yaml = yaml.safe_load((REPO / "recipes" / "har.yaml").read_text())
    assert cfg.train.max_epochs == har_yaml["train"]["max_epochs"]  # recipe layer over framework default
    assert cfg.train.metric == har_yaml["train"]["metric"]


def test_config_file_layer_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: har\ntrain:\n  max_epochs: 7\noptim:\n  lr: 0.01\n")
    cfg, _ = resolve_config([f"config={f}", "optim.lr=0.02"])
    assert cfg.train.max_epochs == 7 and cfg.optim.lr == 0.02


@pytest.mark.parametrize(
    "args, expected",
    [
        (["optim.lrr=1"], ["'optim.lrr'", "closest valid key: optim.lr"]),
        (["trian.max_epochs=3"], ["'trian.max_epochs'", "closest valid key: train.max_epochs"]),
        (["train.max_epochs=abc"], ["train.max_epochs='abc'", "must be an integer"]),
        (["optim.name=adamm"], ["optim.name='adamm'", "adamw, adam, sgd", "did you mean 'adam"]),
        (["precision=fp8"], ["precision='fp8'", "no, fp16, bf16"]),
        (["optim.lr=-1"], ["optim.lr=-1", "> 0"]),
        (["optim.betas=0.9"], ["optim.betas=0.9", "list"]),
        (["data.source=uci_har", "data.path=/no/such/dir"], ["data.path=/no/such/dir", "does not exist"]),
        (["nonsense"], ["'nonsense'", "key=value"]),
    ],
)
def test_bad_input_one_line_exit_2(args, expected, capsys):
    code = main(["run", "recipe=har", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    for part in expected:
        assert part in err, err


def test_unknown_recipe_lists_available(capsys):
    assert main(["run", "recipe=harr"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe='harr'" in err and "did you mean har" in err and "available: " in err


def test_bad_input_writes_nothing(tmp_path):
    """A real process: exit code 2, one stderr line, no run directory anywhere."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(RUN_PY), "recipe=har", f"output_dir={out}", "train.max_epohcs=2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown key 'train.max_epohcs'")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_uci_files_is_exit_2_and_nothing_written(tmp_path):
    empty = tmp_path / "uci"
    empty.mkdir()
    out = tmp_path / "run"
    code = main(["run", "recipe=har", "data.source=uci_har", f"data.path={empty}", f"output_dir={out}"])
    assert code == 2 and not out.exists()


def test_help_lists_every_key_with_type_default_and_description(capsys):
    assert main(["run", "recipe=har", "--help", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    cfg, _ = resolve_config(["recipe=har"])
    from distrain.config import all_keys

    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    for key in all_keys(cfg):
        assert key in lines, key
        assert "#" in lines[key] and lines[key].split("#", 1)[1].strip(), f"{key} has no description"
    assert "optim.lr" in lines and "0.5" in lines["optim.lr"] and "(default 0.001)" in lines["optim.lr"]
    assert "adamw | adam | sgd" in lines["optim.name"]
    assert main(["run", "recipe=har", "print_config=true"]) == 0


def test_custom_recipe_file_by_path(tmp_path):
    recipe = tmp_path / "my_recipe.py"
    recipe.write_text((REPO / "recipes" / "har.py").read_text())
    _cfg, r = resolve_config([f"recipe={recipe}"])
    assert r.path == recipe and r.name == "my_recipe"


def test_recipe_missing_parts_is_config_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""A broken recipe."""\n')
    with pytest.raises(ConfigError, match="lacks ModelConfig"):
        resolve_config([f"recipe={bad}"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only behaviour")
def test_fp16_on_cpu_is_refused_not_silently_fp32(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "recipe=har", "precision=fp16", f"output_dir={out}"]) == 2
    assert "precision=fp16 needs a CUDA GPU" in capsys.readouterr().err and not out.exists()
