"""Sharded construction (parallel.fsdp_meta_init): the model is built on meta, each rank materialises its shards.

The promise: the initial weights are bitwise those of an eager build with the same seed (the
reference is the eager build itself, seeded as the trainer seeds it), the random state after it
is the eager build's too, and no rank holds the whole model while building it. In-process: the
record and replay on every shipped recipe's model and on a transformers Llama, the eager fallback
where a constructor cannot be replayed, the launch config's fsdp_cpu_ram_efficient_loading and
fsdp_state_dict_type. One real FSDP2 launch (2 processes) checks the shards against the eager build.

Run as a script (`accelerate launch ... tests/test_meta_init.py OUT key=value...`) it builds a
Trainer without training and writes the consolidated initial weights to OUT.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from distrain.errors import ConfigError, LaunchError
from distrain.parallel import meta_init
from distrain.parallel.launch import resolve_plan
from distrain.recipe import resolve_config

from helpers import BIN, REPO, TINY_HAR, free_port

SCRIPT = Path(__file__).resolve()


def _eager_and_meta(build, seed: int = 0):
    """(eager state dict, the CPU random draw after it, the meta-built Construction, its draw after)."""
    torch.manual_seed(seed)
    eager = build().state_dict()
    after_eager = torch.rand(4)
    torch.manual_seed(seed)
    built = meta_init.build_model(build, on_meta=True)
    if built.deferred is None:
        return eager, after_eager, built, None
    assert any(p.is_meta for p in built.model.parameters()), "built on meta"
    torch.rand(3)  # a draw between building and materialising must not change the weights
    built.deferred.materialise(built.model, torch.device("cpu"))
    return eager, after_eager, built, torch.rand(4)


def _assert_bitwise(eager: dict[str, torch.Tensor], model: nn.Module) -> None:
    got = model.state_dict()
    assert got.keys() == eager.keys()
    differ = [k for k in eager if not torch.equal(got[k], eager[k])]
    assert not differ, f"materialised weights differ from the eager build: {differ[:5]}"


def _recipe_build(argv: list[str]):
    return _bound_build(tuple(argv))


@functools.cache
def _bound_build(argv: tuple[str, ...]):
    """The recipe's build_model with its data's info, loaded once per setting."""
    cfg, recipe = resolve_config(list(argv))
    info = recipe.load_datasets(cfg).info
    return recipe.bind(cfg, info).build_model


@pytest.mark.parametrize("argv", [
    ["recipe=har"],  # a pre-norm transformer: conv stem, zero-initialised position parameter, blocks
    ["recipe=traffic", "model.arch=transformer"],  # nn.TransformerEncoder: one layer deep-copied, randn * 0.02
    ["recipe=traffic"],  # GRUs
    ["recipe=pharma"],  # embeddings
    ["recipe=regression"],
    ["recipe=pests", "model.width=8"],  # a ResNet with GroupNorm
], ids=lambda a: " ".join(a))  # fmt: skip
def test_meta_construction_replays_the_eager_build_bitwise(argv: list[str]):
    eager, after_eager, built, after = _eager_and_meta(_recipe_build(argv))
    assert built.deferred is not None, built.fallback
    _assert_bitwise(eager, built.model)
    assert torch.equal(after, after_eager), "the random stream after the build is not the eager build's"


def test_pretrained_weights_read_in_build_model_are_replayed(tmp_path: Path):
    """pests' model.pretrained: load_weights reads real tensors, copied into the meta parameters by the replay."""
    from safetensors.torch import load_file, save_file

    base = ["recipe=pests", "model.width=8"]
    build = _recipe_build(base)
    torch.manual_seed(5)
    save_file({k: v + 1 for k, v in build().state_dict().items()}, str(tmp_path / "pre.safetensors"))
    pretrained = _recipe_build([*base, f"model.pretrained={tmp_path}/pre.safetensors"])
    eager, after_eager, built, after = _eager_and_meta(pretrained)
    assert built.deferred is not None, built.fallback
    _assert_bitwise(eager, built.model)
    assert torch.equal(after, after_eager)
    read = load_file(str(tmp_path / "pre.safetensors"))
    assert all(torch.equal(eager[k], read[k]) for k in read if not k.startswith("head."))


def test_a_transformers_llama_is_replayed_bitwise():
    """transformers skips its weight init under a meta device context: the record must not use one."""
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300)  # fmt: skip
    eager, after_eager, built, after = _eager_and_meta(lambda: transformers.LlamaForCausalLM(conf))
    assert built.deferred is not None, built.fallback
    _assert_bitwise(eager, built.model)
    assert torch.equal(after, after_eager)
    # Every layer is initialised twice (its constructor, then post_init): the first values are dropped at
    # the overwrite, so what is alive at once stays near the largest tensor (embeddings, head), not the model.
    d = built.deferred
    largest = max(p.numel() * p.element_size() for p in built.model.parameters())
    assert d.peak_bytes <= 2 * largest < d.total_bytes / 2, (d.peak_bytes, largest, d.total_bytes)


def test_construction_holds_less_than_the_model_at_once():
    """The replay frees each storage after its last use: at most part of the model exists at once."""
    _, _, built, _ = _eager_and_meta(_recipe_build(["recipe=har"]))
    d = built.deferred
    assert d is not None
    total = sum(p.numel() * p.element_size() for p in built.model.parameters())
    assert d.total_bytes == total
    assert 0 < d.peak_bytes < total / 2, (d.peak_bytes, total)
    assert "meta: each rank materialised only its shards" in built.note()


class _RealConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.tensor(2.0))  # made on CPU outside any factory: a constant
        self.table = nn.Parameter(torch.from_numpy(np.arange(6, dtype=np.float32)))
        self.out = nn.Linear(4, 2)


def test_tensors_made_from_python_values_are_kept_as_they_are():
    eager, after_eager, built, after = _eager_and_meta(_RealConstants)
    assert built.deferred is not None, built.fallback
    _assert_bitwise(eager, built.model)
    assert torch.equal(after, after_eager)


class _ReadsAValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        scale = float(self.lin.weight.abs().max())  # a value: meta has none
        self.scale = nn.Parameter(torch.full((2,), scale))


class _DrawsOnARealTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.noise = nn.Parameter(torch.tensor([0.0, 0.0, 0.0]).normal_())  # between the Linear's draws and later ones
        self.out = nn.Linear(4, 2)


class _KeepsAPlainTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.mask = torch.ones(4)  # neither a parameter nor a buffer: to_empty would leave it on meta


@pytest.mark.parametrize("cls, reason", [
    (_ReadsAValue, "fails on the meta device"),
    (_DrawsOnARealTensor, "drew random numbers on a real device"),
    (_KeepsAPlainTensor, "mask is a tensor that is neither a parameter nor a buffer"),
])  # fmt: skip
def test_a_constructor_that_cannot_be_replayed_is_built_eagerly_with_the_reason(cls, reason):
    eager, after_eager, built, _ = _eager_and_meta(cls)
    assert built.deferred is None
    assert reason in built.fallback and built.note().startswith("eager (every rank builds the whole model): ")
    _assert_bitwise(eager, built.model)  # the eager build, from the same random state
    assert torch.equal(torch.rand(4), after_eager)


def test_a_recipe_error_on_meta_is_the_recipe_error():
    def build():
        raise ConfigError("model.width=3 does not fit")

    with pytest.raises(ConfigError, match=r"model\.width=3"):
        meta_init.build_model(build, on_meta=True)


# ---------------------------------------------------------------- the launch config's FSDP fields


@pytest.fixture
def fsdp_launch(monkeypatch):
    """An FSDP2 launch of 2 processes as accelerate exports it; returns a function resolving the plan."""
    for var in list(os.environ):
        if var.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_", "DISTRAIN_")):
            monkeypatch.delenv(var)
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
           "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def plan(*overrides: str, **exports: str):
        for k, v in exports.items():
            monkeypatch.setenv(k, v)
        cfg, _ = resolve_config([*TINY_HAR, *overrides])
        return resolve_plan(cfg), cfg

    return plan


def test_cpu_ram_efficient_loading_is_meta_construction(fsdp_launch):
    plan, cfg = fsdp_launch()
    assert plan.meta_init and cfg.parallel.fsdp_meta_init is True  # the default, recorded for config.yaml
    assert fsdp_launch(FSDP_CPU_RAM_EFFICIENT_LOADING="true")[0].meta_init
    plan, cfg = fsdp_launch(FSDP_CPU_RAM_EFFICIENT_LOADING="false")
    assert not plan.meta_init and cfg.parallel.fsdp_meta_init is False
    with pytest.raises(LaunchError, match=r"fsdp_cpu_ram_efficient_loading=false but parallel\.fsdp_meta_init=true"):
        fsdp_launch("parallel.fsdp_meta_init=true")
    assert not fsdp_launch("parallel.fsdp_meta_init=false")[0].meta_init  # agreeing: fine


def test_a_state_dict_type_distrain_does_not_write_is_refused(fsdp_launch):
    assert fsdp_launch(FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT")[0].backend == "fsdp2"
    with pytest.raises(ConfigError, match=r"fsdp_state_dict_type=FULL_STATE_DICT; distrain writes sharded"):
        fsdp_launch(FSDP_STATE_DICT_TYPE="FULL_STATE_DICT")


# ---------------------------------------------------------------- two real FSDP2 processes


@pytest.mark.multiproc
def test_fsdp2_shards_hold_the_eager_build_bitwise(tmp_path: Path):
    args = [*TINY_HAR, f"output_dir={tmp_path / 'run'}"]
    out = tmp_path / "initial.safetensors"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "launch_configs" / "cpu_fsdp.yaml"),
           "--main_process_port", str(free_port()), str(SCRIPT), str(out), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one file per rank, not stdout, where the ranks' lines may interleave
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("built_rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:  # every rank built on meta, held only part of the model while building it, and its shards
        assert r["on_meta"] and r["note"].startswith("meta: ")
        assert 0 < r["peak_bytes"] < r["total_bytes"] / 2
        assert r["local_bytes"] < r["total_bytes"]
    from safetensors.torch import load_file

    cfg, recipe = resolve_config(args)
    torch.manual_seed(cfg.train.seed)  # as the trainer seeds, before the datasets
    info = recipe.load_datasets(cfg).info
    _assert_bitwise(load_file(str(out)), recipe.bind(cfg, info).build_model())


def _script(out: str, argv: list[str]) -> None:
    """Build a Trainer (no step) and write the consolidated initial weights, and how each rank built, beside OUT."""
    from safetensors.torch import save_file

    from distrain.train.trainer import Trainer

    cfg, recipe = resolve_config(argv)
    trainer = Trainer(cfg, recipe)
    built = trainer.construction
    local = sum(p.to_local().numel() * p.element_size() for p in trainer.model.parameters())
    total = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    info = {"rank": trainer.rank, "on_meta": built.deferred is not None, "note": built.note(),
            "local_bytes": local, "total_bytes": total,
            "peak_bytes": built.deferred.peak_bytes if built.deferred is not None else None}  # fmt: skip
    (Path(out).parent / f"built_rank{trainer.rank}.json").write_text(json.dumps(info))
    full = trainer.backend.full_state_dict(trainer.model)
    if trainer.rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, out)
    trainer.release_run_dir()


if __name__ == "__main__":
    _script(sys.argv[1], sys.argv[2:])
