"""A run's life around the training loop: its run dir (chosen, locked, config.yaml), which metrics
rows it continues, and what it leaves at the end (final and best weights, the test split's
metrics and the recipe's report, summary.json)."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from distrain.checkpoint.weights import save_weights
from distrain.config import Config, to_plain
from distrain.errors import ConfigError
from distrain.observe.metrics import SUPERSEDED, slurm_info, supersede_rows, write_json
from distrain.train import run_lock
from distrain.train.state import TrainState

log = logging.getLogger("distrain")


def new_run_dir(cfg: Config) -> Path:
    """output_dir, or a fresh runs/<recipe>/<timestamp>[-n]."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / Path(cfg.recipe).stem / stamp
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{stamp}-{n}"), n + 1
    return path


def claim_run_dir(cfg: Config, accelerator: Any, rank: int, world: int) -> tuple[Path, run_lock.RunLock | None]:
    """The run dir and rank 0's lock on it: rank 0 picks the directory (a timestamp could differ
    between ranks) and creates it; a refusal raises ConfigError on every rank."""
    from accelerate.utils import broadcast_object_list

    chosen: list[str | None] = [None, None]  # the run dir, and rank 0's refusal to use it
    lock: run_lock.RunLock | None = None
    if rank == 0:
        chosen[0] = str(new_run_dir(cfg))
        try:  # one training per folder, and no fresh run over a finished one: before anything is written
            lock = run_lock.take(chosen[0], cfg.resume)
        except ConfigError as e:
            chosen[1] = str(e)
    if world > 1:
        broadcast_object_list(chosen, from_process=0)
    if chosen[1]:
        raise ConfigError(chosen[1])  # on every rank, so none waits for the others
    accelerator.wait_for_everyone()
    return Path(chosen[0]), lock  # type: ignore[arg-type]


def write_config(cfg: Config, run_dir: Path, rank: int, accelerator: Any) -> None:
    """config.yaml: what `config=<run>/config.yaml` reruns."""
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
    accelerator.wait_for_everyone()


def continue_rows(state: TrainState, resumed_from: Path | None, run_dir: Path, rank: int) -> None:
    """metrics.jsonl keeps the rows of the state this run continues (those its checkpoint counted
    when it came from this run dir; none for a start from scratch) and marks a resume; rows a
    killed segment wrote later go to metrics.superseded.jsonl, so each step appears once."""
    own = resumed_from is not None and resumed_from.parent.parent.resolve() == run_dir.resolve()
    marker = None if resumed_from is None else {"event": "resume", "step": state.step, "from": str(resumed_from),
                                                "segment": state.segments}  # fmt: skip
    if rank == 0:
        state.rows_logged, moved = supersede_rows(run_dir, state.rows_logged if own else 0, marker)
        if moved:
            log.info("%d metrics.jsonl rows of an interrupted segment (after the state continued here) moved "
                     "to %s", moved, SUPERSEDED)  # fmt: skip


def finish(trainer: Any, exit_code: int, wall: float) -> dict[str, Any]:
    """End a trained Trainer's run: its checkpoints' bookkeeping, the final weights; unless
    interrupted, the best weights, the test split's metrics and report, and summary.json, which
    it returns ({exit_code, step} when interrupted). Releases the run dir."""
    t, s = trainer, trainer.state
    t.checkpoints.close()  # `latest` and retention of the last saves, done in the background
    final = t.backend.full_state_dict(t.model)
    meta = t.recipe.weights_metadata()  # load_model(run dir) needs no data
    if t.rank == 0:
        save_weights(final, t.run_dir / "model.safetensors", metadata={"step": str(s.step), **meta})
    del final  # rank 0 holds the consolidated model once, not beside the best one
    if t.cfg.log.save_rank_weights:
        local = t.backend.local_state_dict(t.model)
        save_weights({k: _local(v) for k, v in local.items()}, t.run_dir / f"rank_{t.rank}.safetensors")
    if exit_code:
        close_trackers(t.accelerator)
        t.accelerator.wait_for_everyone()
        t.release_run_dir()
        return {"exit_code": exit_code, "step": s.step}
    test_metrics: dict[str, Any] = {}
    if s.best_step not in (-1, s.step) and t.restore_best():
        best = t.backend.full_state_dict(t.model)
        if t.rank == 0:
            save_weights(best, t.run_dir / "best_model.safetensors", metadata={"step": str(s.best_step), **meta})
    else:
        if s.best_step not in (-1, s.step):
            log.warning("the best weights (step %d) were not restorable; the test split uses the final ones",
                        s.best_step)  # fmt: skip
        if t.rank == 0:  # an earlier segment's (a finished run continued with a larger max_steps)
            (t.run_dir / "best_model.safetensors").unlink(missing_ok=True)
    if "test" in t.datasets:
        test = t.evaluate("test")
        test_metrics = test.metrics
        log.info("test: %s", ", ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if isinstance(v, float)))
        if t.rank == 0 and t.recipe.report is not None:
            t.recipe.report(t.run_dir, "test", test.preds, test.targets)
    summary = {
        "recipe": t.recipe.name,
        "steps": s.step,
        "epochs_completed": s.epoch,
        "best_step": s.best_step,
        "best_epoch": s.best_epoch,
        "best_metric": {t.cfg.train.metric: s.best_metric},
        "test": test_metrics,
        "stopped_early": s.stopped_early,
        "skipped_steps": s.skipped_steps,
        "wall_time_s": round(wall, 3),  # all segments of a resumed run, up to each one's last checkpoint
        "samples_per_s": round(s.step * t.plan.global_batch / wall, 2) if wall > 0 else 0.0,
        "segments": s.segments,
        "world_size": t.world_size,
        "backend": t.backend.name,
        "run_dir": str(t.run_dir),
    }
    slurm = slurm_info()
    if slurm:
        summary["slurm"] = slurm
    if t.rank == 0:
        write_json(t.run_dir / "summary.json", summary)
        log.info("done in %.1f s; summary in %s", wall, t.run_dir / "summary.json")
    close_trackers(t.accelerator)
    t.release_run_dir()
    return summary


def close_trackers(accelerator: Any) -> None:
    """Finish the experiment trackers (wandb, tensorboard, ...)."""
    # Not accelerator.end_training(): it also destroys the process group while other ranks may
    # still be writing, which aborts gloo ranks; parallel.launch.leave_process_group ends multi-process runs.
    for tracker in accelerator.trackers:
        tracker.finish()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
