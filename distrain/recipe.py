"""The recipe contract and how recipes are found, loaded and configured.

A recipe is a Python module that defines:

    ModelConfig       a dataclass of model settings (the `model.*` keys)
    DataConfig        a dataclass subclassing distrain.DataConfig (the `data.*` keys)
    build_model(cfg)  -> torch.nn.Module
    build_datasets(cfg) -> Splits(train, val, test=None)   torch or Hugging Face datasets
    step(model, batch[, cfg]) -> StepOutput(loss=<per-sample losses>, preds=..., targets=...)
    metrics(preds, targets[, cfg]) -> dict[str, float]     evaluation metrics

and optionally `SHARD_BLOCKS` (class names FSDP wraps one by one and may checkpoint
activations for), `validate(cfg)` (raise ConfigError on bad settings) and
`report(run_dir, split, preds, targets, cfg)` (plots and tables written at the end) and
`tokens(batch) -> int` (tokens in a micro-batch, for tokens/s; keep it cheap, no device sync).
Defaults for any key live in `<recipe>.yaml` beside the module. The module docstring's
first line is the recipe's one-line description.

What these return is checked on every call (a ConfigError naming the recipe: a step's loss,
preds and targets have one row per sample), and before anything is written distrain calls
step and metrics once on a few validation samples in eval mode (distrain.train.preflight), so a
metrics function that counts its calls sees one call more than there are evaluations.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from distrain.config import Config, DataConfig, apply_dict, load_yaml, parse_overrides, validate
from distrain.errors import ConfigError
from distrain.train.data import batch_size_of

# The built-in recipes: the package's recipes/ folder (in a checkout a link to the repository's recipes/),
# resolved so that messages and trust checks name the real files.
RECIPES_DIR = (Path(__file__).resolve().parent / "recipes").resolve()


@dataclass
class StepOutput:
    """What a recipe's step returns.

    `loss` holds unreduced per-sample (or per-token) losses: distrain sums them and divides
    by the number of samples of the whole optimizer step across micro-batches and ranks, so
    accumulation and uneven batches give exactly the big-batch gradient.
    """

    loss: torch.Tensor
    preds: torch.Tensor | None = None
    targets: torch.Tensor | None = None


@dataclass
class Splits:
    train: Any
    val: Any
    test: Any | None = None


@dataclass
class Recipe:
    name: str
    description: str
    path: Path
    module: ModuleType
    model_config: type
    data_config: type
    defaults: dict[str, Any]
    build_model: Callable[[Config], torch.nn.Module]
    build_datasets: Callable[[Config], Splits]
    step: Callable[[torch.nn.Module, Any], StepOutput]
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    shard_blocks: tuple[str, ...] = ()
    validate: Callable[[Config], None] | None = None
    report: Callable[..., None] | None = None
    tokens: Callable[[Any], int] | None = None


    def bind(self, cfg: Config) -> Recipe:
        """A copy whose step and metrics take the config when they ask for it as a third argument,
        and whose build_model, step and metrics check what they return (one ConfigError line)."""
        where = f"recipe={cfg.recipe}"
        step, metrics, build_model = _with_cfg(self.step, cfg, 2), _with_cfg(self.metrics, cfg, 2), self.build_model

        def checked_build_model(c: Config) -> torch.nn.Module:
            return check_model(build_model(c), where)

        def checked_step(model: torch.nn.Module, batch: Any) -> StepOutput:
            return check_step_output(step(model, batch), batch, where)

        def checked_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
            return check_metrics(metrics(preds, targets), where)

        return dataclasses.replace(self, step=checked_step, metrics=checked_metrics, build_model=checked_build_model)


def _with_cfg(fn: Callable, cfg: Config, base_args: int) -> Callable:
    import functools
    import inspect

    params = inspect.signature(fn).parameters
    return functools.partial(fn, cfg=cfg) if len(params) > base_args and "cfg" in params else fn


def check_model(model: Any, where: str) -> torch.nn.Module:
    """build_model's result: a module with at least one parameter to train."""
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{where}: build_model returned {type(model).__name__}, not a torch.nn.Module")
    params = list(model.parameters())
    if not params:
        raise ConfigError(f"{where}: build_model returned a {type(model).__name__} without parameters; none to train")
    if not any(p.requires_grad for p in params):
        raise ConfigError(
            f"{where}: every one of the {len(params)} parameters of build_model's {type(model).__name__} is frozen "
            "(requires_grad=False); nothing to train"
        )
    return model


def check_step_output(out: Any, batch: Any, where: str) -> StepOutput:
    """step's result: a StepOutput whose loss (and preds/targets) hold one row per sample of the batch.

    A loss reduced over the batch (a scalar, or shape [1] for B > 1) would be summed as one
    sample's loss and give 1/B of the intended gradient, so it is refused, not averaged.
    """
    if not isinstance(out, StepOutput):
        raise ConfigError(
            f"{where}: step returned {type(out).__name__}, not distrain.StepOutput(loss=..., preds=..., targets=...)"
        )
    try:
        n: int | None = batch_size_of(batch)
    except (TypeError, StopIteration, IndexError, KeyError):  # a batch type without a leading sample dimension
        n = None
    b = "B" if n is None else str(n)
    for name in ("loss", "preds", "targets"):
        value = getattr(out, name)
        if value is None and name != "loss":
            continue
        if not torch.is_tensor(value):
            raise ConfigError(f"{where}: step returned StepOutput.{name} of type {type(value).__name__}, not a tensor")
        how = f"one row per sample, shape [{b}] or [{b}, ...]" + (" (reduction='none')" if name == "loss" else "")
        if value.ndim == 0:
            raise ConfigError(f"{where}: step returned a scalar {name}; it needs {how}")
        if n is not None and value.shape[0] != n:
            got = f"{name} of shape {list(value.shape)}"
            raise ConfigError(f"{where}: step returned {got} for a batch of {n}; it needs {how}")
    return out


def check_metrics(result: Any, where: str) -> dict[str, Any]:
    """metrics' result: a dict of name -> value."""
    if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
        raise ConfigError(f"{where}: metrics returned {type(result).__name__}, not a dict of name -> value")
    return result


REQUIRED = ("ModelConfig", "DataConfig", "build_model", "build_datasets", "step", "metrics")


def available_recipes() -> dict[str, str]:
    """name -> one-line description of every recipe shipped in recipes/."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        out[path.stem] = _first_docstring_line(path)
    return out


def _first_docstring_line(path: Path) -> str:
    import ast

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def resolve_recipe_path(name: str) -> Path:
    if _names_a_file(name):
        path = Path(name).expanduser()
        if path.is_dir():
            raise ConfigError(f"recipe={name} is a folder; give a recipe name or a .py file")
        if not path.is_file():
            raise ConfigError(f"recipe={name} does not exist; give a recipe name or an existing .py file")
        if path.suffix != ".py":
            raise ConfigError(f"recipe={name} is not a .py file; give a recipe name or a Python file")
        return path.resolve()
    path = RECIPES_DIR / f"{name}.py"
    if not path.is_file():
        names = list(available_recipes())
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown recipe={name!r}{hint}; available: {', '.join(names)} or a path to a .py file")
    return path


def _names_a_file(name: str) -> bool:
    return name.endswith(".py") or "/" in name or "\\" in name


def is_builtin_recipe(name: str) -> bool:
    """Whether `name` is a recipe shipped in recipes/: its name, or a path to that very file."""
    if not _names_a_file(name):
        return True  # a plain name resolves only in recipes/ (or is unknown there)
    try:
        path = Path(name).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return path.parent == RECIPES_DIR.resolve() and path.is_file()


def check_saved_recipe(name: str, config_path: str | os.PathLike, trust: bool, flag: str) -> str:
    """`name`, the recipe a saved folder's config.yaml names, when loading it runs no foreign code.

    A folder received from someone else may name any .py file as its recipe, and importing it
    runs that file: only built-in recipes load unless the caller trusts the folder (`flag`).
    """
    if trust or is_builtin_recipe(name):
        return name
    raise ConfigError(
        f"{config_path} names recipe={name}, a file outside distrain's built-in recipes, and loading it runs "
        f"its code: pass {flag} if you trust that file"
    )


def load_recipe(name: str) -> Recipe:
    if not name:
        raise ConfigError(f"recipe is required, e.g. recipe=har; available: {', '.join(available_recipes())}")
    path = resolve_recipe_path(name)
    module_name = f"distrain_recipe_{path.stem}"
    module = _import(name, path, module_name)
    missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
    if missing:
        raise ConfigError(f"recipe={name} lacks {', '.join(missing)}; a recipe defines {', '.join(REQUIRED)}")
    if not (isinstance(module.DataConfig, type) and issubclass(module.DataConfig, DataConfig)):
        raise ConfigError(f"recipe={name}: DataConfig must subclass distrain.DataConfig")
    if not (isinstance(module.ModelConfig, type) and dataclasses.is_dataclass(module.ModelConfig)):
        raise ConfigError(f"recipe={name}: ModelConfig must be a dataclass")
    not_callable = [f for f in ("build_model", "build_datasets", "step", "metrics") if not callable(getattr(module, f))]
    if not_callable:
        raise ConfigError(f"recipe={name}: {', '.join(not_callable)} must be callable")
    yaml_path = path.with_suffix(".yaml")
    defaults = load_yaml(yaml_path, what="recipe defaults") if yaml_path.is_file() else {}
    return Recipe(
        name=path.stem,
        description=_first_docstring_line(path),
        path=path,
        module=module,
        model_config=module.ModelConfig,
        data_config=module.DataConfig,
        defaults=defaults,
        build_model=module.build_model,
        build_datasets=module.build_datasets,
        step=module.step,
        metrics=module.metrics,
        shard_blocks=tuple(getattr(module, "SHARD_BLOCKS", ())),
        validate=getattr(module, "validate", None),
        report=getattr(module, "report", None),
        tokens=getattr(module, "tokens", None),
    )


def _import(name: str, path: Path, module_name: str) -> ModuleType:
    """Execute the recipe file; any error in it is one line naming the file, the line and the error."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"recipe={name} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling by DataLoader workers need it registered
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[module_name]
        raise ConfigError(f"recipe={name} failed to import: {error_line(e, path)}") from None
    return module


def error_line(e: BaseException, path: Path) -> str:
    """`file:line: Type: first line of the message`, at the deepest frame inside `path` (else the deepest)."""
    import traceback

    if isinstance(e, SyntaxError) and e.filename:  # the frame is the importer's; the error knows the line
        return f"{e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}"
    frames = traceback.extract_tb(e.__traceback__)
    inside = [f for f in frames if Path(f.filename).resolve() == path.resolve()]
    frame = (inside or frames or [None])[-1]
    where = f"{frame.filename}:{frame.lineno}: " if frame is not None else ""
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{where}{type(e).__name__}" + (f": {message}" if message else "")


def resolve_config(argv: list[str]) -> tuple[Config, Recipe]:
    """Command-line `key=value` arguments -> validated Config and its Recipe.

    Layers, lowest first: dataclass defaults, the recipe's YAML, `config=<file>`, overrides.
    """
    overrides = parse_overrides(argv)
    file_layer: dict[str, Any] = {}
    if "config" in overrides:
        file_layer = load_yaml(str(overrides.pop("config")))
    name = overrides.pop("recipe", None) or file_layer.pop("recipe", None)
    file_layer.pop("recipe", None)
    recipe = load_recipe(str(name) if name is not None else "")
    cfg = Config(recipe=str(name), data=recipe.data_config(), model=recipe.model_config())
    apply_dict(cfg, recipe.defaults)
    apply_dict(cfg, file_layer)
    for key, value in overrides.items():
        apply_dict(cfg, {key: value})
    validate(cfg)
    if recipe.validate is not None:
        recipe.validate(cfg)
    return cfg, recipe.bind(cfg)
