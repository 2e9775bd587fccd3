"""traffic recipe: METR-LA-style HDF5 and CSV loaders, baseline windows, a 2-process run beating both baselines."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from distrain.errors import ConfigError
from distrain.recipe import load_recipe, resolve_config

from helpers import run_distrain


def write_metr_la(path, values, sensors):
    """The layout pandas' HDFStore (fixed format) writes for METR-LA's `df`: axis0 = sensor ids, axis1 = timestamps."""
    with h5py.File(path, "w") as f:
        g = f.create_group("df")
        g.create_dataset("axis0", data=np.array(sensors, dtype="S"))
        g.create_dataset("axis1", data=np.arange(len(values), dtype=np.int64) * 300_000_000_000)
        g.create_dataset("block0_items", data=np.array(sensors, dtype="S"))
        g.create_dataset("block0_values", data=values)


def test_hdf5_and_csv_loaders(tmp_path):
    data = load_recipe("traffic").module
    from recipes._traffic_data import load_csv, load_h5

    values = np.random.default_rng(0).uniform(20, 70, size=(50, 3)).astype(np.float32)
    write_metr_la(tmp_path / "metr-la.h5", values, ["773869", "767541", "767542"])
    v, names = load_h5(tmp_path / "metr-la.h5", "df")
    np.testing.assert_array_equal(v, values)
    assert names == ["773869", "767541", "767542"]
    with pytest.raises(ConfigError, match=r"data\.h5_key='speed' is not in"):
        load_h5(tmp_path / "metr-la.h5", "speed")

    shuffled = np.random.default_rng(1).permutation(50)
    lines = ["time,a,b,label"] + [f"{t},{values[t, 0]},{values[t, 1]},x" for t in shuffled]
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    v, names = load_csv(tmp_path / "s.csv", [], "time")  # sorted by time, non-numeric column dropped
    np.testing.assert_allclose(v, values[:, :2], rtol=1e-6)
    assert names == ["a", "b"]
    with pytest.raises(ConfigError, match=r"data\.columns: c not in"):
        load_csv(tmp_path / "s.csv", ["a", "c"], "time")
    assert data.FORECASTERS == ("", "naive_", "snaive_")


def test_windows_and_baselines(tmp_path):
    """x, y, naive and seasonal-naive windows against direct indexing of the raw series."""
    T, s, h, season = 200, 4, 3, 7
    raw = np.random.default_rng(2).normal(10, 2, size=(T, 2)).astype(np.float32)
    write_metr_la(tmp_path / "d.h5", raw, ["a", "b"])
    cfg, recipe = resolve_config(
        [
            "recipe=traffic",
            "data.source=hdf5",
            f"data.path={tmp_path / 'd.h5'}",
            f"data.len_source={s}",
            f"data.len_target={h}",
            f"data.season={season}",
        ]
    )
    w, mean, std, _ = recipe.module._windows(cfg)
    start = int(T * 0.7)  # the first val window starts where the train part ends
    val = {k: v * std + mean for k, v in w["val"].items()}
    np.testing.assert_allclose(val["x"][0], raw[start : start + s], rtol=1e-5)
    np.testing.assert_allclose(val["y"][5], raw[start + 5 + s : start + 5 + s + h], rtol=1e-5)
    np.testing.assert_allclose(val["naive"][5], np.repeat(raw[start + 5 + s - 1][None], h, 0), rtol=1e-5)
    np.testing.assert_allclose(val["snaive"][5], raw[start + 5 + s - season : start + 5 + s - season + h], rtol=1e-5)
    assert len(w["test"]["x"]) == T - int(T * 0.8) - s - h + 1
    # metrics of a perfect forecaster are zero; the naive ones are the direct errors
    y = torch.from_numpy(w["test"]["y"])
    preds = torch.stack([y, torch.from_numpy(w["test"]["naive"]), torch.from_numpy(w["test"]["snaive"])], 1)
    m = recipe.bind(cfg, recipe.load_datasets(cfg).info).metrics(preds, y)
    raw_y, raw_naive = w["test"]["y"] * std + mean, w["test"]["naive"] * std + mean
    assert m["mae"] == pytest.approx(0, abs=1e-6) and len(m["mae_h"]) == h
    assert m["naive_mae"] == pytest.approx(float(np.abs(raw_naive - raw_y).mean()), rel=1e-5)
    assert m["naive_mape_h"][0] == pytest.approx(
        float((np.abs(raw_naive - raw_y) / np.abs(raw_y))[:, 0].mean() * 100), rel=1e-4
    )


@pytest.mark.multiproc
def test_traffic_ddp_beats_both_baselines(tmp_path):
    out = tmp_path / "run"
    proc = run_distrain(
        ["recipe=traffic", "train.max_epochs=8", "train.patience=0", "log.progress=false", f"output_dir={out}"],
        launch_config="cpu_ddp",
    )
    s = json.loads((out / "summary.json").read_text())
    t = s["test"]
    assert s["world_size"] == 2 and len(t["mae_h"]) == 5
    assert t["mae"] < t["naive_mae"] and t["mae"] < t["snaive_mae"], t
    assert t["rmse"] < t["naive_rmse"] and t["rmse"] < t["snaive_rmse"], t
    assert "naive last value MAE" in proc.stdout and "seasonal naive MAE" in proc.stdout
    assert (out / "forecast_test.png").stat().st_size > 0


@pytest.mark.parametrize("arch", ["gru", "transformer"])
def test_models_forecast_every_step_and_teacher_forcing_feeds_truth(arch):
    args = ["recipe=traffic", f"model.arch={arch}", "model.teacher_forcing=1.0", "model.hidden=16"]
    cfg, recipe = resolve_config(args)
    splits = recipe.load_datasets(cfg)
    recipe = recipe.bind(cfg, splits.info)
    model = recipe.build_model()
    batch = {k: v[:4] for k, v in splits.train.items()}
    out = recipe.step(model, batch)
    assert out.preds.shape == (4, 3, 5, 3) and out.loss.shape == (4,)
    torch.testing.assert_close(out.preds[:, 1], batch["naive"])  # the baselines pass through untouched
    y2 = batch["y"].clone()
    y2[:, 0] += 1.0
    changed = model(batch["x"], y2, batch["snaive"]) - model(batch["x"], batch["y"], batch["snaive"])
    assert torch.equal(changed[:, 0], torch.zeros_like(changed[:, 0]))  # step 0 never sees the truth
    # with teacher forcing the GRU's step 1 is fed the true step 0; the transformer never sees targets
    assert (changed[:, 1].abs().max() > 0) == (arch == "gru")
