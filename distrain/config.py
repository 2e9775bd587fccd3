"""Typed run configuration: dataclass sections, YAML layers, `dotted.key=value` overrides.

Precedence, lowest first: dataclass defaults < the recipe's YAML beside its module <
`config=<file>` < command-line overrides. Every field carries a one-line help text
(`opt(default, "help")`) that `--help` prints with its type and default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distrain.errors import ConfigError


def opt(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and a one-line help text.

    `must_exist=True` in metadata marks a path that has to exist when it is set.
    """
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    max_epochs: int = opt(10, "epochs to train (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps to train; 0 means max_epochs decides")
    eval_every: int = opt(0, "evaluate every N optimizer steps; 0 means at epoch ends only")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    clip_norm: float = opt(1.0, "clip the global gradient norm to this; 0 disables clipping (the norm is still logged)")
    seed: int = opt(0, "seed for weights, data order and augmentation")
    deterministic: bool = opt(False, "use deterministic algorithms (slower; bitwise repeatable on GPU)")
    compile: bool = opt(False, "torch.compile the model before any DDP/FSDP wrapping")
    activation_checkpointing: bool = opt(
        False, "recompute the activations of the recipe's SHARD_BLOCKS in backward (less memory, ~1/3 more compute)"
    )
    metric: str = opt("loss", "validation metric that picks the best weights and drives early stopping")
    mode: Literal["min", "max"] = opt("min", "whether a lower or higher `metric` is better")
    patience: int = opt(0, "stop after this many evaluations without improvement; 0 disables early stopping")
    min_delta: float = opt(0.0, "smallest change of `metric` that counts as an improvement")
    max_bad_steps: int = opt(5, "stop with an error after this many consecutive steps with a non-finite loss")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = opt("adamw", "optimizer")
    lr: float = opt(1e-3, "peak learning rate")
    weight_decay: float = opt(0.01, "weight decay (decoupled for adamw)")
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas")
    eps: float = opt(1e-8, "Adam epsilon")
    momentum: float = opt(0.9, "SGD momentum")
    scale_lr: Literal["none", "linear", "sqrt"] = opt(
        "none", "scale lr by global_batch / base_batch (linear) or its square root"
    )
    base_batch: int = opt(256, "global batch size that `lr` is tuned for, used by scale_lr")


@dataclass
class SchedConfig:
    name: Literal["constant", "cosine", "linear", "step", "exponential"] = opt("cosine", "learning-rate schedule")
    warmup_steps: int = opt(0, "linear warmup steps from 0 to lr")
    warmup_ratio: float = opt(0.0, "warmup as a fraction of all steps (used when warmup_steps is 0)")
    min_lr: float = opt(0.0, "floor of the cosine/linear decay")
    step_size: int = opt(100, "steps between decays of the `step` schedule")
    gamma: float = opt(0.1, "decay factor of `step` (per step_size) and `exponential` (per step)")


@dataclass
class DataConfig:
    """Loader settings shared by every recipe; recipes subclass it to add their own fields."""

    batch_size: int | Literal["auto"] = opt(64, "micro-batch size per device; auto finds the largest that fits")
    num_workers: int | None = opt(None, "DataLoader worker processes; unset picks from the hardware and the dataset")
    pin_memory: bool | None = opt(None, "pin host memory for faster copies; unset means yes on CUDA")
    persistent_workers: bool | None = opt(None, "keep workers alive between epochs; unset means yes when workers > 0")
    prefetch_factor: int | None = opt(None, "batches prefetched per worker; unset uses torch's default")
    drop_last: bool = opt(True, "drop the last short global batch of each epoch")
    eval_batch_size: int | None = opt(None, "micro-batch size for evaluation; unset uses 2 x batch_size")
    global_batch: int | None = opt(
        None, "with batch_size=auto: global batch kept through accumulation; unset: found micro x grad_accum x ranks"
    )
    auto_max_batch: int = opt(1024, "with batch_size=auto: largest micro-batch tried")
    auto_memory_mb: float = opt(
        0.0, "with batch_size=auto on CPU: memory budget per process for one step (MiB); 0 = half the available RAM"
    )


@dataclass
class LogConfig:
    every: int = opt(10, "log training metrics every N optimizer steps")
    progress: bool = opt(True, "show a tqdm progress bar on rank 0")
    trackers: list[str] = opt(
        [], "experiment trackers through accelerate: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, "
        "swanlab, trackio"
    )
    tensorboard: bool = opt(False, "write TensorBoard event files into the run dir (same as trackers=[tensorboard])")
    wandb: bool = opt(False, "log to Weights & Biases (same as trackers=[wandb])")
    wandb_project: str | None = opt(None, "wandb project; unset: $WANDB_PROJECT, else distrain")
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = opt(
        "auto", "wandb mode; auto: $WANDB_MODE if set, else online with an API key (WANDB_API_KEY or wandb login's "
        "~/.netrc) and offline without"
    )
    mlflow_tracking_uri: str | None = opt(
        None, "MLflow tracking URI; unset: $MLFLOW_TRACKING_URI, else a SQLite store in the run dir (mlflow/)"
    )
    save_rank_weights: bool = opt(False, "debug: every rank writes its final local weights (rank_<r>.safetensors)")
    flops: bool | None = opt(
        None, "count model FLOPs once (first step) and log achieved TFLOP/s and MFU; unset means on CUDA only"
    )


@dataclass
class CkptConfig:
    every_steps: int = opt(0, "save a checkpoint every N optimizer steps; 0 disables")
    every_epoch: bool = opt(False, "save a checkpoint at every epoch end")
    keep_last: int = opt(3, "checkpoints kept besides best/; older ones are deleted after a new one is complete")
    save_best: bool = opt(True, "keep a best/ checkpoint on each new best validation metric")
    save_final: bool = opt(True, "save a checkpoint when training ends")
    async_save: bool = opt(
        False, "the loop waits only while a save's state is copied to host memory; the files are written and "
        "committed in the background (one save in flight; the end of training and signals wait for it); costs "
        "a host copy of the rank's state, kept between saves",
    )


@dataclass
class ParallelConfig:
    """How the model is spread over the processes; launch.resolve_plan turns it into a ParallelPlan once.

    Unset options (null, or auto) take the accelerate launch config's value where it has one, else the
    default named in their help; a launch config value that contradicts a set option stops the run.
    """

    backend: Literal["auto", "single", "ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3"] = opt(
        "auto",
        "single, ddp, fsdp2 (FSDP2 fully_shard) or zero1/2/3 (DeepSpeed ZeRO stage; zero0: the engine unpartitioned); "
        "auto: what the accelerate launch config asks, else ddp for several processes, single for one",
    )
    fsdp_reshard_after_forward: bool | None = opt(
        None, "fsdp2: free each block's gathered params after its forward (full shard); false keeps them for "
        "backward (less communication, more memory); unset: the launch config's, else true",
    )
    fsdp_replicate: int | None = opt(
        None, "fsdp2: HSDP replicas (full copies, each sharded over processes / replicas); unset: the launch "
        "config's parallelism_config_dp_replicate_size (HYBRID_SHARD: one per node), else 1",
    )
    fsdp_shard: int | None = opt(
        None, "fsdp2: processes each replica is sharded over; unset: processes / fsdp_replicate",
    )
    fsdp_cpu_offload: bool | None = opt(
        None, "fsdp2: keep params, grads and optimizer state in CPU memory; unset: the launch config's "
        "fsdp_offload_params, else false",
    )
    fsdp_meta_init: bool | None = opt(
        None, "fsdp2: build the model on the meta device and materialise only each rank's shards, with the eager "
        "build's initial weights; unset: the launch config's fsdp_cpu_ram_efficient_loading, else true",
    )
    zero_offload_optimizer: Literal["auto", "none", "cpu", "nvme"] = opt(
        "auto", "zero*: where the optimizer state and fp32 master weights live; auto: the launch config's, else none",
    )
    zero_offload_params: Literal["auto", "none", "cpu", "nvme"] = opt(
        "auto", "zero3: where the partitioned parameters live; auto: the launch config's, else none",
    )
    deepspeed_config: str | None = opt(
        None, "zero*: a DeepSpeed JSON (its 'auto' fields are filled from distrain's config); unset: the launch "
        "config's deepspeed_config_file, else none", must_exist=True,
    )


@dataclass
class Config:
    recipe: str = opt("", "recipe name in recipes/ or a path to a recipe .py file")
    output_dir: str | None = opt(None, "run directory; unset means runs/<recipe>/<timestamp>")
    precision: Literal["no", "fp16", "bf16"] = opt("no", "mixed precision (fp16 uses loss scaling)")
    resume: str | None = opt(None, "auto (newest complete checkpoint in output_dir) or a checkpoint path")
    resume_allow: list[str] = opt(
        [],
        "keys or sections that may differ from the checkpoint's on resume although they change the data order "
        "or what a step means, e.g. [train.seed, model]; global_batch allows another global batch",
    )
    print_config: bool = opt(False, "print the resolved config with types, defaults and help, then exit")
    train: TrainConfig = opt(TrainConfig(), "training loop")
    optim: OptimConfig = opt(OptimConfig(), "optimizer")
    sched: SchedConfig = opt(SchedConfig(), "learning-rate schedule")
    data: DataConfig = opt(DataConfig(), "data")
    model: Any = opt(None, "the recipe's model settings")
    log: LogConfig = opt(LogConfig(), "logging")
    ckpt: CkptConfig = opt(CkptConfig(), "checkpointing")
    parallel: ParallelConfig = opt(ParallelConfig(), "parallelism: backend and its options")


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what config.yaml holds."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- type coercion


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("none" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`, converting where it is lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        if isinstance(value, bool):  # YAML 1.1 reads `precision=no` as false (and yes/on as true)
            words = {"yes", "on", "true"} if value else {"no", "off", "false"}
            spelled = [a for a in allowed if str(a).lower() in words]
            if len(spelled) == 1:
                return spelled[0]
        if isinstance(value, bool) is False and str(value) in [str(a) for a in allowed]:
            return allowed[[str(a) for a in allowed].index(str(value))]
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}{hint}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}={value!r} is not a valid {type_name(tp)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list like [a, b] ({type_name(tp)})")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in typing.get_args(tp):
            if len(value) != len(args):
                raise ConfigError(f"{key}={value!r} must have {len(args)} items ({type_name(tp)})")
            return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (is_number or (isinstance(value, str) and _looks_numeric(value))):  # YAML 1.1 reads 3e-4 as a string
            raise ConfigError(f"{key}={value!r} must be a number")
        number = float(value)
        if not math.isfinite(number):  # no setting means anything at inf or NaN; it would train silently on garbage
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        raise ConfigError(f"{key} is a section; set its keys as {key}.<name>=value")
    return value


# ---------------------------------------------------------------- key paths


def all_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config object."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys.extend(all_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def _unknown_key(key: str, cfg: Any) -> ConfigError:
    valid = [*all_keys(cfg), "config"]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a typo in the section name: match on the last part
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == tail][:1]
    hint = f"; closest valid key: {close[0]}" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted(k for k in valid if section and k.startswith(section + "."))
    allowed = f"; keys under {section}: {', '.join(k.split('.')[-1] for k in siblings)}" if siblings else ""
    return ConfigError(f"unknown key {key!r}{hint}{allowed}")


def set_key(cfg: Any, key: str, value: Any) -> None:
    """Set one dotted key on a config tree, checking the key exists and the type fits."""
    parts = key.split(".")
    obj = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown_key(key, cfg)
        obj = getattr(obj, part)
    name = parts[-1]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown_key(key, cfg)
    tp = _hints(type(obj))[name]
    current = getattr(obj, name)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; set its keys as {key}.<name>=value")
        apply_dict(cfg, value, prefix=key + ".")
        return
    setattr(obj, name, coerce(key, value, tp))


def apply_dict(cfg: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested dict (a YAML layer) onto the config tree."""
    for k, v in values.items():
        set_key(cfg, f"{prefix}{k}", v)


def parse_value(text: str) -> Any:
    """A command-line value parses as a YAML scalar or list: 3e-4, true, [0.9, 0.95], null."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 leaves 3e-4 (no dot) as a string
            return float(value) if value.lower() not in ("nan", "inf") and _looks_numeric(value) else value
        except ValueError:
            return value
    return value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`key=value` arguments into an ordered dict of dotted key -> parsed value."""
    overrides: dict[str, Any] = {}
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value (e.g. recipe=har optim.lr=3e-4)")
        key, _, text = arg.partition("=")
        key = key.strip().lstrip("-").replace("-", "_") if key.startswith("--") else key.strip()
        if not key:
            raise ConfigError(f"argument {arg!r} has an empty key")
        overrides[key] = parse_value(text)
    return overrides


def load_yaml(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what}={path} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what}={path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{what}={path} is not a text (UTF-8) YAML file") from None
    except OSError as e:
        raise ConfigError(f"{what}={path} cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}={path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}={path} must hold a mapping of keys, not {type(data).__name__}")
    return data


# ---------------------------------------------------------------- validation

MAX_SEED = 2**32 - 1  # numpy's legacy global seed (seeded from train.seed) takes no more


def validate(cfg: Config) -> None:
    """Range checks that types cannot express, and paths that must exist."""
    t, o, s, d = cfg.train, cfg.optim, cfg.sched, cfg.data
    eval_bs, prefetch, par = d.eval_batch_size, d.prefetch_factor, cfg.parallel
    checks = [
        (t.max_epochs >= 1 or t.max_steps > 0, "train.max_epochs", t.max_epochs, "an integer >= 1"),
        (t.max_steps >= 0, "train.max_steps", t.max_steps, "an integer >= 0"),
        (t.eval_every >= 0, "train.eval_every", t.eval_every, "an integer >= 0"),
        (t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an integer >= 1"),
        (t.clip_norm >= 0, "train.clip_norm", t.clip_norm, "a number >= 0"),
        (t.patience >= 0, "train.patience", t.patience, "an integer >= 0"),
        (t.max_bad_steps >= 1, "train.max_bad_steps", t.max_bad_steps, "an integer >= 1"),
        (0 <= t.seed <= MAX_SEED, "train.seed", t.seed, f"an integer in [0, {MAX_SEED}]"),
        (t.min_delta >= 0, "train.min_delta", t.min_delta, "a number >= 0"),
        (o.lr > 0, "optim.lr", o.lr, "a number > 0"),
        (o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0"),
        (o.eps >= 0, "optim.eps", o.eps, "a number >= 0"),
        (o.momentum >= 0, "optim.momentum", o.momentum, "a number >= 0"),
        (all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "two numbers in [0, 1)"),
        (o.base_batch >= 1, "optim.base_batch", o.base_batch, "an integer >= 1"),
        (s.warmup_steps >= 0, "sched.warmup_steps", s.warmup_steps, "an integer >= 0"),
        (0 <= s.warmup_ratio < 1, "sched.warmup_ratio", s.warmup_ratio, "a number in [0, 1)"),
        (s.min_lr >= 0, "sched.min_lr", s.min_lr, "a number >= 0"),
        (s.step_size >= 1, "sched.step_size", s.step_size, "an integer >= 1"),
        (0 < s.gamma <= 1, "sched.gamma", s.gamma, "a number in (0, 1]"),
        (d.batch_size == "auto" or d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1 or auto"),
        (eval_bs is None or eval_bs >= 1, "data.eval_batch_size", eval_bs, "an integer >= 1"),
        (d.num_workers is None or d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0"),
        (prefetch is None or prefetch >= 1, "data.prefetch_factor", prefetch, "an integer >= 1"),
        (d.global_batch is None or d.global_batch >= 1, "data.global_batch", d.global_batch, "an integer >= 1"),
        (d.auto_max_batch >= 1, "data.auto_max_batch", d.auto_max_batch, "an integer >= 1"),
        (d.auto_memory_mb >= 0, "data.auto_memory_mb", d.auto_memory_mb, "a number >= 0 (0: half the RAM)"),
        (cfg.log.every >= 1, "log.every", cfg.log.every, "an integer >= 1"),
        (cfg.ckpt.every_steps >= 0, "ckpt.every_steps", cfg.ckpt.every_steps, "an integer >= 0"),
        (cfg.ckpt.keep_last >= 1, "ckpt.keep_last", cfg.ckpt.keep_last, "an integer >= 1"),
        (par.fsdp_replicate is None or par.fsdp_replicate >= 1, "parallel.fsdp_replicate", par.fsdp_replicate,
         "an integer >= 1"),
        (par.fsdp_shard is None or par.fsdp_shard >= 1, "parallel.fsdp_shard", par.fsdp_shard, "an integer >= 1"),
    ]
    for ok, key, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {allowed}")
    if s.name in ("cosine", "linear") and s.min_lr > o.lr:  # the "decay" would climb from lr up to min_lr
        raise ConfigError(f"sched.min_lr={s.min_lr:g} is above optim.lr={o.lr:g}; the decay's floor must be at most lr")
    _check_resume_allow(cfg)
    _check_paths(cfg)
    if cfg.output_dir:
        check_output_dir(cfg.output_dir)


def check_output_dir(path: str | os.PathLike, key: str = "output_dir") -> None:
    """The run dir is a folder or can become one: no file in its place or above it, and writable."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a folder")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != p and not existing.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not writable: no write permission on {existing}")


def _check_resume_allow(cfg: Config) -> None:
    """Each resume_allow entry names a key, a section or global_batch: a typo would allow nothing."""
    keys = all_keys(cfg)
    valid = {*keys, *(k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)), "global_batch"}
    for entry in cfg.resume_allow:
        if entry not in valid:
            close = difflib.get_close_matches(entry, sorted(valid), n=1, cutoff=0.5)
            hint = f"; closest: {close[0]}" if close else ""
            raise ConfigError(f"resume_allow entry {entry!r} is not a key, a section or global_batch{hint}")


def _check_paths(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_paths(value, f"{prefix}{f.name}.")
        elif f.metadata.get("must_exist") and value not in (None, "") and not Path(value).exists():
            raise ConfigError(f"{prefix}{f.name}={value} does not exist; give an existing path")


# ---------------------------------------------------------------- help


def describe(cfg: Any) -> str:
    """Every key with its type, current value, default and help text, one per line."""
    rows = []
    _describe(cfg, "", rows)
    width = max(len(r[0]) for r in rows)
    tw = max(len(r[1]) for r in rows)
    lines = ["key".ljust(width) + "  " + "type".ljust(tw) + "  value  (default)  description"]
    for key, tp, value, default, help_text in rows:
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        dflt = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        mark = "" if shown == dflt else f"  (default {dflt})"
        lines.append(f"{key.ljust(width)}  {tp.ljust(tw)}  {shown}{mark}  # {help_text}")
    return "\n".join(lines)


def _describe(obj: Any, prefix: str, rows: list) -> None:
    hints = _hints(type(obj))
    defaults = type(obj)()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _describe(value, f"{prefix}{f.name}.", rows)
            continue
        rows.append(
            (
                f"{prefix}{f.name}",
                type_name(hints[f.name]),
                to_plain(value),
                to_plain(getattr(defaults, f.name)),
                f.metadata.get("help", ""),
            )
        )


