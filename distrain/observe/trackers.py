"""Experiment trackers through accelerate (TensorBoard, wandb, MLflow and the others accelerate
ships), started on rank 0 with the flattened config.

A distrain run is one tracker run however often it is resumed or requeued: the ids of the wandb
and MLflow runs are kept in the run dir (`trackers.json`) before the first metric is logged, and
a later segment in the same run dir continues them. The user's own settings win: `WANDB_MODE`,
`WANDB_PROJECT`, `wandb login`'s key in ~/.netrc, `MLFLOW_TRACKING_URI`,
`MLFLOW_EXPERIMENT_NAME`. No key is ever written or logged by distrain.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from distrain.errors import ConfigError

# accelerate's tracker names and the module each one needs (accelerate.tracking.LOGGER_TYPE_TO_CLASS).
TRACKER_MODULES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
}
INSTALL_HINT = {"mlflow": "mlflow-skinny sqlalchemy alembic", "tensorboard": "tensorboard"}
IDS_FILE = "trackers.json"  # in the run dir: the wandb and MLflow run ids a resumed segment continues
DEFAULT_PROJECT = "distrain"


def requested_trackers(log_cfg: Any) -> list[str]:
    """The trackers the config asks for (`log.trackers` plus the `log.tensorboard` / `log.wandb`
    switches), each checked: a known name whose package is installed, else ConfigError naming it."""
    names = list(dict.fromkeys([*log_cfg.trackers, *(["tensorboard"] if log_cfg.tensorboard else []),
                                *(["wandb"] if log_cfg.wandb else [])]))  # fmt: skip
    for name in names:
        if name not in TRACKER_MODULES:
            allowed = ", ".join(TRACKER_MODULES)
            raise ConfigError(f"log.trackers: unknown tracker {name!r}; allowed: {allowed}")
        if not any(importlib.util.find_spec(m) is not None for m in TRACKER_MODULES[name]):
            hint = INSTALL_HINT.get(name, TRACKER_MODULES[name][0])
            raise ConfigError(f"log.trackers={name} needs the {TRACKER_MODULES[name][0]} package (pip install {hint})")
    return names


def wandb_key_available() -> bool:
    """Whether wandb will find an API key: WANDB_API_KEY, or `wandb login`'s entry in the netrc
    file ($NETRC, else ~/.netrc) for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode(configured: str) -> str | None:
    """The mode to pass to wandb.init, or None to leave it to wandb (WANDB_MODE set by the user)."""
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if wandb_key_available() else "offline"


def project_name(log_cfg: Any) -> str:
    """The wandb project (and MLflow experiment unless MLFLOW_EXPERIMENT_NAME is set)."""
    return log_cfg.wandb_project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def new_run_id() -> str:
    """A wandb run id: 8 characters of [a-z0-9], as wandb makes its own."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_ids(run_dir: Path) -> dict[str, dict[str, str]]:
    """The tracker run ids an earlier segment of this run kept ({} for a new run)."""
    try:
        data = json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_ids(run_dir: Path, ids: dict[str, dict[str, str]]) -> None:
    """Atomically: a segment killed mid-write leaves the previous ids, not half a file."""
    tmp = run_dir / (IDS_FILE + ".tmp")
    tmp.write_text(json.dumps(ids, indent=2) + "\n")
    os.replace(tmp, run_dir / IDS_FILE)


def init_trackers(accelerator: Any, cfg: Any, run_dir: Path, names: list[str]) -> None:
    """Start `names` (requested_trackers of cfg.log) on rank 0; a resumed or requeued segment
    continues the same wandb and MLflow runs (their ids in run_dir/trackers.json)."""
    if not names or not accelerator.is_main_process:
        return
    from accelerate.tracking import filter_trackers

    # The run dir is only known after the Accelerator exists (rank 0 picks it), so trackers are
    # attached here rather than through Accelerator(log_with=...).
    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.log_with = filter_trackers(names, accelerator.logging_dir)
    ids = read_ids(run_dir)
    resumed = {name for name in names if name in ids}
    init_kwargs: dict[str, Any] = {}
    if "wandb" in names:
        if "wandb" not in ids:
            ids["wandb"] = {"id": new_run_id()}
        # Kept before wandb starts: a segment killed at any point after this continues the same run.
        write_ids(run_dir, ids)
        kwargs = {"dir": str(run_dir), "name": run_dir.name, "id": ids["wandb"]["id"], "resume": "allow"}
        mode = wandb_mode(cfg.log.wandb_mode)
        if mode is not None:
            kwargs["mode"] = mode
        init_kwargs["wandb"] = kwargs
    if "mlflow" in names:
        init_kwargs["mlflow"] = _mlflow_setup(cfg.log, run_dir, ids.get("mlflow", {}).get("run_id"))
    accelerator.init_trackers(project_name(cfg.log), config=None, init_kwargs=init_kwargs)
    if "mlflow" in names and "mlflow" not in ids:
        ids["mlflow"] = {"run_id": accelerator.get_tracker("mlflow", unwrap=True).info.run_id}
        write_ids(run_dir, ids)
    from distrain.config import to_plain

    flat = _flatten(to_plain(cfg))
    for tracker in accelerator.trackers:
        # MLflow refuses to change a logged parameter: a resumed run keeps its first segment's.
        if not (tracker.name == "mlflow" and "mlflow" in resumed):
            tracker.store_init_configuration(flat)


def _mlflow_setup(log_cfg: Any, run_dir: Path, run_id: str | None) -> dict[str, Any]:
    """MLflowTracker's arguments; without a tracking URI, a SQLite store inside the run dir (the
    store MLflow recommends since its file store went into maintenance mode), so no server is needed."""
    import mlflow

    kwargs: dict[str, Any] = {"run_id": run_id, "run_name": run_dir.name}
    uri = log_cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        store = run_dir / "mlflow"
        store.mkdir(exist_ok=True)
        uri = f"sqlite:///{store / 'mlflow.db'}"
        kwargs["logging_dir"] = str(store / "artifacts")  # a new experiment's artifacts, beside its store
    mlflow.set_tracking_uri(uri)
    return kwargs


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
