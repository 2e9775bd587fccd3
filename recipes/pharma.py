"""Tabular multi-task model (pharmacogenomics-style): categorical embeddings + numeric features, a class and a value.

The column spec lives in the config: `data.categorical` (read as strings, one embedding table
each), `data.numeric` (standardised, missing values set to the training mean), a
classification target `data.class_target` and a regression target `data.reg_target`, from
`data.path` (CSV or Parquet). No pharmacogenomics table ships in a package, so the default
data is vega_datasets' cars table (406 real cars, 1970-82): categoricals Origin (strings USA /
Europe / Japan) and Year (the model-year date, used as a string category), numerics
displacement, horsepower (6 missing), weight and acceleration; targets: the number of
cylinders (class) and fuel economy in miles per gallon (value). Rows without a target are
dropped. Preprocessing is vectorised (pandas categoricals, numpy), fitted on the training split.
Loss per row: cross-entropy + `model.reg_weight` x squared error of the standardised value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distrain import ConfigError, Splits, StepOutput, opt
from distrain import DataConfig as BaseDataConfig
from distrain.observe.classification import classification_metrics


@dataclass
class ModelConfig:
    hidden: int = opt(128, "width of the shared MLP")
    layers: int = opt(2, "hidden layers of the shared MLP")
    dropout: float = opt(0.1, "dropout after each hidden layer")
    max_embed: int = opt(16, "largest embedding size (a category gets min(max_embed, (levels + 1) // 2 + 1))")
    reg_weight: float = opt(1.0, "weight of the regression loss against the classification loss")


@dataclass
class DataConfig(BaseDataConfig):
    path: str | None = opt(None, "CSV or Parquet table; unset uses vega_datasets' cars", must_exist=True)
    categorical: list[str] = opt(["Origin", "Year"], "categorical columns (values read as strings)")
    numeric: list[str] = opt(["Displacement", "Horsepower", "Weight_in_lbs", "Acceleration"], "numeric columns")
    class_target: str = opt("Cylinders", "classification target column")
    reg_target: str = opt("Miles_per_Gallon", "regression target column")
    val_fraction: float = opt(0.15, "fraction of rows for validation")
    test_fraction: float = opt(0.15, "fraction of rows for the test split")
    split_seed: int = opt(0, "seed of the row permutation that splits the table")


def read_table(path: str | None):
    import pandas as pd

    if path is None:
        from vega_datasets import local_data

        return local_data.cars()
    try:
        return pd.read_parquet(path) if Path(path).suffix in (".parquet", ".pq") else pd.read_csv(path)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"data.path={path} is not a readable CSV/Parquet table: {e}") from None


def load_table(path, categorical, numeric, class_target, reg_target, val, test, seed):
    """Per split: cat codes (n, C) int64 (0 = unseen), numerics (n, K), class ids, standardised values."""
    df = read_table(path)
    for key, cols in (
        ("data.categorical", categorical),
        ("data.numeric", numeric),
        ("data.class_target", (class_target,)),
        ("data.reg_target", (reg_target,)),
    ):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ConfigError(
                f"{key}: {', '.join(missing)} not in the table; columns: {', '.join(map(str, df.columns))}"
            )
    df = df.dropna(subset=[class_target, reg_target]).reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(df))
    n_test, n_val = round(test * len(df)), round(val * len(df))
    idx = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    train = df.iloc[idx["train"]]
    cats = {c: sorted(train[c].dropna().astype(str).unique()) for c in categorical}
    num = df[list(numeric)].to_numpy(np.float64)
    mean, std = np.nanmean(num[idx["train"]], 0), np.nanstd(num[idx["train"]], 0) + 1e-8
    num = np.nan_to_num((num - mean) / std)  # missing -> the training mean
    codes = (
        np.stack(
            [
                (df[c].astype(str).astype("category").cat.set_categories(cats[c]).cat.codes + 1).to_numpy()
                for c in categorical
            ],
            1,
        )
        if categorical
        else np.zeros((len(df), 0))
    )
    classes = sorted(df[class_target].astype(str).unique())
    y_cls = df[class_target].astype(str).astype("category").cat.set_categories(classes).cat.codes.to_numpy()
    y = df[reg_target].to_numpy(np.float64)
    y_mean, y_std = y[idx["train"]].mean(), y[idx["train"]].std() + 1e-8
    arrays = {
        k: {
            "cat": codes[i].astype(np.int64),
            "num": num[i].astype(np.float32),
            "y_cls": y_cls[i].astype(np.int64),
            "y_reg": ((y[i] - y_mean) / y_std).astype(np.float32),
        }
        for k, i in idx.items()
    }
    return arrays, [len(cats[c]) + 1 for c in categorical], classes, (y_mean, y_std)


def _table(cfg):
    d = cfg.data
    return load_table(
        d.path,
        tuple(d.categorical),
        tuple(d.numeric),
        d.class_target,
        d.reg_target,
        d.val_fraction,
        d.test_fraction,
        d.split_seed,
    )


def build_datasets(cfg) -> Splits:
    arrays, levels, classes, (mean, std) = _table(cfg)
    t = {k: {c: torch.from_numpy(a) for c, a in cols.items()} for k, cols in arrays.items() if len(cols["y_cls"])}
    info = {"levels": levels, "numeric": arrays["train"]["num"].shape[1], "classes": classes,
            "reg_mean": float(mean), "reg_std": float(std)}  # fmt: skip
    return Splits(train=t["train"], val=t["val"], test=t.get("test"), info=info)


class TabularNet(nn.Module):
    def __init__(self, levels: list[int], n_num: int, classes: int, m: ModelConfig):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(n, min(m.max_embed, (n + 1) // 2 + 1)) for n in levels)
        width, layers = sum(e.embedding_dim for e in self.embeds) + n_num, []
        for _ in range(m.layers):
            layers += [nn.Linear(width, m.hidden), nn.GELU(), nn.Dropout(m.dropout)]
            width = m.hidden
        self.trunk = nn.Sequential(*layers)
        self.cls_head, self.reg_head = nn.Linear(width, classes), nn.Linear(width, 1)

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(torch.cat([e(cat[:, i]) for i, e in enumerate(self.embeds)] + [num], 1))
        return self.cls_head(h), self.reg_head(h).squeeze(-1)


def build_model(cfg, info: dict) -> nn.Module:
    return TabularNet(info["levels"], info["numeric"], len(info["classes"]), cfg.model)


def step(cfg, info: dict, model: nn.Module, batch: dict) -> StepOutput:
    logits, value = model(batch["cat"], batch["num"])
    loss = F.cross_entropy(logits.float(), batch["y_cls"], reduction="none")
    loss = loss + cfg.model.reg_weight * (value.float() - batch["y_reg"]) ** 2
    preds = torch.stack([logits.argmax(-1).float(), value.float()], 1)  # (class id, standardised value)
    return StepOutput(loss=loss, preds=preds, targets=torch.stack([batch["y_cls"].float(), batch["y_reg"]], 1))


def metrics(cfg, info: dict, preds: torch.Tensor, targets: torch.Tensor) -> dict:
    """Accuracy, macro-F1, per-class accuracy, confusion matrix; RMSE, MAE, R2 in the target's units."""
    mean, std = info["reg_mean"], info["reg_std"]
    out = classification_metrics(preds[:, 0].long(), targets[:, 0].long(), len(info["classes"]))
    p, y = preds[:, 1].double() * std + mean, targets[:, 1].double() * std + mean
    r2 = 1 - ((p - y) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp(min=1e-12)
    return out | {"rmse": float(((p - y) ** 2).mean().sqrt()), "mae": float((p - y).abs().mean()), "r2": float(r2)}
