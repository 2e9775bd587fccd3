"""Variable-length token sequences: a per-token loss with a padding mask, padding by collate, ragged outputs.

A test recipe (tests/test_loss_terms.py): each sample is a list of token ids of its own length,
collate pads a batch to its longest sample, the loss is per token [B, T] with a mask and
`loss_terms` counting the labels, and evaluation returns [B, T_batch] outputs and a dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distrain import DataConfig as Base
from distrain import Splits, StepOutput, opt

IGNORE = -100  # label of a padded position


@dataclass
class ModelConfig:
    width: int = opt(8, "embedding width")


@dataclass
class DataConfig(Base):
    train_samples: int = opt(40, "training sequences")
    val_samples: int = opt(13, "validation sequences (13: no even split over 2 ranks)")
    vocab: int = opt(11, "vocabulary size")
    min_len: int = opt(2, "shortest sequence")
    max_len: int = opt(9, "longest sequence")


class Sequences(Dataset):
    """Token lists of random lengths, drawn once from a generator of their own (no global RNG)."""

    def __init__(self, n: int, seed: int, cfg: DataConfig):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (n,), generator=g).tolist()
        self.seqs = [torch.randint(0, cfg.vocab, (k,), generator=g).tolist() for k in lengths]

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"id": i, "tokens": self.seqs[i]}  # a plain list: default collation could not batch these


def build_datasets(cfg: Any) -> Splits:
    d = cfg.data
    return Splits(train=Sequences(d.train_samples, 1, d), val=Sequences(d.val_samples, 2, d), info={"vocab": d.vocab})


def collate(cfg: Any, info: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest sequence; labels are the next token, IGNORE past each sequence's end."""
    longest = max(len(s["tokens"]) for s in samples)
    x = torch.zeros(len(samples), longest, dtype=torch.long)
    y = torch.full((len(samples), longest), IGNORE, dtype=torch.long)
    for j, s in enumerate(samples):
        t = torch.tensor(s["tokens"])
        x[j, : len(t)] = t
        y[j, : len(t) - 1] = t[1:]
    return {"id": torch.tensor([s["id"] for s in samples]), "x": x, "y": y}


class TokenModel(torch.nn.Module):
    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x)))


def build_model(cfg: Any, info: dict[str, Any]) -> torch.nn.Module:
    return TokenModel(info["vocab"], cfg.model.width)


def step(cfg: Any, info: dict[str, Any], model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    logits = model(batch["x"])
    y = batch["y"]
    loss = F.cross_entropy(logits.transpose(1, 2), y.clamp(min=0), reduction="none")  # [B, T]
    preds = {"id": batch["id"], "token": logits.argmax(-1)}
    return StepOutput(loss=loss, mask=y != IGNORE, preds=preds, targets=y)


def loss_terms(cfg: Any, info: dict[str, Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["y"] != IGNORE).sum()


def metrics(cfg: Any, info: dict[str, Any], preds: dict[str, Any], targets: Any) -> dict[str, float]:
    """Token accuracy, and what shows each sample came once, in order: ids and label counts."""
    ids = preds["id"].tolist()
    correct = labels = 0
    for p, t in zip(preds["token"], targets, strict=True):  # rows: of a tensor or of a list alike
        keep = t != IGNORE
        correct += int((p[keep] == t[keep]).sum())
        labels += int(keep.sum())
    return {"accuracy": correct / max(labels, 1), "labels": float(labels), "samples": float(len(ids)),
            "ids_in_order": float(ids == list(range(len(ids)))),
            "ragged": float(isinstance(targets, list))}  # fmt: skip
