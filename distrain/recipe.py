"""The recipe contract and how recipes are found, loaded and configured.

A recipe is a Python module that defines:

    ModelConfig                         a dataclass of model settings (the `model.*` keys)
    DataConfig                          a dataclass subclassing distrain.DataConfig (the `data.*` keys)
    build_datasets(cfg)                 -> Splits(train, val, test=None, info={})
    build_model(cfg, info)              -> torch.nn.Module
    step(cfg, info, model, batch)       -> StepOutput(loss=<unreduced losses [B, ...]>, preds=..., targets=...)
    metrics(cfg, info, preds, targets)  -> dict[str, float]     evaluation metrics

One rule for the arguments: every function gets the run's `cfg` first, and every function
called after build_datasets gets its `info` second (a dict of what it learned from the data:
class names, channels, vocabulary, scaler statistics...). Optional: `SHARD_BLOCKS` (class
names FSDP wraps one by one and may checkpoint activations for, or a function
`(cfg, info, model)` returning them), `validate(cfg)` (raise ConfigError on bad settings),
`report(cfg, info, run_dir, split, preds, targets)` (plots and tables written at the end) and
`tokens(cfg, info, batch) -> int` (tokens in a micro-batch, for tokens/s; keep it cheap, no
device sync), `loss_terms(cfg, info, batch)` and `collate(cfg, info, samples)` (below). Defaults
for any key live in `<recipe>.yaml` beside the module. The module docstring's first line is the
recipe's one-line description.

Each function's parameters are checked against the contract when the recipe loads, and what
they return on every call (a ConfigError naming the recipe: a step's loss, preds and targets
have one row per sample); before anything is written distrain calls step and metrics once on
a few validation samples in eval mode (distrain.train.preflight), so a metrics function that
counts its calls sees one call more than there are evaluations.

Loss normalisation. `StepOutput.loss` holds unreduced loss terms of shape [B, ...]: one per sample
([B]) or one per token ([B, T]), and `StepOutput.mask` (optional, bool, the loss's shape) says which
terms count. The loss of an optimizer step is the sum of the counted terms over all its
micro-batches and ranks divided by the global number of counted terms, so the gradient is the
big batch's, however the batch is split and however many terms each part has (torchtitan's
global token count, HF Trainer's num_items_in_batch). The count must be known before the first
backward, so it comes from the batch, not from the step's outputs:

- `loss_terms(cfg, info, batch)` given: it returns the micro-batch's number of counted terms (an
  int, or a 0-dim tensor on the batch's device, which avoids a device sync), e.g.
  `(batch["labels"] != -100).sum()`; the counts of this rank's micro-batches are summed and
  all-reduced once per step before the first forward. At the step's end distrain checks that the
  step's outputs counted as many terms (mask.sum(), or loss.numel() without a mask): a
  contradiction stops the run with a ConfigError before the optimizer step. A `mask` needs it.
- no `loss_terms`: every term counts and a sample has the same number of terms in every
  micro-batch of a step on every rank, read from the first micro-batch's loss shape (agreed
  across ranks by one all-reduce when the loss is not per-sample); the count is the step's sample
  count times it. A per-sample loss [B] is divided by the global sample count, as always.

Evaluation reports `loss` as the same mean: counted terms summed over the split over their count.

Collate. `collate(cfg, info, samples) -> batch` (optional) builds every training and evaluation
batch from a list of samples, `dataset[i]` for each index of the micro-batch in order, fetched one
by one (the dataset's vectorised `__getitems__` is not used): dynamic padding, or dropping string
columns. Without it a dataset with `__getitems__` gives its batch directly, else torch's default
collate stacks the samples.

Evaluation outputs. `preds` and `targets` are tensors whose first dimension is the sample, or dicts
of such tensors (name -> tensor). They are gathered over batches and ranks, each sample of the
split once, in split order. When every batch's rows have the same shape, `metrics` and `report`
get one tensor [N, ...] per output; when the shapes differ between batches (a [B, T_batch] output
under dynamic padding), they get a list of N tensors instead, sample i's row as its batch returned
it (its batch's padding included), so nothing is padded by distrain that a metric could mistake
for data. A dict gets its keys handled one by one.

Under FSDP2 build_model runs on the meta device with its tensor operations recorded, and each rank
replays them for its own shards (distrain.parallel.meta_init): the initial weights are the eager
build's. A build_model that reads tensor values is built eagerly instead; one must not branch on
whether a tensor is on meta.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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

    `loss` holds unreduced loss terms [B, ...] (per sample, or per token [B, T]) and `mask` (optional,
    bool, loss's shape; it needs the recipe's loss_terms) which of them count: distrain sums the
    counted terms and divides by their number over the whole optimizer step across micro-batches
    and ranks (the module docstring), so accumulation and uneven batches give exactly the
    big-batch gradient. `preds` and `targets`: tensors [B, ...] or dicts of them, for metrics.
    """

    loss: torch.Tensor
    preds: torch.Tensor | dict[str, torch.Tensor] | None = None
    targets: torch.Tensor | dict[str, torch.Tensor] | None = None
    mask: torch.Tensor | None = None


@dataclass
class Splits:
    """What build_datasets returns: the splits, and `info`, what it learned from the data that
    build_model, step, metrics and report need too (class names, channels, scaler statistics...).

    `info` holds JSON values (dicts with string keys, lists, numbers, strings, booleans, None):
    checkpoints store it, so that load_model and export build the model without the data.
    """

    train: Any
    val: Any
    test: Any | None = None
    info: dict[str, Any] = field(default_factory=dict)


INFO_KEY = "recipe_info"  # Splits.info's key in trainer_state.json and in the metadata of the weights distrain writes

# The arguments distrain passes to each function of a recipe, in order (validate: before the data).
CONTRACT = {
    "validate": ("cfg",),
    "build_datasets": ("cfg",),
    "build_model": ("cfg", "info"),
    "step": ("cfg", "info", "model", "batch"),
    "metrics": ("cfg", "info", "preds", "targets"),
    "report": ("cfg", "info", "run_dir", "split", "preds", "targets"),
    "tokens": ("cfg", "info", "batch"),
    "loss_terms": ("cfg", "info", "batch"),
    "collate": ("cfg", "info", "samples"),
    "SHARD_BLOCKS": ("cfg", "info", "model"),
}

ShardBlocks = tuple[str, ...] | Callable[[Config, dict[str, Any], torch.nn.Module], Iterable[str]]


@dataclass
class Recipe:
    """A loaded recipe module: its functions as written, with the contract's arguments."""

    name: str
    description: str
    path: Path
    module: ModuleType
    model_config: type
    data_config: type
    defaults: dict[str, Any]
    build_model: Callable[[Config, dict[str, Any]], torch.nn.Module]
    build_datasets: Callable[[Config], Splits]
    step: Callable[[Config, dict[str, Any], torch.nn.Module, Any], StepOutput]
    metrics: Callable[[Config, dict[str, Any], torch.Tensor, torch.Tensor], dict[str, Any]]
    shard_blocks: ShardBlocks = ()
    validate: Callable[[Config], None] | None = None
    report: Callable[..., None] | None = None
    tokens: Callable[[Config, dict[str, Any], Any], int] | None = None
    loss_terms: Callable[[Config, dict[str, Any], Any], int | torch.Tensor] | None = None
    collate: Callable[[Config, dict[str, Any], list[Any]], Any] | None = None

    def load_datasets(self, cfg: Config) -> Splits:
        """build_datasets(cfg), checked: a Splits whose info holds JSON values (see check_splits)."""
        return check_splits(self.build_datasets(cfg), f"recipe={cfg.recipe}")

    def bind(self, cfg: Config, info: dict[str, Any]) -> BoundRecipe:
        """The calls distrain makes for one run, with `cfg` and build_datasets' `info` filled in
        and what each returns checked (one ConfigError line naming the recipe)."""
        where = f"recipe={cfg.recipe}"
        build_model, step, metrics, report, tokens = self.build_model, self.step, self.metrics, self.report, self.tokens
        blocks, loss_terms, collate = self.shard_blocks, self.loss_terms, self.collate

        def checked_build_model() -> torch.nn.Module:
            return check_model(build_model(cfg, info), where)

        def checked_step(model: torch.nn.Module, batch: Any) -> StepOutput:
            return check_step_output(step(cfg, info, model, batch), batch, where, loss_terms is not None)

        def checked_metrics(preds: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
            return check_metrics(metrics(cfg, info, preds, targets), where)

        def shard_blocks(model: torch.nn.Module) -> tuple[str, ...]:
            return check_shard_blocks(blocks(cfg, info, model), where, returned=True) if callable(blocks) else blocks

        return BoundRecipe(
            name=self.name,
            path=self.path,
            cfg=cfg,
            info=info,
            build_model=checked_build_model,
            step=checked_step,
            metrics=checked_metrics,
            shard_blocks=shard_blocks,
            report=None if report is None else lambda run_dir, split, p, y: report(cfg, info, run_dir, split, p, y),
            tokens=None if tokens is None else lambda batch: tokens(cfg, info, batch),
            loss_terms=None if loss_terms is None else lambda batch: loss_terms(cfg, info, batch),
            # a partial, not a lambda: DataLoader workers may need to pickle it
            collate=None if collate is None else functools.partial(collate, cfg, info),
        )


@dataclass(frozen=True)
class BoundRecipe:
    """A recipe bound to one run's config and to the info its build_datasets returned (Recipe.bind)."""

    name: str
    path: Path
    cfg: Config
    info: dict[str, Any]
    build_model: Callable[[], torch.nn.Module]
    step: Callable[[torch.nn.Module, Any], StepOutput]
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]
    shard_blocks: Callable[[torch.nn.Module], tuple[str, ...]]
    report: Callable[[Path, str, torch.Tensor, torch.Tensor], None] | None = None
    tokens: Callable[[Any], int] | None = None
    loss_terms: Callable[[Any], int | torch.Tensor] | None = None
    collate: Callable[[list[Any]], Any] | None = None

    def weights_metadata(self) -> dict[str, str]:
        """safetensors metadata for this run's weights files: the info, so load_model reads no data."""
        return {INFO_KEY: json.dumps(self.info)}


def check_splits(splits: Any, where: str) -> Splits:
    """build_datasets' result: a Splits whose info is a dict of JSON values, given back as JSON
    gives it back (tuples become lists), so training sees the info that load_model will."""
    if not isinstance(splits, Splits):
        raise ConfigError(
            f"{where}: build_datasets returned {type(splits).__name__}, not distrain.Splits(train=..., val=...)"
        )
    if not isinstance(splits.info, dict):
        raise ConfigError(f"{where}: build_datasets returned Splits.info of type {type(splits.info).__name__}, "
                          "not a dict")  # fmt: skip
    try:
        text = json.dumps(splits.info)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{where}: build_datasets returned a Splits.info that is not JSON ({e}); checkpoints store it: "
            "use dicts with string keys, lists, numbers and strings (.tolist() for arrays)"
        ) from None
    return dataclasses.replace(splits, info=json.loads(text))


def check_shard_blocks(names: Any, where: str, returned: bool = False) -> tuple[str, ...]:
    """SHARD_BLOCKS, or what its function returned: class names (a tuple or list of str)."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        what = f"SHARD_BLOCKS({', '.join(CONTRACT['SHARD_BLOCKS'])}) returned" if returned else "SHARD_BLOCKS is"
        raise ConfigError(
            f'{where}: {what} {names!r}; it must be class names, e.g. ("Block",), or a function '
            f"({', '.join(CONTRACT['SHARD_BLOCKS'])}) returning them"
        )
    return tuple(names)


def check_signature(fn: Callable, name: str, where: str) -> None:
    """A recipe function must accept the contract's arguments for `name`; an older signature
    (step(model, batch), metrics(preds, targets, cfg)...) is one ConfigError line giving the new one."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read, the call will tell
        return
    args = CONTRACT[name]
    try:
        sig.bind(*args)
    except TypeError:
        has = ", ".join(sig.parameters)
        raise ConfigError(
            f"{where}: {name}({has}) does not take the recipe contract's arguments; define {name}({', '.join(args)})"
        ) from None


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


def check_step_output(out: Any, batch: Any, where: str, loss_terms: bool = False) -> StepOutput:
    """step's result: a StepOutput whose loss, mask, preds and targets hold one row per sample of the batch
    (preds and targets may be dicts of such tensors); a mask is bool, the loss's shape, and needs
    the recipe's loss_terms (`loss_terms`: whether it has one).

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
    for name in ("loss", "mask", "preds", "targets"):
        value = getattr(out, name)
        if value is None and name != "loss":
            continue
        items = value.items() if isinstance(value, dict) and name in ("preds", "targets") else [(None, value)]
        for key, item in items:
            label = name if key is None else f"{name}[{key!r}]"
            if not torch.is_tensor(item):
                kinds = "a tensor or a dict of tensors" if name in ("preds", "targets") else "a tensor"
                got = type(item).__name__
                raise ConfigError(f"{where}: step returned StepOutput.{label} of type {got}, not {kinds}")
            how = f"one row per sample, shape [{b}] or [{b}, ...]" + (" (reduction='none')" if name == "loss" else "")
            if item.ndim == 0:
                raise ConfigError(f"{where}: step returned a scalar {label}; it needs {how}")
            if n is not None and item.shape[0] != n:
                got = f"{label} of shape {list(item.shape)}"
                raise ConfigError(f"{where}: step returned {got} for a batch of {n}; it needs {how}")
    if out.mask is not None:
        if out.mask.dtype != torch.bool or out.mask.shape != out.loss.shape:
            raise ConfigError(
                f"{where}: step returned StepOutput.mask of dtype {out.mask.dtype} and shape {list(out.mask.shape)}; "
                f"it must be bool, the loss's shape {list(out.loss.shape)}"
            )
        if not loss_terms:
            raise ConfigError(
                f"{where}: step returned StepOutput.mask but the recipe defines no loss_terms(cfg, info, batch); "
                "the step's count of counted terms is needed before the backward: define it to return the "
                "micro-batch's count (e.g. (batch['labels'] != -100).sum())"
            )
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
    optional = ("validate", "report", "tokens", "loss_terms", "collate")
    not_callable += [f for f in optional if getattr(module, f, None) is not None and not callable(getattr(module, f))]
    if not_callable:
        raise ConfigError(f"recipe={name}: {', '.join(not_callable)} must be callable")
    where = f"recipe={name}"
    for f in CONTRACT:
        fn = getattr(module, f, None)
        if fn is not None and callable(fn):
            check_signature(fn, f, where)
    blocks = getattr(module, "SHARD_BLOCKS", ())
    blocks = blocks if callable(blocks) else check_shard_blocks(blocks, where)
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
        shard_blocks=blocks,
        validate=getattr(module, "validate", None),
        report=getattr(module, "report", None),
        tokens=getattr(module, "tokens", None),
        loss_terms=getattr(module, "loss_terms", None),
        collate=getattr(module, "collate", None),
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
    return cfg, recipe
