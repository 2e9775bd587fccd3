"""Classification metrics and the confusion-matrix artefacts shared by classifier recipes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """accuracy, macro_f1 (mean over classes present in targets or preds), per-class accuracy, confusion matrix."""
    cm = confusion_matrix(preds, targets, num_classes).double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0 * tp)
    present = (support > 0) | (predicted > 0)
    return {
        "accuracy": float(tp.sum() / cm.sum().clamp(min=1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": [round(float(r), 6) for r in recall],
        "confusion_matrix": cm.long().tolist(),
    }


def save_confusion(run_dir: Path, split: str, cm: Sequence[Sequence[int]], labels: Sequence[str]) -> None:
    """confusion_<split>.json and a PNG heat map with counts."""
    (run_dir / f"confusion_{split}.json").write_text(json.dumps({"labels": list(labels), "matrix": cm}, indent=1))
    plot_confusion(run_dir / f"confusion_{split}.png", labels, cm, split)


def plot_confusion(path: Path, labels: Sequence[str], cm: Sequence[Sequence[int]], split: str) -> None:
    """A heat map of a confusion matrix (rows true, columns predicted) with the counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in cm) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, cm[i][j], ha="center", va="center", color="white" if cm[i][j] > peak / 2 else "black")
    ax.set_title(f"confusion matrix ({split})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
