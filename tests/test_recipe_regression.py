"""regression recipe: the HDF5 loader, metrics against scikit-learn, the default data, a 2-process run."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LinearRegression
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from distrain.errors import ConfigError
from distrain.recipe import load_recipe, resolve_config

from helpers import run_distrain


def write_h5(path, n=300, seed=0):
    """A linear two-output problem with noise, X stored as (n, 3, 2) to exercise flattening."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3, 2)).astype(np.float32)
    w = rng.normal(size=(6, 2))
    y = (x.reshape(n, -1) @ w + 0.5 * rng.normal(size=(n, 2))).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("inputs", data=x)
        f.create_dataset("targets", data=y)
        f["targets"].attrs["names"] = ["dose", "response"]
    return x.reshape(n, -1), y


def test_read_h5_flattens_and_names(tmp_path):
    r = load_recipe("regression").module
    x, y = write_h5(tmp_path / "d.h5")
    rx, ry, names = r.read_h5(tmp_path / "d.h5", "inputs", "targets")
    np.testing.assert_array_equal(rx, x)
    np.testing.assert_array_equal(ry, y)
    assert names == ["dose", "response"]
    with pytest.raises(ConfigError, match=r"data.x_key='X' is not a dataset .*inputs, targets"):
        r.read_h5(tmp_path / "d.h5", "X", "targets")
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(ConfigError, match="not a readable HDF5"):
        r.read_h5(tmp_path / "bad.h5", "X", "Y")


def test_default_data_is_diabetes_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTRAIN_DATA_DIR", str(tmp_path))
    r = load_recipe("regression").module
    path = r.default_h5()
    x, y, names = r.read_h5(path, "X", "Y")
    d = load_diabetes()
    np.testing.assert_allclose(x, d.data, rtol=1e-6)
    np.testing.assert_allclose(y[:, 0], d.target)
    assert names == ["progression"] and not list(tmp_path.glob("*.tmp"))


def test_metrics_match_sklearn(tmp_path):
    write_h5(tmp_path / "d.h5")
    cfg, recipe = resolve_config(
        ["recipe=regression", f"data.path={tmp_path / 'd.h5'}", "data.x_key=inputs", "data.y_key=targets"]
    )
    _, stats, _ = recipe.module._arrays(cfg)
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(40, 2)), rng.normal(size=(40, 2))
    m = recipe.bind(cfg, recipe.load_datasets(cfg).info).metrics(torch.from_numpy(p), torch.from_numpy(t))
    P, T = p * stats["y_std"] + stats["y_mean"], t * stats["y_std"] + stats["y_mean"]
    assert m["mse"] == pytest.approx(mean_squared_error(T, P), rel=1e-6)
    assert m["mae"] == pytest.approx(mean_absolute_error(T, P), rel=1e-6)
    assert m["r2"] == pytest.approx(r2_score(T, P), rel=1e-6)
    assert m["r2_response"] == pytest.approx(r2_score(T[:, 1], P[:, 1]), rel=1e-6)


@pytest.mark.multiproc
def test_regression_ddp_on_hdf5(tmp_path):
    x, y = write_h5(tmp_path / "d.h5")
    out = tmp_path / "run"
    run_distrain(
        [
            "recipe=regression",
            f"data.path={tmp_path / 'd.h5'}",
            "data.x_key=inputs",
            "data.y_key=targets",
            "train.max_epochs=30",
            "train.patience=0",
            "data.batch_size=16",
            "optim.lr=1e-2",
            "model.hidden=[32]",
            "model.dropout=0",
            "log.progress=false",
            f"output_dir={out}",
        ],
        launch_config="cpu_ddp",
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2
    # Independent reference: ordinary least squares on the same train/test rows.
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:45], order[90:]
    ols = LinearRegression().fit(x[train], y[train])
    assert s["test"]["r2"] > r2_score(y[test], ols.predict(x[test])) - 0.1
    assert (out / "pred_vs_truth_test.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
