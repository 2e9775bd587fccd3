"""Metrics rows: metrics.jsonl (rank 0 only), summary.json, peak memory and the Slurm job's identity."""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on this device, or the peak resident set size of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux



def scalars(row: dict[str, Any]) -> dict[str, float]:
    """Only the finite-or-not plain numbers of a row, for trackers."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}



def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value



class MetricsLogger:
    """metrics.jsonl rows, tracker logs and the tqdm bar, all on rank 0."""

    def __init__(self, accelerator: Any, run_dir: Path, total_steps: int, start_step: int, progress: bool,
                 rows: int = 0):  # fmt: skip
        self.accelerator = accelerator
        self.rows = rows  # lines in metrics.jsonl: a checkpoint records it, so a resume knows which are its own
        self.is_main = accelerator.is_main_process
        self.bar = None
        self.file = None
        if self.is_main:
            self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - lives as long as the run
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, leave=True)

    def log(self, row: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        assert self.file is not None
        self.file.write(json.dumps(_json_safe(row)) + "\n")
        self.rows += 1
        if self.accelerator.trackers:
            self.accelerator.log(scalars(row), step=step)

    def advance(self, steps: int, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()



SUPERSEDED = "metrics.superseded.jsonl"



def supersede_rows(run_dir: Path, keep: int, marker: dict[str, Any] | None = None) -> tuple[int, int]:
    """Keep the first `keep` rows of metrics.jsonl, the ones the state being continued had written
    (0 for a start from scratch), and move the rest (rows a killed segment wrote after its last
    checkpoint, about to be written again) to metrics.superseded.jsonl; then append `marker`.
    Returns (rows now in metrics.jsonl, rows moved)."""
    path = run_dir / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    kept, moved = lines[:keep], lines[keep:]
    if marker is not None:
        kept.append(json.dumps(marker))
    if moved:
        with open(run_dir / SUPERSEDED, "a") as f:
            f.write("".join(line + "\n" for line in moved))
    if moved or marker is not None:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(kept), len(moved)



def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2) + "\n")
    os.replace(tmp, path)



def slurm_info() -> dict[str, Any]:
    """The Slurm job this run is part of, or {} outside Slurm. A requeued job keeps its id and
    counts up SLURM_RESTART_COUNT, which tells the restarts apart in the log and summary."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return {
        "job_id": f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else job,
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }
