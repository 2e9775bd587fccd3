"""Shared helpers for tests that start real distrain processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
RUN_PY = REPO / "distrain" / "run.py"
BIN = Path(sys.executable).parent

# A tiny har model and short run: seconds per launch on 2 CPU cores. Every other setting is the
# recipe's default, dropout included.
TINY_HAR = [
    "recipe=har",
    "model.width=16",
    "model.depth=1",
    "model.heads=2",
    "log.progress=false",
    "log.every=1",
]
# Only for tests that compare runs whose dropout masks differ by construction (another world size,
# another split into micro-batches, a one-batch reference forward): dropout off there.
NO_DROPOUT = ["model.dropout=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distrain(
    args: list[str],
    launch_config: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
    extra_launch_args: list[str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """`python distrain/run.py ARGS`, or through `accelerate launch --config_file launch_configs/<name>.yaml`."""
    if launch_config is None:
        cmd = [sys.executable, str(RUN_PY), *args]
    else:
        cmd = [
            str(BIN / "accelerate"), "launch",
            "--config_file", str(REPO / "launch_configs" / f"{launch_config}.yaml"),
            "--main_process_port", str(free_port()),
            *(extra_launch_args or []),
            str(RUN_PY), *args,
        ]  # fmt: skip
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[float]:
    """Per-step training losses (needs log.every=1)."""
    return [r["loss"] for r in metrics_rows(run_dir) if "loss" in r]


def weights(run_dir: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / name))
