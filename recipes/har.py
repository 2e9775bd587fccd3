"""Human-activity recognition from inertial-sensor windows: 1D-conv stem + transformer encoder.

Default data: seglearn's smartwatch recordings (load_watch: 6 IMU channels at 50 Hz, 7 shoulder
exercises, 10 subjects), cut into 128-sample windows with stride 64 and standardised per
channel with training statistics. Split by subject: train 1-7, val 8, test 9-10, so no subject
is in two splits. `data.source=uci_har data.path=<UCI HAR Dataset>` reads the official UCI HAR
layout instead (9 channels, 6 activities; val = the last 4 training subjects).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distrain import ConfigError, Splits, StepOutput, opt
from distrain import DataConfig as BaseDataConfig
from distrain.observe.classification import classification_metrics, save_confusion

UCI_CHANNELS = [f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc") for axis in "xyz"]
UCI_LABELS = ["WALKING", "UPSTAIRS", "DOWNSTAIRS", "SITTING", "STANDING", "LAYING"]


@dataclass
class ModelConfig:
    width: int = opt(64, "channels of the conv stem and transformer width")
    depth: int = opt(2, "transformer encoder blocks")
    heads: int = opt(4, "attention heads")
    dropout: float = opt(0.1, "dropout in the encoder and before the head")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    freeze_encoder: bool = opt(False, "train only the classification head (two-stage fine-tuning)")


@dataclass
class DataConfig(BaseDataConfig):
    source: Literal["watch", "uci_har"] = opt("watch", "watch: seglearn's embedded data; uci_har: the UCI HAR folder")
    path: str | None = opt(None, "UCI HAR Dataset folder (for source=uci_har)", must_exist=True)
    window: int = opt(128, "samples per window (watch source)")
    stride: int = opt(64, "samples between window starts (watch source)")


def validate(cfg) -> None:
    if cfg.data.source == "uci_har" and not cfg.data.path:
        raise ConfigError("data.source=uci_har needs data.path=<UCI HAR Dataset folder>")


def _windows(recordings, labels, subjects, window: int, stride: int):
    xs, ys, ss = [], [], []
    for rec, y, s in zip(recordings, labels, subjects):
        starts = range(0, len(rec) - window + 1, stride)
        xs += [rec[i : i + window].T for i in starts]
        ys += [y] * len(starts)
        ss += [s] * len(starts)
    return np.stack(xs).astype(np.float32), np.array(ys), np.array(ss)


def _read_txt(root: str | Path, path: Path, dtype: type, ndmin: int) -> np.ndarray:
    """One UCI HAR text file; anything but rows of numbers is one ConfigError line naming the file."""
    try:
        with warnings.catch_warnings():  # an empty file: numpy warns, and the check below says it in one line
            warnings.simplefilter("ignore", UserWarning)
            a = np.loadtxt(path, dtype=dtype, ndmin=ndmin)
    except OSError as e:
        raise ConfigError(f"data.path={root} is not a UCI HAR folder: {path}: {e.strerror or e}") from None
    except ValueError as e:  # words, a ragged row, or a float where a label belongs
        raise ConfigError(f"data.path={root}: {path} is not rows of numbers: {str(e).splitlines()[0]}") from None
    if len(a) == 0:
        raise ConfigError(f"data.path={root}: {path} holds no rows")
    return a


def load_uci_har(root: str | Path) -> dict[str, np.ndarray]:
    """UCI HAR: <root>/{train,test}/Inertial Signals/<channel>_<split>.txt (rows of 128), y_*.txt, subject_*.txt."""
    out = {}
    for split in ("train", "test"):
        d = Path(root) / split
        files = [d / "Inertial Signals" / f"{c}_{split}.txt" for c in UCI_CHANNELS]
        channels = [_read_txt(root, f, np.float64, 2) for f in files]
        y = _read_txt(root, d / f"y_{split}.txt", np.int64, 1) - 1
        s = _read_txt(root, d / f"subject_{split}.txt", np.int64, 1)
        for f, c in zip(files, channels):
            if c.shape != channels[0].shape:
                raise ConfigError(f"data.path={root}: {f} has shape {c.shape} but {files[0]} has {channels[0].shape}")
        for f, a in ((d / f"y_{split}.txt", y), (d / f"subject_{split}.txt", s)):
            if a.ndim != 1 or len(a) != len(channels[0]):
                raise ConfigError(f"data.path={root}: {f} has {len(a)} rows but the signals have {len(channels[0])}")
        if y.min() < 0 or y.max() >= len(UCI_LABELS):
            raise ConfigError(f"data.path={root}: y_{split}.txt labels must be 1..{len(UCI_LABELS)}")
        if not all(np.isfinite(c).all() for c in channels):
            raise ConfigError(f"data.path={root}: the {split} signals hold NaN/inf values")
        x = np.stack(channels, 1)
        out |= {f"x_{split}": x.astype(np.float32), f"y_{split}": y, f"s_{split}": s}
    return out


def load_watch() -> dict:
    """seglearn.datasets.load_watch without importing seglearn (1.4 s of scikit-learn imports)."""
    spec = importlib.util.find_spec("seglearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.source=watch needs the seglearn package: pip install seglearn")
    path = Path(spec.submodule_search_locations[0]) / "data" / "watch_dataset.npy"
    return np.load(path, allow_pickle=True).item()  # the package's own data file, a pickled dict


def load_arrays(source: str, path: str | None, window: int, stride: int):
    """(x, y, subject) per split, standardised with training statistics, and the class names."""
    if source == "uci_har":
        d = load_uci_har(path)
        val_subjects = np.unique(d["s_train"])[-4:]
        in_val = np.isin(d["s_train"], val_subjects)
        splits = {"train": ~in_val, "val": in_val}
        parts = {k: (d["x_train"][m], d["y_train"][m], d["s_train"][m]) for k, m in splits.items()}
        parts["test"] = (d["x_test"], d["y_test"], d["s_test"])
        labels = UCI_LABELS
    else:
        w = load_watch()
        x, y, s = _windows(w["X"], w["y"], w["subject"], window, stride)
        groups = {"train": s <= 7, "val": s == 8, "test": s >= 9}
        parts = {k: (x[m], y[m], s[m]) for k, m in groups.items()}
        labels = list(w["y_labels"])
    mean = parts["train"][0].mean(axis=(0, 2), keepdims=True)
    std = parts["train"][0].std(axis=(0, 2), keepdims=True) + 1e-6
    arrays = {k: ((x - mean) / std, y, s) for k, (x, y, s) in parts.items()}
    return arrays, labels


def build_datasets(cfg) -> Splits:
    arrays, labels = load_arrays(cfg.data.source, cfg.data.path, cfg.data.window, cfg.data.stride)
    tensors = {k: {"x": torch.from_numpy(x), "y": torch.from_numpy(y)} for k, (x, y, _) in arrays.items()}
    _, channels, length = arrays["train"][0].shape
    info = {"labels": [str(label) for label in labels], "channels": channels, "length": length}
    return Splits(train=tensors["train"], val=tensors["val"], test=tensors["test"], info=info)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; the unit that FSDP shards and activation checkpointing wraps."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        hidden = 2 * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class HARModel(nn.Module):
    def __init__(self, channels: int, classes: int, length: int, m: ModelConfig):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(channels, m.width, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(m.width, m.width, 5, stride=2, padding=2), nn.GELU(),
        )  # fmt: skip
        self.pos = nn.Parameter(torch.zeros(1, (length + 3) // 4, m.width))
        self.blocks = nn.ModuleList(EncoderBlock(m.width, m.heads, m.dropout) for _ in range(m.depth))
        self.norm = nn.LayerNorm(m.width)
        self.head = nn.Sequential(nn.Dropout(m.dropout), nn.Linear(m.width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


SHARD_BLOCKS = ("EncoderBlock",)


def build_model(cfg, info: dict) -> nn.Module:
    model = HARModel(info["channels"], len(info["labels"]), info["length"], cfg.model)
    if cfg.model.freeze_encoder:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("head.")
    return model


def step(cfg, info: dict, model: nn.Module, batch: dict) -> StepOutput:
    logits = model(batch["x"])
    loss = F.cross_entropy(logits.float(), batch["y"], reduction="none", label_smoothing=cfg.model.label_smoothing)
    return StepOutput(loss=loss, preds=logits.argmax(-1), targets=batch["y"])


def metrics(cfg, info: dict, preds: torch.Tensor, targets: torch.Tensor) -> dict:
    return classification_metrics(preds, targets, num_classes=len(info["labels"]))


def report(cfg, info: dict, run_dir: Path, split: str, preds: torch.Tensor, targets: torch.Tensor) -> None:
    labels = info["labels"]
    save_confusion(run_dir, split, classification_metrics(preds, targets, len(labels))["confusion_matrix"], labels)
