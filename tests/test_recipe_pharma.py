"""pharma recipe: CSV/Parquet column spec and vectorised preprocessing, metrics vs scikit-learn, a 2-process run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score

from distrain.errors import ConfigError
from distrain.recipe import resolve_config

from helpers import run_distrain

SPEC = [
    "data.categorical=[genotype,site]",
    "data.numeric=[age,weight]",
    "data.class_target=responder",
    "data.reg_target=dose",
]


def table(n=120, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "genotype": rng.choice(["*1/*1", "*1/*2", "*2/*3"], n),
            "site": rng.choice(["north", "south"], n),
            "age": rng.uniform(20, 80, n),
            "weight": rng.normal(75, 10, n),
        }
    )
    df.loc[3, "weight"] = np.nan
    df["dose"] = 5 + 2 * (df["genotype"] == "*1/*1") + 0.05 * df["age"] + rng.normal(0, 0.3, n)
    df["responder"] = np.where(df["genotype"] == "*2/*3", "no", "yes")
    df.loc[7, "dose"] = np.nan  # rows without a target are dropped
    return df


def test_csv_and_parquet_preprocessing(tmp_path):
    df = table()
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_parquet(tmp_path / "t.parquet")
    cfg, recipe = resolve_config(["recipe=pharma", f"data.path={tmp_path / 't.csv'}", *SPEC])
    arrays, levels, classes, (mean, std) = recipe.module._table(cfg)
    cfg_p, recipe_p = resolve_config(["recipe=pharma", f"data.path={tmp_path / 't.parquet'}", *SPEC])
    arrays_p = recipe_p.module._table(cfg_p)[0]
    for split in arrays:
        for col in arrays[split]:
            np.testing.assert_allclose(arrays[split][col], arrays_p[split][col], rtol=1e-6)
    assert classes == ["no", "yes"] and levels == [4, 3]  # 3 genotypes + unseen, 2 sites + unseen
    # Reference: recompute the train split with plain pandas, row by row.
    kept = df.dropna(subset=["dose", "responder"]).reset_index(drop=True)
    order = np.random.default_rng(0).permutation(len(kept))
    n_test, n_val = round(0.15 * len(kept)), round(0.15 * len(kept))
    train = kept.iloc[order[n_test + n_val :]]
    vocab = sorted(train["genotype"].unique())
    np.testing.assert_array_equal(arrays["train"]["cat"][:, 0], [vocab.index(g) + 1 for g in train["genotype"]])
    w = train["weight"]
    expected = ((w - w.mean()) / w.std(ddof=0)).fillna(0).to_numpy()
    np.testing.assert_allclose(arrays["train"]["num"][:, 1], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arrays["train"]["y_reg"] * std + mean, train["dose"], rtol=1e-5)
    assert (arrays["train"]["y_cls"] == (train["responder"] == "yes").to_numpy()).all()
    with pytest.raises(ConfigError, match=r"data\.numeric: height not in the table"):
        c, r = resolve_config(["recipe=pharma", f"data.path={tmp_path / 't.csv'}", *SPEC, "data.numeric=[height]"])
        r.build_datasets(c)


def test_unseen_category_maps_to_zero(tmp_path):
    df = table()
    df.loc[:, "site"] = "north"
    df.loc[df.index[-1], "site"] = "mars"  # probably outside train; force it by checking the split
    df.to_csv(tmp_path / "t.csv", index=False)
    cfg, recipe = resolve_config(["recipe=pharma", f"data.path={tmp_path / 't.csv'}", *SPEC])
    arrays, levels, _, _ = recipe.module._table(cfg)
    codes = np.concatenate([a["cat"][:, 1] for a in arrays.values()])
    train_has_mars = levels[1] == 3
    assert set(codes.tolist()) == ({1, 2} if train_has_mars else {0, 1})


def test_metrics_match_sklearn(tmp_path):
    table().to_csv(tmp_path / "t.csv", index=False)
    cfg, recipe = resolve_config(["recipe=pharma", f"data.path={tmp_path / 't.csv'}", *SPEC])
    _, _, _, (mean, std) = recipe.module._table(cfg)
    rng = np.random.default_rng(3)
    pc, tc = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    pr, tr = rng.normal(size=50), rng.normal(size=50)
    m = recipe.bind(cfg, recipe.load_datasets(cfg).info).metrics(
        torch.tensor(np.stack([pc, pr], 1)), torch.tensor(np.stack([tc, tr], 1))
    )
    assert m["accuracy"] == pytest.approx(accuracy_score(tc, pc))
    assert m["macro_f1"] == pytest.approx(f1_score(tc, pc, average="macro"))
    assert m["mae"] == pytest.approx(mean_absolute_error(tr * std + mean, pr * std + mean), rel=1e-6)
    assert m["r2"] == pytest.approx(r2_score(tr * std + mean, pr * std + mean), rel=1e-6)


@pytest.mark.multiproc
def test_pharma_ddp_default_data(tmp_path):
    out = tmp_path / "run"
    run_distrain(
        [
            "recipe=pharma",
            "train.max_epochs=25",
            "train.patience=0",
            "model.hidden=32",
            "log.progress=false",
            f"output_dir={out}",
        ],
        launch_config="cpu_ddp",
    )
    s = json.loads((out / "summary.json").read_text())
    t = s["test"]
    assert s["world_size"] == 2
    # references on the same test rows: the majority class and the mean MPG of the training rows
    cfg, recipe = resolve_config(["recipe=pharma"])
    arrays, _, _, (_mean, _std) = recipe.module._table(cfg)
    majority = np.bincount(arrays["train"]["y_cls"]).argmax()
    assert t["accuracy"] > (arrays["test"]["y_cls"] == majority).mean() + 0.1
    assert t["r2"] > 0.6
