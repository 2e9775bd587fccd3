"""Trackers (TensorBoard, wandb) through accelerate, started on rank 0 with the flattened config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def init_trackers(accelerator: Any, cfg: Any, run_dir: Path) -> None:
    """TensorBoard / wandb through accelerate. wandb goes offline without an API key and the key
    is never written anywhere by distrain."""
    names = [name for name, on in (("tensorboard", cfg.log.tensorboard), ("wandb", cfg.log.wandb)) if on]
    if not names:
        return
    from accelerate.tracking import filter_trackers

    # The run dir is only known after the Accelerator exists (rank 0 picks it), so trackers are
    # attached here rather than through Accelerator(log_with=...).
    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.log_with = filter_trackers(names, accelerator.logging_dir)
    init_kwargs: dict[str, Any] = {}
    if cfg.log.wandb:
        mode = cfg.log.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        init_kwargs["wandb"] = {"mode": mode, "dir": str(run_dir), "name": run_dir.name}
    from distrain.config import to_plain

    flat = _flatten(to_plain(cfg))
    project = cfg.log.wandb_project if cfg.log.wandb else "tensorboard"
    accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)



def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
