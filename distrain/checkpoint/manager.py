"""Checkpointing a Trainer: what its state is, saving it at a step boundary, and resuming from one.

The file format, atomic writes, verification and loading live beside it in distrain/checkpoint/.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distrain.checkpoint import resume_check
from distrain.checkpoint.find import choose, find_best, set_aside_future, warn_skips, with_skips
from distrain.checkpoint.format import CKPT_DIR, STATE, read_json, step_dirs, versions
from distrain.checkpoint.load import check_fits, load_verified
from distrain.checkpoint.save import save_checkpoint
from distrain.errors import CheckpointError, ChecksumError
from distrain.recipe import INFO_KEY

log = logging.getLogger("distrain")


def trainer_state(trainer: Any) -> dict[str, Any]:
    """What trainer_state.json holds for a Trainer at a step boundary."""
    import dataclasses

    sched = {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"}
    scaler = getattr(trainer.accelerator, "scaler", None)
    s = trainer.state
    return {
        "step": s.step,
        "epoch": s.epoch,
        "consumed": s.consumed,
        "train_state": dataclasses.asdict(s),
        "scheduler": sched,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "world_size": trainer.world_size,
        "backend": trainer.backend.name,
        "global_batch": trainer.plan.global_batch,
        "recipe": trainer.recipe.name,
        INFO_KEY: trainer.recipe.info,  # what build_model takes from the data: export and load_model read it
        "versions": versions(),
    }


def save(trainer: Any, name: str) -> Path:
    """Save a Trainer's full state as checkpoint `name`; all ranks call it at the same step boundary."""
    import yaml

    from distrain.config import to_plain

    model_state, optim_state = trainer.backend.checkpoint_state(trainer.model, trainer.optimizer)
    keep = trainer.cfg.ckpt.keep_last if name.startswith("step_") else None
    path = save_checkpoint(trainer.run_dir, name, model_state, optim_state, trainer_state(trainer),
                           yaml.safe_dump(to_plain(trainer.cfg), sort_keys=False), trainer.rank,
                           trainer.world_size, keep_last=keep)  # fmt: skip
    log.info("checkpoint saved: %s", path)
    return path


def resume(trainer: Any) -> Path | None:
    """Restore a Trainer from `resume=auto|<path>`: weights, optimizer, schedule, scaler, RNG, position.

    Runs before anything is written to the run dir, so a checkpoint that does not fit raises
    CheckpointError (exit 2) and leaves the run dir as it was.
    """
    import dataclasses

    cfg = trainer.cfg
    config_groups = resume_check.config_hyperparameters(trainer.scheduler)  # before a checkpoint overwrites them
    if cfg.resume == "auto" and not cfg.output_dir:
        raise CheckpointError("resume=auto needs output_dir=<run dir> to look for checkpoints in")
    # Why damaged checkpoints were passed over: warnings once one loads, part of the one-line error if none does.
    skipped: list[str] = []
    try:
        chosen = _first_loadable(trainer, skipped)
    except CheckpointError as e:
        if not skipped:
            raise
        raise CheckpointError(with_skips(str(e), skipped)) from None
    if trainer.rank == 0:
        warn_skips(skipped)
    if chosen is None:
        log.warning("resume=auto: no complete checkpoint in %s; starting from scratch", trainer.run_dir)
        return None
    # The Trainer logs the decisions about changed settings once train.log exists.
    path, state, model_values, optim_values, trainer.resume_notes = chosen
    trainer.backend.load_checkpoint_state(trainer.model, trainer.optimizer, model_values, optim_values)
    if state["train_state"].get("best_step") == state["train_state"].get("step"):
        trainer.best_weights = trainer.backend.local_state_dict(trainer.model)

    fields = {f.name for f in dataclasses.fields(trainer.state)}
    trainer.state = type(trainer.state)(**{k: v for k, v in state["train_state"].items() if k in fields})
    sched = trainer.scheduler
    sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(sched.lr_lambdas)})
    resume_check.reapply_hyperparameters(sched, config_groups)  # this config's lr, weight decay, betas, base lrs
    # The schedule is a pure function of the step: recompute the lr from the (maybe longer) new
    # schedule, the same expression LambdaLR uses, so an unchanged config gives identical values.
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        group["lr"] = base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    # No RNG state to restore: every random stream is a function of (seed, rank, step) (distrain.train.rng).
    trainer._last_saved_step = trainer.state.step if path.name.startswith("step_") else -1
    # Last, once nothing can refuse the resume any more: a rewind continues this lineage.
    set_aside_future(path, trainer.run_dir, trainer.rank, trainer.world_size)
    return path


def _first_loadable(
    trainer: Any, skipped: list[str]
) -> tuple[Path, dict[str, Any], Any, Any, list[resume_check.Decision]] | None:
    """(checkpoint, its trainer state, model values, optimizer values, decisions on changed settings)
    of the checkpoint `resume=` picks, loaded into the live model's tensors; the next good one when
    one fails to load (auto or a run dir); None for resume=auto with no checkpoint. Why each
    damaged one was passed over goes to `skipped`."""
    cfg = trainer.cfg
    tried: list[str] = []  # checkpoints that failed while loading them
    why = ""
    while True:
        chosen = choose(str(cfg.resume), trainer.run_dir, trainer.rank, trainer.world_size, tuple(tried),
                        skipped=skipped)  # fmt: skip
        if chosen is None and (tried or step_dirs(trainer.run_dir / CKPT_DIR)):
            # Starting from scratch over damaged checkpoints would silently drop the run's progress
            # (and, after a partial load, start from a state that is not the fresh one).
            partly = f"; {tried[-1]} was partly loaded before {why}" if tried else ""
            raise CheckpointError(f"no checkpoint in {trainer.run_dir / CKPT_DIR} verifies{partly}: move the "
                                  "damaged ones aside to start from scratch")  # fmt: skip
        if chosen is None:
            return None
        path, index = chosen
        state = read_json(path / STATE)
        model_state, optim_state = trainer.backend.checkpoint_state(trainer.model, trainer.optimizer)
        try:
            check_fits(path, index, state, model_state, trainer.recipe.name)
        except CheckpointError as e:  # name the settings that made the shapes differ
            changed = resume_check.changed_settings(cfg, path, ("model.",))
            raise CheckpointError(f"{e}{'; changed: ' + ', '.join(changed) if changed else ''}") from None
        # Refused settings (another optimizer, seed, batch) by name, before loading fails on what they changed.
        notes = resume_check.check(cfg, path, state, trainer.plan, trainer.lr)
        best = find_best(path, state, trainer.rank, trainer.world_size)
        if best is not None:  # rebuild the in-memory best snapshot the interrupted run had
            best_path, best_index = best
            try:
                best_values, _ = load_verified(best_path, model_state, None, best_index, trainer.rank,
                                               trainer.world_size, verified=True)  # fmt: skip
                trainer.backend.load_checkpoint_state(trainer.model, trainer.optimizer, best_values, None)
                trainer.best_weights = trainer.backend.local_state_dict(trainer.model)
            except CheckpointError as e:  # on every rank alike; the main load below overwrites every tensor
                if trainer.rank == 0:
                    log.warning("best checkpoint not usable: %s", e)
        try:
            model_values, optim_values = load_verified(path, model_state, optim_state, index, trainer.rank,
                                                       trainer.world_size)  # fmt: skip
            return path, state, model_values, optim_values, notes
        except CheckpointError as e:  # on every rank alike (load_verified agrees)
            if path == Path(cfg.resume):  # the very checkpoint asked for
                raise
            skipped.append(str(e))
            tried.append(path.name)
            why = "its checksums failed" if isinstance(e, ChecksumError) else "it failed to load"
