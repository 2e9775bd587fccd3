"""`distrain export`: a checkpoint -> consolidated weights for inference; `load_model(dir)` reads them back.

    distrain export <run dir | checkpoint dir> --out <dir> [--max-shard-size 2GB]

writes `model.safetensors` (or `model-00001-of-0000N.safetensors` shards of at most
--max-shard-size plus `model.safetensors.index.json`, the Hugging Face layout) and the run's
`config.yaml`; each weights file's metadata holds the step and `recipe_info`, what the
recipe's build_datasets learned and its build_model takes, so load_model needs no data.
Works from any distrain checkpoint (single, DDP, FSDP2, DeepSpeed ZeRO): the pieces are
reassembled on CPU without a process group. Only files of those names are replaced in --out;
it must lie outside the run dir and checkpoint exported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from distrain import checkpoint
from distrain.checkpoint import load as checkpoint_load
from distrain.checkpoint.hf import HF_FILES, build_on_meta, write_hf_files
from distrain.checkpoint.weights import save_text, save_weights
from distrain.cli import command
from distrain.config import Config, apply_dict
from distrain.errors import ConfigError
from distrain.recipe import INFO_KEY

log = logging.getLogger("distrain")
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # what _export names its shards
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size={text!r} is not a size; use e.g. 2GB, 500MB, 1GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def export(source: str | os.PathLike, out: str | os.PathLike, max_shard_size: int | None = None,
           trust_recipe: bool = False) -> Path:  # fmt: skip
    """Write the consolidated model of a run's newest good checkpoint (or the given one) to `out`.
    For a transformers model also config.json (+ generation_config.json), which needs the recipe's
    model class: a recipe file outside recipes/ is imported for that only with `trust_recipe=True`."""
    ckpt, index = checkpoint.resolve(source)  # verifies the checksums
    return _export(ckpt, index, out, max_shard_size, source, trust_recipe)


def check_out(out: Path, source: str | os.PathLike, ckpt: Path) -> None:
    """Refuse an --out that is a file, or the input or inside it (the run dir, its checkpoints,
    the checkpoint folder): writing there would replace the run's own model.safetensors or
    change a checkpoint's files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; give a folder")
    blocker = next((p for p in out.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # mkdir would fail with NotADirectoryError after the checkpoint was read
        raise ConfigError(f"--out {out} cannot be created: {blocker} is a file")
    inputs = [Path(source), ckpt]
    if ckpt.parent.name == checkpoint.CKPT_DIR:
        inputs.append(ckpt.parent.parent)  # the run dir of the checkpoint
    where = out.resolve()
    for inp in inputs:
        if where == inp.resolve() or inp.resolve() in where.parents:
            how = "is" if where == inp.resolve() else "lies inside"
            raise ConfigError(f"--out {out} {how} the input {inp}; export to a folder outside it")


def _export(ckpt: Path, index: dict[str, Any], out: str | os.PathLike, max_shard_size: int | None,
            source: str | os.PathLike | None = None, trust_recipe: bool = False) -> Path:  # fmt: skip
    out = Path(out)
    check_out(out, source if source is not None else ckpt, ckpt)
    state = checkpoint_load.full_model_state(ckpt, index)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only or unwritable parent: one line, not a traceback
        raise ConfigError(f"--out {out} cannot be created: {e.strerror or e}") from None
    # Never mix old and new files, and never touch a file of another name (a user's model_v1.safetensors).
    for old in out.iterdir():
        if old.is_file() and (old.name in ("model.safetensors", INDEX_NAME, *HF_FILES)
                              or SHARD_NAME.fullmatch(old.name)):  # fmt: skip
            old.unlink(missing_ok=True)
    trainer_state = checkpoint.read_json(ckpt / checkpoint.STATE)
    step = str(trainer_state.get("step", ""))
    metadata = {"format": "pt", "step": step}
    if INFO_KEY in trainer_state:  # absent from checkpoints of older versions: load_model reads the data then
        metadata[INFO_KEY] = json.dumps(trainer_state[INFO_KEY])
    shards = _shards(state, max_shard_size) if max_shard_size else [state]
    if len(shards) == 1:
        save_weights(state, out / "model.safetensors", metadata=metadata)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_weights(shard, out / fname, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, fname))
            total += sum(t.numel() * t.element_size() for t in shard.values())
        index = {"metadata": {"total_size": total, "step": step}, "weight_map": weight_map}
        save_text(out / INDEX_NAME, json.dumps(index, indent=1))
    shutil.copyfile(ckpt / checkpoint.CONFIG, out / "config.yaml")
    _write_hf_files(ckpt, out, set(state), trust_recipe)
    return out


def _write_hf_files(ckpt: Path, out: Path, keys: set[str], trust_recipe: bool) -> None:
    """config.json (+ generation_config.json) when the recipe's model is a transformers model."""
    from distrain.recipe import is_builtin_recipe

    cfg_dict = yaml.safe_load((ckpt / checkpoint.CONFIG).read_text()) or {}
    name = str(cfg_dict.get("recipe", ""))
    if not (trust_recipe or is_builtin_recipe(name)):
        log.info("recipe %s is a file outside recipes/: no config.json without trust_recipe=True", name)
        return
    info = saved_info(ckpt)
    if info is None:  # an older distrain's checkpoint: building the model would read the data
        return
    recipe, cfg = _saved_recipe(ckpt, trust_recipe)
    model = build_on_meta(recipe.bind(cfg, info).build_model)
    try:
        written = write_hf_files(model, out, keys)
    except ValueError as e:
        raise ConfigError(f"{ckpt}: cannot write the Hugging Face files: {e}") from None
    if written:
        log.info("wrote %s: the folder loads with transformers' from_pretrained", ", ".join(written))


def load_weights_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of an export folder (single file or sharded) or of a checkpoint folder."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / INDEX_NAME).is_file():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for fname in sorted(set(weight_map.values())):
            state.update(load_file(str(path / fname)))
        return state
    return checkpoint_load.full_model_state(*checkpoint.resolve(path))


def load_model(path: str | os.PathLike, trust_recipe: bool = False) -> torch.nn.Module:
    """The recipe's model, built from `<path>/config.yaml`, with the exported (or checkpointed) weights.

    On CPU, in eval mode, with no process group. `path` is an export folder, a checkpoint
    folder or a run dir. A config naming a recipe file outside recipes/ is refused (ConfigError)
    unless `trust_recipe=True`: importing that file runs its code. build_model gets the recipe
    info the folder holds (the weights' metadata, or a checkpoint's trainer_state.json); for a
    folder saved without it (by an older distrain) build_datasets runs, so reads the data.
    """
    path, index = Path(path), None
    if not (path / "config.yaml").is_file():  # a run dir: its newest good checkpoint
        path, index = checkpoint.resolve(path)
    recipe, cfg = _saved_recipe(path, trust_recipe)
    # Loading the weights verifies a checkpoint's checksums, trainer_state.json's too, before saved_info reads it.
    state = load_weights_dir(path) if index is None else checkpoint_load.full_model_state(path, index)
    model = _bind(recipe, cfg, path).build_model()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{path} does not fit recipe {recipe.name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def _saved_recipe(path: Path, trust_recipe: bool) -> tuple[Any, Config]:
    """The recipe `<path>/config.yaml` names (refused if untrusted) and that config."""
    from distrain.recipe import check_saved_recipe, load_recipe

    cfg_dict = yaml.safe_load((path / "config.yaml").read_text()) or {}
    name = str(cfg_dict.pop("recipe", ""))
    recipe = load_recipe(check_saved_recipe(name, path / "config.yaml", trust_recipe, "trust_recipe=True"))
    cfg = Config(recipe=recipe.name, data=recipe.data_config(), model=recipe.model_config())
    apply_dict(cfg, cfg_dict)
    return recipe, cfg


def _bind(recipe: Any, cfg: Config, path: Path) -> Any:
    """The recipe bound to the info the folder holds (build_datasets runs only for a folder an
    older distrain saved without it)."""
    info = saved_info(path)
    return recipe.bind(cfg, recipe.load_datasets(cfg).info if info is None else info)


def saved_info(path: Path) -> dict[str, Any] | None:
    """The recipe info of an export folder (its weights' metadata) or a checkpoint (trainer_state.json)."""
    from safetensors import safe_open

    weights = path / "model.safetensors"
    if not weights.is_file() and (path / INDEX_NAME).is_file():
        weights = path / min(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())
    where, info = weights, None
    try:
        if weights.is_file():
            with safe_open(str(weights), "pt") as f:
                text = (f.metadata() or {}).get(INFO_KEY)
            info = None if text is None else json.loads(text)
        elif (path / checkpoint.STATE).is_file():
            where, info = path / checkpoint.STATE, checkpoint.read_json(path / checkpoint.STATE).get(INFO_KEY)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: its recipe info cannot be read: {e}") from None
    if info is not None and not isinstance(info, dict):
        raise ConfigError(f"{where}: its recipe info is a {type(info).__name__}, not a JSON object")
    return info


def _check_recipe(ckpt: Path, trust: bool) -> None:
    """Refuse (before writing anything) a checkpoint whose config names an untrusted recipe file."""
    from distrain.recipe import check_saved_recipe

    try:
        cfg_dict = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # the export copies config.yaml and reports a missing or damaged one itself
    if isinstance(cfg_dict, dict):
        check_saved_recipe(str(cfg_dict.get("recipe", "")), ckpt / "config.yaml", trust, "--trust-recipe")


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one ConfigError line (exit 2), not usage text plus SystemExit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"distrain export: {message}")


@command
def main(argv: list[str]) -> int:
    parser = _Parser(prog="distrain export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run dir (its newest complete checkpoint) or a checkpoint folder")
    parser.add_argument("--out", required=True, help="folder for model.safetensors (+ index) and config.yaml")
    parser.add_argument("--max-shard-size", default=None, help="split into shards of at most this size, e.g. 2GB")
    parser.add_argument("--trust-recipe", action="store_true",
                        help="the run's config names a recipe file outside recipes/ (code that loading the model "
                             "runs): export it anyway")  # fmt: skip
    args = parser.parse_args(argv)
    size = parse_size(args.max_shard_size) if args.max_shard_size else None
    ckpt, index = checkpoint.resolve(args.source)
    _check_recipe(ckpt, args.trust_recipe)
    out = _export(ckpt, index, args.out, size, args.source, trust_recipe=args.trust_recipe)
    print(f"exported {ckpt} -> {out}")
    return 0
