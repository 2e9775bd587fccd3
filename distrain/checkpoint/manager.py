"""CheckpointManager: a Trainer's saves at step boundaries, its resume, and the threads they use.

Modelled on torchtitan's components/checkpoint.py: the manager owns its writer threads, the
bookkeeping they have not finished and the index-layout cache (a save.CheckpointWriter), so two
trainers in one process share none of them. What it saves of the trainer beside the backend's
model and optimizer state is the trainer's `state_dict()` (trainer_state.json); a resume hands
that back through `load_state_dict()`. The file format, atomic writes, verification and loading
live beside it in distrain/checkpoint/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from distrain.checkpoint import resume_check
from distrain.checkpoint.collective import is_dist
from distrain.checkpoint.find import choose, find_best, find_best_in, set_aside_future, warn_skips, with_skips
from distrain.checkpoint.format import CKPT_DIR, STATE, read_json, step_dirs
from distrain.checkpoint.load import check_fits, load_verified
from distrain.checkpoint.save import CheckpointWriter
from distrain.errors import CheckpointError, ChecksumError

log = logging.getLogger("distrain")


class Checkpointed(Protocol):
    """What the manager needs of the trainer it checkpoints (distrain.train.trainer.Trainer)."""

    cfg: Any
    run_dir: Path
    rank: int
    world_size: int
    backend: Any
    model: Any
    optimizer: Any
    recipe: Any
    plan: Any
    lr: float

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Resumed:
    """What a resume restored besides the trainer's state_dict."""

    path: Path  # the checkpoint resumed from
    notes: list[resume_check.Decision]  # each setting that differs from the checkpoint's, and its verdict
    # This rank's part of the lineage's best weights, kept in memory only without ckpt.save_best (or when no
    # best/ holds them); with it, load_best reads them from best/ at the end.
    best_weights: dict[str, torch.Tensor] | None


@dataclass
class _Loaded:
    """A checkpoint `resume=` picked, its values already read into tensors laid out like the live ones."""

    path: Path
    state: dict[str, Any]
    model_values: Any
    optim_values: Any
    notes: list[resume_check.Decision]
    best_weights: dict[str, torch.Tensor] | None


def _log_saved(path: Path) -> None:
    log.info("checkpoint saved: %s", path)


def async_group() -> Any:
    """A gloo process group of every rank for background saves' gathers; None for one process."""
    if not is_dist():
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


class CheckpointManager:
    """Saves and resumes one trainer; all ranks call save and resume at the same step boundary."""

    def __init__(self, trainer: Checkpointed) -> None:
        self.trainer = trainer
        self.writer = CheckpointWriter()
        self.last_saved_step = -1  # the step of the step_* checkpoint saved or resumed from last (-1: none)
        self.resumed_from: Path | None = None  # the checkpoint resumed from: its folder may hold the lineage's best/
        self.async_save = bool(trainer.cfg.ckpt.async_save)
        # A background save's checksum gather runs while the loop issues its own collectives: it gets
        # a gloo group of its own, created here, where every rank constructs its manager at once.
        self._group = async_group() if self.async_save else None

    def save(self, name: str) -> Path:
        """Save the trainer's full state as checkpoint `name` (step_<N> or best); with
        ckpt.async_save, return once it is copied to host memory and write it in the background."""
        import yaml

        from distrain.config import to_plain

        t = self.trainer
        model_state, optim_state = t.backend.checkpoint_state(t.model, t.optimizer)
        state = t.state_dict()
        keep = t.cfg.ckpt.keep_last if name.startswith("step_") else None
        args = (t.run_dir, name, model_state, optim_state, state, yaml.safe_dump(to_plain(t.cfg), sort_keys=False),
                t.rank, t.world_size, keep)  # fmt: skip
        if self.async_save:  # returns once the state is on the host; logged when committed
            path = self.writer.save(*args, background=True, group=self._group, done=_log_saved)
        else:
            path = self.writer.save(*args)
            _log_saved(path)
        if name.startswith("step_"):
            self.last_saved_step = int(state["step"])
        return path

    def flush(self) -> None:
        """Wait until the save in flight is committed and `latest` and retention of every finished
        save are done (errors re-raised)."""
        self.writer.flush()

    def settle(self) -> None:
        """Wait for the save in flight of a run that is failing; its error is logged, not raised."""
        self.writer.settle()

    def close(self) -> None:
        """flush, then end the writer threads (a later save starts new ones)."""
        self.writer.close()

    def load_best(self, best_step: int) -> bool:
        """Load the best weights (step `best_step`, model only) into the live model from a best/ checkpoint
        on disk, this run's or the resumed lineage's, each rank reading only its own part; False (nothing
        changed) if none of that step verifies. All ranks call it."""
        t = self.trainer
        roots = [t.run_dir / CKPT_DIR]
        if self.resumed_from is not None and self.resumed_from.parent.resolve() != roots[0].resolve():
            roots.append(self.resumed_from.parent)
        for root in roots:
            found = find_best_in(root, best_step, t.rank, t.world_size)
            if found is None:
                continue
            model_state, _ = t.backend.checkpoint_state(t.model, t.optimizer)
            values, _ = load_verified(found[0], model_state, None, found[1], t.rank, t.world_size, verified=True)
            t.backend.load_checkpoint_state(t.model, t.optimizer, values, None)
            return True
        return False

    def resume(self) -> Resumed | None:
        """Restore the trainer from `resume=auto|<path>`: weights, optimizer, then its state_dict
        (schedule, scaler, position); None for resume=auto with no checkpoint.

        Runs before anything is written to the run dir, so a checkpoint that does not fit raises
        CheckpointError (exit 2) and leaves the run dir as it was.
        """
        t = self.trainer
        if t.cfg.resume == "auto" and not t.cfg.output_dir:
            raise CheckpointError("resume=auto needs output_dir=<run dir> to look for checkpoints in")
        # Why damaged checkpoints were passed over: warnings once one loads, part of the one-line error if none does.
        skipped: list[str] = []
        try:
            chosen = self._first_loadable(skipped)
        except CheckpointError as e:
            if not skipped:
                raise
            raise CheckpointError(with_skips(str(e), skipped)) from None
        if t.rank == 0:
            warn_skips(skipped)
        if chosen is None:
            log.warning("resume=auto: no complete checkpoint in %s; starting from scratch", t.run_dir)
            return None
        t.backend.load_checkpoint_state(t.model, t.optimizer, chosen.model_values, chosen.optim_values)
        best_weights = chosen.best_weights
        train_state = chosen.state["train_state"]
        best_step = train_state.get("best_step", -1)
        if best_step == train_state.get("step") and best_step != -1 and (
            not t.cfg.ckpt.save_best or find_best_in(chosen.path.parent, best_step, t.rank, t.world_size) is None
        ):  # the best weights are the ones just loaded, and no best/ holds them
            best_weights = t.backend.local_state_dict(t.model)
        self.resumed_from = chosen.path
        t.load_state_dict(chosen.state)
        self.last_saved_step = int(train_state.get("step", 0)) if chosen.path.name.startswith("step_") else -1
        # Last, once nothing can refuse the resume any more: a rewind continues this lineage.
        set_aside_future(chosen.path, t.run_dir, t.rank, t.world_size)
        return Resumed(chosen.path, chosen.notes, best_weights)

    def _first_loadable(self, skipped: list[str]) -> _Loaded | None:
        """The checkpoint `resume=` picks, loaded into the live model's tensors; the next good one
        when one fails to load (auto or a run dir); None for resume=auto with no checkpoint. Why
        each damaged one was passed over goes to `skipped`."""
        t = self.trainer
        cfg = t.cfg
        tried: list[str] = []  # checkpoints that failed while loading them
        why = ""
        best_weights: dict[str, torch.Tensor] | None = None
        while True:
            chosen = choose(str(cfg.resume), t.run_dir, t.rank, t.world_size, tuple(tried), skipped=skipped)
            if chosen is None and (tried or step_dirs(t.run_dir / CKPT_DIR)):
                # Starting from scratch over damaged checkpoints would silently drop the run's progress
                # (and, after a partial load, start from a state that is not the fresh one).
                partly = f"; {tried[-1]} was partly loaded before {why}" if tried else ""
                raise CheckpointError(f"no checkpoint in {t.run_dir / CKPT_DIR} verifies{partly}: move the "
                                      "damaged ones aside to start from scratch")  # fmt: skip
            if chosen is None:
                return None
            path, index = chosen
            state = read_json(path / STATE)
            model_state, optim_state = t.backend.checkpoint_state(t.model, t.optimizer)
            try:
                check_fits(path, index, state, model_state, t.recipe.name)
            except CheckpointError as e:  # name the settings that made the shapes differ
                changed = resume_check.changed_settings(cfg, path, ("model.",))
                raise CheckpointError(f"{e}{'; changed: ' + ', '.join(changed) if changed else ''}") from None
            # Refused settings (another optimizer, seed, batch) by name, before loading fails on what they changed.
            notes = resume_check.check(cfg, path, state, t.plan, t.lr)
            # Without ckpt.save_best the best weights are kept in memory: rebuild the interrupted run's copy
            # (with it, load_best reads best/ at the end).
            best = None if cfg.ckpt.save_best else find_best(path, state, t.rank, t.world_size)
            if best is not None:
                best_path, best_index = best
                try:
                    best_values, _ = load_verified(best_path, model_state, None, best_index, t.rank, t.world_size,
                                                   verified=True)  # fmt: skip
                    t.backend.load_checkpoint_state(t.model, t.optimizer, best_values, None)
                    best_weights = t.backend.local_state_dict(t.model)
                except CheckpointError as e:  # on every rank alike; the main load below overwrites every tensor
                    if t.rank == 0:
                        log.warning("best checkpoint not usable: %s", e)
            try:
                model_values, optim_values = load_verified(path, model_state, optim_state, index, t.rank,
                                                           t.world_size)  # fmt: skip
                return _Loaded(path, state, model_values, optim_values, notes, best_weights)
            except CheckpointError as e:  # on every rank alike (load_verified agrees)
                if path == Path(cfg.resume):  # the very checkpoint asked for
                    raise
                skipped.append(str(e))
                tried.append(path.name)
                why = "its checksums failed" if isinstance(e, ChecksumError) else "it failed to load"
