"""Multi-output MLP regression on X/Y datasets read from an HDF5 file (the torch/train.py pipeline).

`data.path=training_data.h5` reads the datasets named by `data.x_key` / `data.y_key`
(X: (N, features...) flattened per sample; Y: (N,) or (N, outputs)). Without a path the
default data is scikit-learn's diabetes set (442 patients, 10 baseline features, disease
progression one year later: one output), written once to `$DISTRAIN_DATA_DIR/diabetes.h5`
(default ~/.cache/distrain) in the same X/Y layout and read back through the HDF5 loader.
Split: a seeded permutation into train/val/test; X and Y are standardised with training
statistics and metrics are reported in the original units of Y.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from distrain import ConfigError, Splits, StepOutput, opt
from distrain import DataConfig as BaseDataConfig
from distrain.tools.plots import loss_curves, pred_vs_truth


@dataclass
class ModelConfig:
    hidden: list[int] = opt([128, 128], "widths of the hidden layers")
    activation: Literal["relu", "gelu", "silu", "tanh"] = opt("relu", "activation between layers")
    dropout: float = opt(0.1, "dropout after each hidden layer")


@dataclass
class DataConfig(BaseDataConfig):
    path: str | None = opt(None, "HDF5 file with X and Y; unset writes and uses the diabetes set", must_exist=True)
    x_key: str = opt("X", "HDF5 dataset holding the inputs")
    y_key: str = opt("Y", "HDF5 dataset holding the targets")
    val_fraction: float = opt(0.15, "fraction of samples for validation")
    test_fraction: float = opt(0.15, "fraction of samples for the test split")
    split_seed: int = opt(0, "seed of the train/val/test permutation")


def validate(cfg) -> None:
    d = cfg.data
    if not (0 < d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
        raise ConfigError(
            f"data.val_fraction={d.val_fraction} / data.test_fraction={d.test_fraction}: "
            "each in [0, 1), val > 0, and their sum < 1"
        )


def default_h5() -> Path:
    """The diabetes set as HDF5, written atomically on first use (ranks may race: last rename wins)."""
    path = Path(os.environ.get("DISTRAIN_DATA_DIR", Path.home() / ".cache" / "distrain")) / "diabetes.h5"
    if not path.exists():
        import h5py
        from sklearn.datasets import load_diabetes

        d = load_diabetes()  # unscaled columns are not in every sklearn; the scaled ones are real data too
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("X", data=d.data.astype(np.float32))
            f.create_dataset("Y", data=d.target.astype(np.float32)[:, None])
            f["X"].attrs["names"] = list(d.feature_names)
            f["Y"].attrs["names"] = ["progression"]
        os.replace(tmp, path)
    return path


def read_h5(path: str | Path, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """X as (N, F) float32, Y as (N, K) float32, and the output names (attr `names` or y0, y1, ...)."""
    import h5py

    f = open_h5(path)
    with f:
        arrays = []
        for key, name in ((x_key, "data.x_key"), (y_key, "data.y_key")):
            if key not in f or not isinstance(f[key], h5py.Dataset):
                found = [k for k in f if isinstance(f[k], h5py.Dataset)]
                raise ConfigError(
                    f"{name}={key!r} is not a dataset in {path}; datasets there: {', '.join(found) or 'none'}"
                )
            arrays.append(numeric_rows(f[key], f"{name}={key!r} in {path}"))
        x, y = arrays
        names = [str(n) for n in f[y_key].attrs.get("names", [])]
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    if len(x) != len(y):
        raise ConfigError(f"data.path={path}: {x_key} has {len(x)} rows but {y_key} has {len(y)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ConfigError(f"data.path={path}: X or Y holds NaN/inf values; clean them first")
    return x, y, names if len(names) == y.shape[1] else [f"y{i}" for i in range(y.shape[1])]


def open_h5(path: str | Path) -> Any:
    """An open h5py.File; anything else is one ConfigError line (h5py's own messages span lines)."""
    import h5py

    if Path(path).is_dir():
        raise ConfigError(f"data.path={path} is a folder, not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        reason = " ".join(str(e).split())  # one line, whatever HDF5 put in it
        raise ConfigError(f"data.path={path} is not a readable HDF5 file: {reason}") from None


def numeric_rows(dataset: Any, what: str) -> np.ndarray:
    """An HDF5 dataset as float32 with at least one row, or a ConfigError naming it."""
    if dataset.dtype.kind not in "biuf":  # strings, objects, compound records: no number to train on
        raise ConfigError(f"{what} holds {dataset.dtype} data, not numbers")
    if dataset.ndim == 0:
        raise ConfigError(f"{what} is a scalar, not rows of samples")
    if dataset.shape[0] == 0:
        raise ConfigError(f"{what} holds no rows")
    return np.asarray(dataset, dtype=np.float32)


def load_arrays(path: str | None, x_key: str, y_key: str, val: float, test: float, seed: int):
    x, y, names = read_h5(path or default_h5(), x_key, y_key)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test, n_val = round(test * len(x)), round(val * len(x))
    if n_val < 1 or len(x) - n_test - n_val < 1:
        raise ConfigError(
            f"data.path={path or 'diabetes.h5'} has {len(x)} rows: too few for a train and a validation split "
            f"with data.val_fraction={val} and data.test_fraction={test}"
        )
    idx = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    tr = idx["train"]
    stats = {
        "x_mean": x[tr].mean(0),
        "x_std": x[tr].std(0) + 1e-8,
        "y_mean": y[tr].mean(0),
        "y_std": y[tr].std(0) + 1e-8,
    }
    splits = {
        k: ((x[i] - stats["x_mean"]) / stats["x_std"], (y[i] - stats["y_mean"]) / stats["y_std"])
        for k, i in idx.items()
    }
    return splits, stats, names


def _arrays(cfg):
    d = cfg.data
    return load_arrays(d.path, d.x_key, d.y_key, d.val_fraction, d.test_fraction, d.split_seed)


def build_datasets(cfg) -> Splits:
    splits, stats, names = _arrays(cfg)
    t = {k: {"x": torch.from_numpy(x), "y": torch.from_numpy(y)} for k, (x, y) in splits.items() if len(x)}
    stats = {k: v.tolist() for k, v in stats.items()}  # metrics and report give Y in its own units
    info = {"features": splits["train"][0].shape[1], "names": names, **stats}
    return Splits(train=t["train"], val=t["val"], test=t.get("test"), info=info)


def build_model(cfg, info: dict) -> nn.Module:
    act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}[cfg.model.activation]
    layers, width = [], info["features"]
    for h in cfg.model.hidden:
        layers += [nn.Linear(width, h), act(), nn.Dropout(cfg.model.dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, len(info["names"])))


def step(cfg, info: dict, model: nn.Module, batch: dict) -> StepOutput:
    pred = model(batch["x"]).float()
    loss = ((pred - batch["y"]) ** 2).mean(-1)  # per sample, mean over standardised outputs
    return StepOutput(loss=loss, preds=pred, targets=batch["y"])


def metrics(cfg, info: dict, preds: torch.Tensor, targets: torch.Tensor) -> dict:
    """MSE, MAE, R2 per output in Y's units; the plain keys are means over outputs."""
    names = info["names"]
    std, mean = torch.tensor(info["y_std"], dtype=torch.float64), torch.tensor(info["y_mean"], dtype=torch.float64)
    p, y = preds.double() * std + mean, targets.double() * std + mean
    mse, mae = ((p - y) ** 2).mean(0), (p - y).abs().mean(0)
    r2 = 1 - ((p - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0).clamp(min=1e-12)
    out = {"mse": float(mse.mean()), "mae": float(mae.mean()), "r2": float(r2.mean())}
    for i, name in enumerate(names if len(names) > 1 else []):
        out |= {f"mse_{name}": float(mse[i]), f"mae_{name}": float(mae[i]), f"r2_{name}": float(r2[i])}
    return out


def report(cfg, info: dict, run_dir: Path, split: str, preds: torch.Tensor, targets: torch.Tensor) -> None:
    std, mean = np.asarray(info["y_std"]), np.asarray(info["y_mean"])
    p, y = preds.double().numpy() * std + mean, targets.double().numpy() * std + mean
    pred_vs_truth(run_dir / f"pred_vs_truth_{split}.png", p, y, info["names"])
    loss_curves(run_dir)
