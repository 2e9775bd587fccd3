"""PNG plots that recipes write at the end of a run: loss curves and predictions vs truth."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    return plt


def loss_curves(run_dir: Path, path: Path | None = None) -> Path:
    """Training loss per logged step and validation loss per evaluation, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    val = [(r["step"], r["val/loss"]) for r in rows if isinstance(r.get("val/loss"), (int, float))]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "val" else None, ms=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("loss curves")
    fig.tight_layout()
    path = path or run_dir / "loss_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pred_vs_truth(path: Path, preds: np.ndarray, targets: np.ndarray, names: Sequence[str]) -> Path:
    """One scatter panel per output, with the identity line."""
    preds, targets = np.asarray(preds).reshape(len(preds), -1), np.asarray(targets).reshape(len(targets), -1)
    n = preds.shape[1]
    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    for i, ax in enumerate(axes[0]):
        lo, hi = float(min(targets[:, i].min(), preds[:, i].min())), float(max(targets[:, i].max(), preds[:, i].max()))
        ax.scatter(targets[:, i], preds[:, i], s=8, alpha=0.6)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true {names[i]}")
        ax.set_ylabel(f"predicted {names[i]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
