"""Time-series tables for the traffic recipe: METR-LA / PEMS-BAY HDF5, CSV, and the packaged default.

Every loader returns (values (T, N) float32, column names); rows are time steps, columns sensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distrain import ConfigError


def load_sf_temps() -> tuple[np.ndarray, list[str]]:
    """vega_datasets' hourly San Francisco temperatures of 2010 (8,759 rows, degrees F)."""
    from vega_datasets import local_data

    df = local_data.sf_temps().sort_values("date")
    return df[["temp"]].to_numpy(np.float32), ["temp"]


def load_seattle_weather() -> tuple[np.ndarray, list[str]]:
    """vega_datasets' daily Seattle weather 2012-2015 (1,461 days): max/min temperature (C) and wind (m/s)."""
    from vega_datasets import local_data

    cols = ["temp_max", "temp_min", "wind"]
    return local_data.seattle_weather().sort_values("date")[cols].to_numpy(np.float32), cols


def load_h5(path: str | Path, key: str) -> tuple[np.ndarray, list[str]]:
    """METR-LA / PEMS-BAY `.h5`: a pandas HDFStore frame (fixed format) under `key`, read with h5py
    (group <key> with block0_values (T, N) and axis0 = sensor ids), or a plain (T, N) dataset."""
    import h5py

    if Path(path).is_dir():
        raise ConfigError(f"data.path={path} is a folder, not an HDF5 file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        reason = " ".join(str(e).split())  # h5py's messages can span lines
        raise ConfigError(f"data.path={path} is not a readable HDF5 file: {reason}") from None
    with f:
        if key not in f:
            raise ConfigError(f"data.h5_key={key!r} is not in {path}; top-level keys: {', '.join(f) or 'none'}")
        node = f[key]
        if isinstance(node, h5py.Dataset):
            values, names = _numeric_rows(node, f"data.h5_key={key!r} in {path}"), []
        elif "block0_values" in node and "block1_values" not in node:
            values = _numeric_rows(node["block0_values"], f"data.h5_key={key!r} in {path} (block0_values)")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in node["axis0"][:]]
        else:
            raise ConfigError(
                f"data.h5_key={key!r} in {path} is neither a (time, sensor) dataset nor a "
                "single-dtype pandas frame (block0_values); re-save it with df.to_hdf(format='fixed')"
            )
    values = values.reshape(len(values), -1)
    return values, names if len(names) == values.shape[1] else [f"s{i}" for i in range(values.shape[1])]


def _numeric_rows(dataset, what: str) -> np.ndarray:
    """An HDF5 dataset as float32 with at least one row, or a ConfigError naming it."""
    if dataset.dtype.kind not in "biuf":  # strings, objects, compound records: nothing to forecast
        raise ConfigError(f"{what} holds {dataset.dtype} data, not numbers")
    if dataset.ndim == 0 or dataset.shape[0] == 0:
        raise ConfigError(f"{what} holds no rows")
    return np.asarray(dataset, dtype=np.float32)


def load_csv(path: str | Path, columns: list[str], time_column: str | None) -> tuple[np.ndarray, list[str]]:
    """A CSV with one row per time step: the listed columns, or every numeric column but the time one."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.path={path} is not a readable CSV: {' '.join(str(e).split())}") from None
    if time_column:
        if time_column not in df:
            raise ConfigError(f"data.time_column={time_column!r} is not a column of {path}; columns: {', '.join(df)}")
        df = df.sort_values(time_column).drop(columns=time_column)
    missing = [c for c in columns if c not in df]
    if missing:
        raise ConfigError(f"data.columns: {', '.join(missing)} not in {path}; columns: {', '.join(df)}")
    if len(df) == 0:
        raise ConfigError(f"data.path={path} holds no rows")
    df = df[columns] if columns else df.select_dtypes("number")
    if df.shape[1] == 0:
        raise ConfigError(f"data.path={path} has no numeric columns to forecast")
    words = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if words:
        raise ConfigError(f"data.columns: {', '.join(words)} in {path} hold non-numeric values")
    return df.to_numpy(np.float32), [str(c) for c in df.columns]


def load_series(source: str, path: str | None, key: str, columns: list[str], time_column: str | None):
    if source == "sf_temps":
        values, names = load_sf_temps()
    elif source == "seattle_weather":
        values, names = load_seattle_weather()
    elif source == "hdf5":
        values, names = load_h5(path, key)  # type: ignore[arg-type]
    else:
        values, names = load_csv(path, columns, time_column)  # type: ignore[arg-type]
    if not np.isfinite(values).all():
        raise ConfigError(f"data.path={path}: the series holds NaN/inf; fill gaps first (METR-LA marks them as 0)")
    return values, names
