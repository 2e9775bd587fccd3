"""TrainState: the position and counters of a run, which a checkpoint restores."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    """Everything that changes as training runs; what a checkpoint has to restore."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # samples of the current epoch's order already trained on
    best_metric: float | None = None
    best_step: int = -1
    best_epoch: int = -1
    bad_evals: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    stopped_early: bool = False
    last_eval_step: int = -1  # so a resume neither repeats an evaluation nor loses one
    rows_logged: int = 0  # metrics.jsonl lines written up to this state (rank 0's count)
    elapsed: float = 0.0  # seconds of training in this lineage up to this state, over all resumed segments
    segments: int = 1  # processes this lineage ran in (1 + resumes)
