"""Test recipe: one small classifier fed from each kind of data source distrain accepts (tests/test_data_sources.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, Subset

from distrain import DataConfig as Base
from distrain import Splits, StepOutput, TokenFile, opt

FEATURES, CLASSES, VOCAB, BLOCK = 8, 3, 16, 8


@dataclass
class ModelConfig:
    hidden: int = opt(16, "hidden units")
    dropout: float = opt(0.1, "dropout before the output layer")


@dataclass
class DataConfig(Base):
    source: str = opt("tensors", "tensors | subset | hf_strings | tokens | hf_stream | torch_stream | "
                      "torch_stream_nostate")
    dir: str = opt("", "folder of the files written by tests/test_data_sources.write_files")


def samples(n: int, seed: int) -> list[dict]:
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, FEATURES))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)
    return [{"x": [float(v) for v in x[i]], "y": int(y[i]), "text": f"sample {seed}-{i}" * (1 + i % 3)}
            for i in range(n)]


class JsonLines(IterableDataset):
    """A torch stream of a JSON-lines file; with `stateful`, the Stateful protocol (the line reached)."""

    def __init__(self, path: Path, stateful: bool = True):
        self.path, self.line, self.start = path, 0, 0
        if stateful:
            self.state_dict = lambda: {"line": self.line}
            self.load_state_dict = self._load

    def _load(self, state: dict) -> None:
        self.start = state["line"]

    def __iter__(self):
        start, self.start = self.start, 0
        with open(self.path) as f:
            for i, line in enumerate(f):
                if i < start:
                    continue
                self.line = i + 1
                row = json.loads(line)
                yield {"x": torch.tensor(row["x"]), "y": row["y"], "text": row["text"]}


class Rows(Dataset):
    """A map-style Dataset of dict samples without __getitems__ (torch's default fetch path)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        return {"x": torch.tensor(r["x"]), "y": r["y"]}


def columns(rows: list[dict]) -> dict:
    return {"x": torch.tensor([r["x"] for r in rows], dtype=torch.float32), "y": torch.tensor([r["y"] for r in rows])}


def build_datasets(cfg) -> Splits:
    d = cfg.data
    root = Path(d.dir)
    val_rows = [json.loads(line) for line in (root / "val.jsonl").read_text().splitlines()] if d.dir else samples(40, 9)
    info = {"lm": d.source == "tokens"}
    if d.source == "tokens":
        return Splits(train=TokenFile(root / "train.bin", BLOCK), val=TokenFile(root / "val.npy", BLOCK), info=info)
    if d.source == "tensors":
        return Splits(train=columns(samples(160, 1)), val=columns(val_rows), info=info)
    if d.source == "subset":  # what random_split returns, over a Dataset without __getitems__
        full = Rows(samples(200, 1))
        train, val = torch.utils.data.random_split(full, [160, 40], generator=torch.Generator().manual_seed(0))
        assert isinstance(train, Subset)
        return Splits(train=train, val=val, info=info)
    import datasets

    if d.source == "hf_strings":  # a string and a ragged column next to the numeric ones
        rows = samples(160, 1)
        for i, r in enumerate(rows):
            r["ragged"] = list(range(i % 4))
        return Splits(train=datasets.Dataset.from_list(rows), val=datasets.Dataset.from_list(val_rows), info=info)
    files = sorted(str(p) for p in root.glob("train-[0-9].jsonl"))
    if d.source == "hf_stream":
        train = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        val = datasets.load_dataset("json", data_files=str(root / "val.jsonl"), split="train", streaming=True)
        return Splits(train=train, val=val, info=info)
    stateful = d.source == "torch_stream"
    return Splits(train=JsonLines(root / "train-all.jsonl", stateful), val=columns(val_rows), info=info)


def build_model(cfg, info) -> torch.nn.Module:
    h = cfg.model.hidden
    if info["lm"]:
        return torch.nn.Sequential(torch.nn.Embedding(VOCAB, h), torch.nn.Dropout(cfg.model.dropout),
                                   torch.nn.Linear(h, VOCAB))
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, h), torch.nn.ReLU(), torch.nn.Dropout(cfg.model.dropout),
                               torch.nn.Linear(h, CLASSES))


def step(cfg, info, model, batch) -> StepOutput:
    if info["lm"]:
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none").mean(1)
        return StepOutput(loss=loss, preds=logits[:, -1].argmax(-1), targets=batch["labels"][:, -1])
    if "text" in batch:
        assert isinstance(batch["text"], list) and isinstance(batch["text"][0], str)
    logits = model(batch["x"].float())
    y = batch["y"].long()
    return StepOutput(loss=F.cross_entropy(logits, y, reduction="none"), preds=logits.argmax(-1), targets=y)


def metrics(cfg, info, preds, targets) -> dict:
    return {"accuracy": float((preds == targets).float().mean())}
