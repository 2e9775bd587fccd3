"""The dry run: one tiny forward of the recipe's step and metrics before anything is written.

A recipe whose step returns the wrong type or a batch-reduced loss, or a `train.metric` that
its metrics do not produce, would otherwise fail at the first step or the first evaluation,
possibly hours in and after the run dir was written. `dry_run` finds these in a fraction of a
second: every rank runs the same forward on the same few validation samples (so FSDP's and
ZeRO-3's collectives stay in lockstep), in eval mode, under no_grad, with no backward.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from distrain.errors import ConfigError
from distrain.recipe import check_metrics, check_model, check_step_output, error_line
from distrain.train.batch_size import sample_batch
from distrain.train.data import move_to

SAMPLES = 4  # enough to tell a per-sample loss [B] from a batch-reduced [1]; cheap on any model


def dry_run(trainer: Any) -> None:
    """Check the recipe on `trainer`'s prepared model and validation split; ConfigError on a problem.

    Leaves the model as it was (train mode, parameters sharded as training holds them) and the
    global RNG streams untouched.
    """
    cfg, recipe = trainer.cfg, trainer.recipe
    where = f"recipe={cfg.recipe}"
    check_lr(cfg, trainer.lr)
    check_model(trainer.backend.unwrap(trainer.model), where)
    dataset = trainer.datasets["val"]
    if len(dataset) == 0:
        raise ConfigError(f"{where}: the validation split is empty; evaluation and train.metric need samples")
    n = min(SAMPLES, len(dataset))
    with _rng_kept(trainer.device):
        batch = move_to(sample_batch(dataset, n, recipe.collate), trainer.device)
        out = _forward(trainer, batch, where, n)
    check_step_output(out, batch, where, recipe.loss_terms is not None)
    values: dict[str, Any] = {"loss": float(out.loss.detach().float().mean())}
    if out.preds is not None and out.targets is not None:
        try:
            cpu = torch.device("cpu")  # preds and targets may be dicts of tensors
            values.update(check_metrics(recipe.metrics(move_to(out.preds, cpu), move_to(out.targets, cpu)), where))
        except ConfigError:
            raise
        except Exception as e:  # a bug in the recipe's metrics: one line with its file and line
            failure = error_line(e, recipe.path)
            raise ConfigError(f"{where}: metrics failed on {n} validation samples: {failure}") from None
    check_metric_name(cfg.train.metric, values, where)


def check_lr(cfg: Any, peak_lr: float) -> None:
    """The lr after scale_lr is what the schedule decays from: min_lr above it would make it climb."""
    s, o = cfg.sched, cfg.optim
    if s.name in ("cosine", "linear") and s.min_lr > peak_lr:
        raise ConfigError(
            f"sched.min_lr={s.min_lr:g} is above the peak lr {peak_lr:g} (optim.lr={o.lr:g} scaled by "
            f"optim.scale_lr={o.scale_lr}); the decay's floor must be at most the peak"
        )


def check_metric_name(metric: str, values: dict[str, Any], where: str) -> None:
    """`train.metric` must be one of the validation metrics, and a number."""
    numeric = sorted(k for k, v in values.items() if _is_number(v))
    if metric not in values:
        import difflib

        close = difflib.get_close_matches(metric, numeric, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"train.metric={metric!r} is not a validation metric of {where}{hint}; available: {', '.join(numeric)}"
        )
    if not _is_number(values[metric]):
        raise ConfigError(
            f"train.metric={metric!r} is a {type(values[metric]).__name__}, not a number; "
            f"numeric metrics: {', '.join(numeric)}"
        )


def _is_number(value: Any) -> bool:
    if isinstance(value, (bool, list, tuple, dict, str)):
        return False
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return value.numel() == 1 if torch.is_tensor(value) else value.size == 1
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _forward(trainer: Any, batch: Any, where: str, n: int) -> Any:
    model = trainer.model
    was_training = model.training
    autocast = trainer.accelerator.autocast() if trainer.cfg.precision != "no" else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), autocast:
            return trainer.recipe.step(model, batch)
    except (ConfigError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # a bug in the recipe's step: one line with its file and line
        failure = error_line(e, trainer.recipe.path)
        raise ConfigError(f"{where}: step failed on {n} validation samples: {failure}") from None
    finally:
        model.train(was_training)
        trainer.backend.after_forward_only(model)


@contextlib.contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    """Whatever the recipe's step or the dataset draws, the global streams continue as before."""
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
