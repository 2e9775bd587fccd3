"""Sequence-to-sequence forecasting (traffic-style): `len_source` past steps -> `len_target` future steps.

Default data: vega_datasets' daily Seattle weather 2012-2015 (1,461 days; max/min temperature and
wind: three series), split in time order (train, then val, then test) and standardised per series
with training statistics; `data.source=sf_temps` takes the hourly San Francisco temperatures
(set data.season=24). `data.source=hdf5 data.path=metr-la.h5` reads METR-LA / PEMS-BAY files
(time x sensors), `data.source=csv` any CSV with a row per time step. Model: a GRU
encoder-decoder predicting each step as a change over the previous one (teacher forcing with
probability `model.teacher_forcing` in training), or a transformer encoder with learned queries
for the future steps. With `model.seasonal_input` (default) the model also gets each future
step's value one season back, the input of the seasonal-naive baseline. Metrics per horizon
step in the data's units, for the model and two baselines on the same windows: naive (last
observed value) and seasonal-naive (the value one season back).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from distrain import ConfigError, Splits, StepOutput, opt
from distrain import DataConfig as BaseDataConfig
from distrain.recipes._traffic_data import load_series

FORECASTERS = ("", "naive_", "snaive_")  # metric prefixes: model, last value, seasonal naive


@dataclass
class ModelConfig:
    arch: Literal["gru", "transformer"] = opt("gru", "encoder-decoder GRU or transformer encoder with queries")
    hidden: int = opt(32, "GRU hidden size / transformer width")
    layers: int = opt(1, "GRU or transformer layers")
    heads: int = opt(4, "attention heads (transformer)")
    dropout: float = opt(0.0, "dropout between layers")
    teacher_forcing: float = opt(0.0, "GRU training: probability of feeding the true previous step to the decoder")
    seasonal_input: bool = opt(True, "give the decoder each future step's value one season back (a known covariate)")


@dataclass
class DataConfig(BaseDataConfig):
    source: Literal["seattle_weather", "sf_temps", "hdf5", "csv"] = opt(
        "seattle_weather", "packaged: seattle_weather (daily) or sf_temps (hourly); hdf5: METR-LA style; csv"
    )
    path: str | None = opt(None, "HDF5 or CSV file (source=hdf5|csv)", must_exist=True)
    h5_key: str = opt("df", "HDF5 key of the (time x sensor) table; METR-LA/PEMS-BAY use df and speed")
    columns: list[str] = opt([], "CSV columns to forecast; empty means every numeric column")
    time_column: str | None = opt(None, "CSV column to sort by and drop (e.g. a timestamp)")
    len_source: int = opt(10, "past steps the model sees")
    len_target: int = opt(5, "future steps it predicts")
    season: int = opt(365, "steps per season of the seasonal-naive baseline (365 daily, 24 hourly, 288 5-min)")
    val_fraction: float = opt(0.1, "fraction of the series (in time order) for validation")
    test_fraction: float = opt(0.2, "last fraction of the series for the test split")


def validate(cfg) -> None:
    d = cfg.data
    if d.source in ("hdf5", "csv") and not d.path:
        raise ConfigError(f"data.source={d.source} needs data.path=<file>")
    if d.len_source < 1 or d.len_target < 1 or d.season < 1:
        raise ConfigError("data.len_source, data.len_target and data.season must be integers >= 1")
    if not (d.val_fraction > 0 and d.test_fraction > 0 and d.val_fraction + d.test_fraction < 1):
        raise ConfigError(
            f"data.val_fraction={d.val_fraction}, data.test_fraction={d.test_fraction}: both > 0, sum < 1"
        )


def load_windows(source, path, key, columns, time_column, s, h, season, val, test):
    """Per split: x (W, s, N), y (W, h, N) and both baselines (W, h, N), standardised; plus mean, std, names."""
    values, names = load_series(source, path, key, list(columns), time_column)
    n = len(values)
    bounds = [0, int(n * (1 - val - test)), int(n * (1 - test)), n]
    mean, std = values[: bounds[1]].mean(0), values[: bounds[1]].std(0) + 1e-6
    z = (values - mean) / std
    hor = np.arange(h)
    seasonal_back = (hor // season + 1) * season  # the latest same-phase step that is already observed
    out = {}
    for split, (a, b) in zip(("train", "val", "test"), itertools.pairwise(bounds)):
        t = np.arange(a, b - s - h + 1)  # window starts inside the split, targets too
        if len(t) < 1:
            raise ConfigError(f"the {split} split has {b - a} steps, fewer than len_source + len_target = {s + h}")
        tgt = t[:, None] + s + hor
        out[split] = {
            "x": z[t[:, None] + np.arange(s)],
            "y": z[tgt],
            "naive": np.repeat(z[t + s - 1][:, None], h, axis=1),
            "snaive": z[np.maximum(tgt - seasonal_back, 0)],  # clamped only for the first train windows
        }
    return out, mean, std, names


def _windows(cfg):
    d = cfg.data
    return load_windows(
        d.source,
        d.path,
        d.h5_key,
        tuple(d.columns),
        d.time_column,
        d.len_source,
        d.len_target,
        d.season,
        d.val_fraction,
        d.test_fraction,
    )


def build_datasets(cfg) -> Splits:
    w, mean, std, names = _windows(cfg)
    t = {k: {c: torch.from_numpy(a.astype(np.float32)) for c, a in cols.items()} for k, cols in w.items()}
    info = {"mean": mean.tolist(), "std": std.tolist(), "names": names}  # metrics speak the data's units
    return Splits(train=t["train"], val=t["val"], test=t["test"], info=info)


class GRUSeq2Seq(nn.Module):
    def __init__(self, n: int, horizon: int, m: ModelConfig):
        super().__init__()
        self.horizon, self.teacher_forcing, self.seasonal = horizon, m.teacher_forcing, m.seasonal_input
        drop = m.dropout if m.layers > 1 else 0.0
        self.encoder = nn.GRU(n, m.hidden, m.layers, batch_first=True, dropout=drop)
        self.decoder = nn.GRU(n * (2 if m.seasonal_input else 1), m.hidden, m.layers, batch_first=True, dropout=drop)
        self.out = nn.Linear(m.hidden, n)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, seasonal: torch.Tensor | None = None
    ) -> torch.Tensor:
        _, state = self.encoder(x)
        prev, outs = x[:, -1:], []
        for t in range(self.horizon):
            inp = torch.cat([prev, seasonal[:, t : t + 1]], -1) if self.seasonal else prev
            o, state = self.decoder(inp, state)
            pred = prev + self.out(o)  # a change over the previous step: starts out as the naive forecast
            outs.append(pred)
            if self.training and y is not None and self.teacher_forcing > 0:
                use_truth = torch.rand(len(x), 1, 1, device=x.device) < self.teacher_forcing
                prev = torch.where(use_truth, y[:, t : t + 1], pred)
            else:
                prev = pred
        return torch.cat(outs, 1)


class TransformerForecaster(nn.Module):
    """Source steps and one learned query per future step in one encoder; the queries read out the forecast."""

    def __init__(self, n: int, s: int, horizon: int, m: ModelConfig):
        super().__init__()
        self.inp, self.out = nn.Linear(n, m.hidden), nn.Linear(m.hidden, n)
        self.seasonal = nn.Linear(n, m.hidden) if m.seasonal_input else None
        self.pos = nn.Parameter(torch.randn(1, s + horizon, m.hidden) * 0.02)
        self.query = nn.Parameter(torch.zeros(1, horizon, m.hidden))
        layer = nn.TransformerEncoderLayer(
            m.hidden, m.heads, 2 * m.hidden, m.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, m.layers, enable_nested_tensor=False)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, seasonal: torch.Tensor | None = None
    ) -> torch.Tensor:
        queries = self.query.expand(len(x), -1, -1)
        if self.seasonal is not None:
            queries = queries + self.seasonal(seasonal - x[:, -1:])
        tokens = torch.cat([self.inp(x), queries], 1) + self.pos
        h = self.encoder(tokens)[:, x.shape[1] :]
        return x[:, -1:] + self.out(h)


def build_model(cfg, info: dict) -> nn.Module:
    d, m, n = cfg.data, cfg.model, len(info["names"])
    if m.arch == "transformer":
        return TransformerForecaster(n, d.len_source, d.len_target, m)
    return GRUSeq2Seq(n, d.len_target, m)


def step(cfg, info: dict, model: nn.Module, batch: dict) -> StepOutput:
    pred = model(batch["x"], batch["y"], batch["snaive"]).float()
    loss = (pred - batch["y"]).abs().mean((1, 2))  # MAE, the headline metric of traffic forecasting
    # preds carry all three forecasters so that metrics compares them on exactly the same windows
    return StepOutput(loss=loss, preds=torch.stack([pred, batch["naive"], batch["snaive"]], 1), targets=batch["y"])


def metrics(cfg, info: dict, preds: torch.Tensor, targets: torch.Tensor) -> dict:
    """MAE, RMSE, MAPE (%, steps with |truth| < 1e-6 left out) per horizon step and averaged, per forecaster."""
    mean, std = torch.tensor(info["mean"], dtype=torch.float64), torch.tensor(info["std"], dtype=torch.float64)
    y = targets.double() * std + mean
    valid = y.abs() > 1e-6
    out = {}
    for i, prefix in enumerate(FORECASTERS):
        err = preds[:, i].double() * std + mean - y
        mae_h, rmse_h = err.abs().mean((0, 2)), (err**2).mean((0, 2)).sqrt()
        ape = torch.where(valid, err.abs() / y.abs().clamp(min=1e-6), torch.zeros_like(err))
        mape_h = 100 * ape.sum((0, 2)) / valid.sum((0, 2)).clamp(min=1)
        out |= {
            f"{prefix}mae": float(mae_h.mean()),
            f"{prefix}rmse": float((err**2).mean().sqrt()),
            f"{prefix}mape": float(mape_h.mean()),
        }
        out |= {
            f"{prefix}{k}_h": [round(float(v), 5) for v in t]
            for k, t in (("mae", mae_h), ("rmse", rmse_h), ("mape", mape_h))
        }
    return out


def report(cfg, info: dict, run_dir: Path, split: str, preds: torch.Tensor, targets: torch.Tensor) -> None:
    """Print model vs baselines; plot a stretch of predictions vs truth and the error per horizon."""
    from distrain.tools.plots import pyplot

    m = metrics(cfg, info, preds, targets)
    print(
        f"{split} forecasts ({len(targets)} windows): "
        + "; ".join(
            f"{label} MAE {m[p + 'mae']:.3f} RMSE {m[p + 'rmse']:.3f} MAPE {m[p + 'mape']:.2f}%"
            for label, p in zip(("model", "naive last value", "seasonal naive"), FORECASTERS)
        ),
        flush=True,
    )
    mean, std, names = np.asarray(info["mean"]), np.asarray(info["std"]), info["names"]
    h = cfg.data.len_target
    p, y = preds[:, 0, :, 0].numpy() * std[0] + mean[0], targets[:, :, 0].numpy() * std[0] + mean[0]
    span = min(240, len(y))
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    a.plot(range(span), y[:span, 0], "k", lw=1.2, label="truth")
    a.plot(range(span), p[:span, 0], label="1 step ahead")
    a.plot(range(h - 1, span), p[: span - h + 1, h - 1], label=f"{h} steps ahead", alpha=0.8)
    a.set_xlabel("time step")
    a.set_ylabel(names[0])
    a.legend()
    for label, prefix in zip(("model", "naive", "seasonal naive"), FORECASTERS):
        b.plot(range(1, h + 1), m[prefix + "mae_h"], marker="o", label=label)
    b.set_xlabel("horizon step")
    b.set_ylabel("MAE")
    b.legend()
    fig.tight_layout()
    fig.savefig(run_dir / f"forecast_{split}.png", dpi=100)
    plt.close(fig)
