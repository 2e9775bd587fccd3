"""Settings that differ between a checkpoint and its resume: apply, allow or refuse each one.

A resume continues the checkpointed run under the current config. Settings that only steer how
the run goes on (lr, weight decay, betas, clipping, length, intervals, patience, loader knobs)
are applied. Settings that change the data order or what one step means (seed, global batch,
model, data, schedule shape, optimizer, metric) would silently turn the continuation into another
experiment, so they are refused (exit 2) unless `resume_allow` names them.

The checkpoint's settings are its config.yaml plus trainer_state.json's global_batch and world_size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from distrain.config import Config, to_plain
from distrain.errors import ConfigError

if TYPE_CHECKING:
    from distrain.train.data import BatchPlan

APPLIED, ALLOWED, REFUSED, UNCHECKED = "applied", "allowed by resume_allow", "refused", "unchecked"
GLOBAL_BATCH = "global_batch"  # the pseudo key resume_allow takes for another global batch

# Not settings of the run: where it is and how it was started.
SILENT_KEYS = frozenset({"resume", "output_dir", "print_config", "resume_allow"})
# Safe to change mid-run: read live by the loop, or hyper-parameters the resume re-applies; checkpoints
# load under any backend, so parallel.* may change too.
LIVE_SECTIONS = ("log", "ckpt", "parallel")
LIVE_KEYS = frozenset({
    "precision",
    "train.max_epochs", "train.max_steps", "train.eval_every", "train.clip_norm", "train.deterministic",
    "train.compile", "train.activation_checkpointing", "train.patience", "train.min_delta",
    "train.max_bad_steps",
    "optim.lr", "optim.weight_decay", "optim.betas", "optim.eps", "optim.momentum", "optim.scale_lr",
    "optim.base_batch",
    "sched.min_lr",  # a level like lr; name, warmup and step/gamma reshape where the run is on the curve
    "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
    "data.eval_batch_size",
})  # fmt: skip
# Split the global batch into micro-batches, accumulation and ranks: harmless while the global batch stays.
BATCH_KEYS = frozenset({"data.batch_size", "train.grad_accum", "data.global_batch", "data.auto_max_batch",
                        "data.auto_memory_mb"})  # fmt: skip

# Param-group entries that are not settings: the tensors, and a step counter some optimizers keep there.
RUNNING_GROUP_KEYS = frozenset({"params", "step"})


@dataclass(frozen=True)
class Decision:
    """One setting that differs from the checkpoint's, and what the resume does with it."""

    key: str
    old: Any
    new: Any
    verdict: str
    why: str = ""

    @property
    def level(self) -> int:
        """INFO for a change that is safe by nature, WARNING for one a user had to allow."""
        return logging.INFO if self.verdict == APPLIED else logging.WARNING

    def change(self) -> str:
        return f"{self.key} {show(self.old)} -> {show(self.new)}"

    def __str__(self) -> str:
        return f"resume: {self.change()}: {self.verdict}" + (f" ({self.why})" if self.why else "")


def show(value: Any) -> str:
    """A value as it is written on the command line: 0.01, [0.9, 0.95], null."""
    return yaml.safe_dump(to_plain(value), default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def kind(key: str) -> str:
    """silent, live (applied), batch (applied while the global batch stays) or fixed (refused unless allowed)."""
    if key in SILENT_KEYS:
        return "silent"
    if key in LIVE_KEYS or key.split(".", 1)[0] in LIVE_SECTIONS:
        return "live"
    return "batch" if key in BATCH_KEYS else "fixed"  # unknown and recipe keys are fixed: the safe side


def is_allowed(key: str, allow: list[str]) -> bool:
    """Whether `resume_allow` names the key or a section above it."""
    return any(key == entry or key.startswith(entry + ".") for entry in allow)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config dicts -> {dotted key: value}."""
    if not isinstance(tree, dict):
        return {prefix.removesuffix("."): tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's config.yaml as a dict, None when it has none."""
    path = checkpoint / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def changed_settings(cfg: Config, checkpoint: Path, prefixes: tuple[str, ...]) -> list[str]:
    """'key old -> new' for each setting under `prefixes` that differs from the checkpoint's config.yaml."""
    saved = saved_config(checkpoint)
    if saved is None:
        return []
    old, new = flatten(saved), flatten(to_plain(cfg))
    return [f"{k} {show(old[k])} -> {show(v)}" for k, v in new.items()
            if k.startswith(prefixes) and k in old and old[k] != v]  # fmt: skip


def check(cfg: Config, checkpoint: Path, state: dict[str, Any], plan: BatchPlan, peak_lr: float) -> list[Decision]:
    """Every setting of `cfg` that differs from the checkpoint's, with its verdict, in config order.

    Raises ConfigError (exit 2) naming each refused key with both values, in one line.
    """
    saved = saved_config(checkpoint)
    if saved is None:
        return [Decision("config.yaml", None, None, UNCHECKED, f"{checkpoint} has none to compare settings with")]
    allow = list(cfg.resume_allow)
    old, new = flatten(saved), flatten(to_plain(cfg))
    decisions: list[Decision] = []
    batch_changes: list[tuple[str, Any, Any]] = []
    for key, value in new.items():
        if key not in old or old[key] == value or kind(key) == "silent":
            continue  # keys the checkpoint's distrain did not have cannot be compared
        if key == "recipe" and Path(str(old[key])).stem == Path(str(value)).stem:
            continue  # the same recipe named by path instead of name; check_fits compares the names
        if kind(key) == "batch":
            batch_changes.append((key, old[key], value))
        elif kind(key) == "live":
            decisions.append(Decision(key, old[key], value, APPLIED))
        else:
            verdict = ALLOWED if is_allowed(key, allow) else REFUSED
            decisions.append(Decision(key, old[key], value, verdict, "changes the data order or what a step means"))

    decisions += _batch_decisions(plan, state, batch_changes, allow)
    old_lr = (state.get("scheduler") or {}).get("base_lrs", [peak_lr])[0]
    if old_lr != peak_lr:  # also moved by scale_lr with another global batch
        decisions.append(Decision("peak lr", old_lr, peak_lr, APPLIED,
                                  f"the schedule goes on from step {state.get('step')} with the new peak"))  # fmt: skip

    refused = [d for d in decisions if d.verdict == REFUSED and kind(d.key) != "batch"]  # those: in global_batch
    if refused:
        batch_keys = [k for k, _, _ in batch_changes] or [GLOBAL_BATCH]
        names = [k for d in refused for k in (batch_keys if d.key == GLOBAL_BATCH else [d.key])]
        details = "; ".join(d.change() + (f" ({d.why})" if d.key == GLOBAL_BATCH else "") for d in refused)
        raise ConfigError(f"resume from {checkpoint} would change settings that decide the data order or what a "
                          f"step means: {details}; use the checkpoint's values or allow the change with "
                          f"resume_allow=[{','.join(names)}]")  # fmt: skip
    return decisions


def _batch_decisions(plan: BatchPlan, state: dict[str, Any], batch_changes: list[tuple[str, Any, Any]],
                     allow: list[str]) -> list[Decision]:  # fmt: skip
    """The world size and global batch against the checkpoint's; the batch keys follow the global batch."""
    out: list[Decision] = []
    old_batch = state.get("global_batch", plan.global_batch)
    old_world = state.get("world_size", plan.world_size)
    if old_world != plan.world_size:
        out.append(Decision("world_size", old_world, plan.world_size, APPLIED, "per-rank random streams start afresh"))
    if old_batch == plan.global_batch:
        return out + [Decision(k, a, b, APPLIED, f"global batch {old_batch} kept") for k, a, b in batch_changes]
    keys = [k for k, _, _ in batch_changes] or [GLOBAL_BATCH]
    verdict = ALLOWED if any(is_allowed(k, allow) for k in {GLOBAL_BATCH, *keys}) else REFUSED
    why = [f"now {plan.micro_batch} micro x {plan.grad_accum} accum x {plan.world_size} processes"]
    why += [f"{k} {show(a)} -> {show(b)}" for k, a, b in batch_changes]
    ranks = plan.micro_batch * plan.world_size
    if verdict == REFUSED and old_batch % ranks == 0:
        why.append(f"train.grad_accum={old_batch // ranks} keeps {old_batch}")
    out.append(Decision(GLOBAL_BATCH, old_batch, plan.global_batch, verdict, ", ".join(why)))
    return out + [Decision(k, a, b, verdict, "changes the global batch") for k, a, b in batch_changes]


def config_hyperparameters(scheduler: Any) -> list[dict[str, Any]]:
    """The param groups' hyper-parameters as this run's config built them (lr, weight decay, betas, ...);
    call it before a checkpoint's param groups overwrite them."""
    groups = scheduler.optimizer.param_groups
    return [{k: v for k, v in group.items() if k not in RUNNING_GROUP_KEYS} for group in groups]


def reapply_hyperparameters(scheduler: Any, groups: list[dict[str, Any]]) -> None:
    """Put this run's hyper-parameters back after a checkpoint was loaded, its schedule base lrs too.

    The optimizer state (moments, step counts) stays the checkpoint's; the caller recomputes each
    group's lr from the new base lrs and the step.
    """
    for group, values in zip(scheduler.optimizer.param_groups, groups, strict=True):
        group.update(values)
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
