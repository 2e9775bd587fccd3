"""`distrain sweep`: an Optuna hyperparameter search where every trial is a normal distrain run.

    distrain sweep recipe=pharma trials=20 'optim.lr=loguniform(1e-4,1e-2)' 'model.hidden=choice(64,128,256)'

Arguments whose value is `loguniform(a,b)`, `uniform(a,b)`, `int(a,b)`, `logint(a,b)` or
`choice(v1,v2,...)` form the search space; the other `key=value` arguments are fixed overrides.
`trials=N` (default 20), `sweep_dir=` (default runs/sweeps/<recipe>/<timestamp>), `seed=`,
`prune_warmup=K` (default 1: the first K evaluations of a trial never prune it).

TPE sampler; a median pruner fed with `train.metric` after every validation. The study lives
in `<sweep_dir>/study.db` (SQLite) beside `sweep.yaml` (the spec): running the same command
with the same sweep_dir resumes, re-running trials a crash left unfinished, until `trials`
trials have completed or been pruned. Trial n writes the run dir `<sweep_dir>/trial_<n>`.
The best trial's config is printed and saved as `<sweep_dir>/best_config.yaml`, runnable with
`distrain run config=<sweep_dir>/best_config.yaml`.

Trials run one after another in this process (each builds its own Trainer): a trial of a small
recipe takes seconds, and a fresh interpreter plus accelerate import per trial would dominate.
For parallel trials, `--slurm-array N` submits N Slurm array tasks that each run
`distrain sweep --worker sweep_dir=...` and pull trials from the same study.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from distrain.cli import command
from distrain.config import parse_value
from distrain.errors import ConfigError, Interrupted

DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice")
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\((.*)\)\s*$")
# A value meant as a search space but malformed (unclosed, brackets, spaces): reported as such,
# not taken as a fixed override that then leaves the space empty.
_ATTEMPT = re.compile(r"^\s*(?:[A-Za-z_]\w*\s*\(|(?:" + "|".join(DISTRIBUTIONS) + r")\b)")
MAX_SEED = 2**31 - 1  # optuna's TPE sampler seeds numpy with seed + trials so far + 7919 x array task
SWEEP_KEYS = ("trials", "sweep_dir", "seed", "prune_warmup")


@dataclass
class Param:
    key: str
    kind: str
    args: list[Any]

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.args)
        low, high = self.args
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.key, low, high, log=self.kind == "logint")
        return trial.suggest_float(self.key, low, high, log=self.kind == "loguniform")

    def examples(self) -> list[Any]:
        """Values that must all be valid for the key (checked before any trial runs)."""
        return list(self.args)


def parse_param(key: str, text: str) -> Param:
    """`loguniform(1e-4,1e-2)` and friends -> Param; anything malformed is a one-line ConfigError."""
    m = _CALL.match(text)
    if not m or m.group(1) not in DISTRIBUTIONS:
        raise ConfigError(
            f"{key}={text!r} is not a search space; use one of "
            "loguniform(a,b), uniform(a,b), int(a,b), logint(a,b), choice(v1,v2,...)"
        )
    kind, body = m.group(1), m.group(2)
    args = [parse_value(a.strip()) for a in body.split(",")] if body.strip() else []
    if any(a == "" for a in args):
        raise ConfigError(f"{key}={text!r} has an empty argument")
    if kind == "choice":
        if not args:
            raise ConfigError(f"{key}={text!r}: choice needs at least one value")
        if len({repr(a) for a in args}) != len(args):
            raise ConfigError(f"{key}={text!r}: choice values must differ")
        return Param(key, kind, args)
    if len(args) != 2:
        raise ConfigError(f"{key}={text!r}: {kind} takes two numbers (low, high), got {len(args)}")
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if not numeric:
        raise ConfigError(f"{key}={text!r}: {kind} bounds must be finite numbers")
    low, high = args
    if kind in ("int", "logint") and not all(float(a).is_integer() for a in args):
        raise ConfigError(f"{key}={text!r}: {kind} bounds must be integers")
    if not low < high:
        raise ConfigError(f"{key}={text!r}: low must be below high")
    if kind in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"{key}={text!r}: {kind} needs low > 0")
    if kind in ("int", "logint"):
        return Param(key, kind, [int(low), int(high)])
    return Param(key, kind, [float(low), float(high)])


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str], list[Param]]:
    """-> sweep settings, fixed `key=value` overrides, search space."""
    settings: dict[str, Any] = {"trials": 20, "sweep_dir": None, "seed": 0, "prune_warmup": 1}
    fixed, space = [], []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not key=value (e.g. 'optim.lr=loguniform(1e-4,1e-2)')")
        key, _, text = arg.partition("=")
        key = key.strip()
        if key in SWEEP_KEYS:
            settings[key] = parse_value(text) if key != "sweep_dir" else text
        elif key == "output_dir":
            raise ConfigError("output_dir is set per trial (<sweep_dir>/trial_<n>); give sweep_dir= instead")
        elif _ATTEMPT.match(text):
            space.append(parse_param(key, text))
        else:
            fixed.append(arg)
    if not isinstance(settings["trials"], int) or isinstance(settings["trials"], bool) or settings["trials"] < 1:
        raise ConfigError(f"trials={settings['trials']!r} is out of range; allowed: an integer >= 1")
    if not isinstance(settings["seed"], int) or isinstance(settings["seed"], bool):
        raise ConfigError(f"seed={settings['seed']!r} must be an integer")
    if not 0 <= settings["seed"] <= MAX_SEED:
        raise ConfigError(f"seed={settings['seed']!r} is out of range; allowed: an integer in [0, {MAX_SEED}]")
    warmup = settings["prune_warmup"]
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ConfigError(f"prune_warmup={warmup!r} is out of range; allowed: an integer >= 0")
    if len({p.key for p in space}) != len(space):
        raise ConfigError("a key appears twice in the search space")
    return settings, fixed, space


def check_space(fixed: list[str], space: list[Param]) -> Any:
    """Resolve the config with each example value of each key, so an unknown key or a value of the
    wrong type fails now, in one line, before anything is written. Returns the base config."""
    from distrain.recipe import resolve_config

    cfg, _ = resolve_config(fixed)
    for p in space:
        for value in p.examples():
            resolve_config([*fixed, _arg(p.key, value)])
    return cfg


def _arg(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def run_trial(trial: Any, fixed: list[str], space: list[Param], sweep_dir: Path, prune_warmup: int = 1) -> float:
    """One trial: a normal run in <sweep_dir>/trial_<n>, reporting validation metrics to the pruner."""
    import optuna
    from accelerate.state import AcceleratorState, GradientState

    from distrain.recipe import resolve_config
    from distrain.train.trainer import Trainer

    params = {p.key: p.suggest(trial) for p in space}
    run_dir = sweep_dir / f"trial_{trial.number:04d}"
    cfg, recipe = resolve_config([*fixed, *(_arg(k, v) for k, v in params.items()), f"output_dir={run_dir}"])
    metric = cfg.train.metric
    evals = [0]

    def report(step: int, metrics: dict[str, Any]) -> None:
        value = float(metrics[metric])
        trial.report(value, step)
        evals[0] += 1
        if evals[0] > prune_warmup and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} with {metric}={value:.6g}")

    record = {"number": trial.number, "params": params, "run_dir": str(run_dir)}
    try:
        trainer = Trainer(cfg, recipe)
        trainer.on_eval.append(report)
        summary = trainer.train()
    except optuna.TrialPruned:
        _write(run_dir / "trial.json", record | {"state": "pruned"})
        raise
    finally:  # accelerate's process-wide singletons would carry this trial's setup into the next
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if summary.get("exit_code"):
        raise Interrupted(int(summary["exit_code"]))
    value = summary["best_metric"][metric]
    if value is None or not math.isfinite(value):
        raise RuntimeError(f"trial {trial.number} produced no finite {metric}")
    _write(run_dir / "trial.json", record | {"state": "complete", "value": value})
    return float(value)


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def open_study(sweep_dir: Path, direction: str, seed: int, worker: bool) -> Any:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    study = optuna.create_study(storage=storage, study_name="sweep", direction=direction, load_if_exists=True)
    n_before = len(study.trials)
    # Reseed per start and per array task, so neither a resumed sweep nor two workers starting
    # together replay the same random proposals.
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    sampler = optuna.samplers.TPESampler(seed=seed + n_before + 7919 * task, n_startup_trials=5)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    study = optuna.load_study(storage=storage, study_name="sweep", sampler=sampler, pruner=pruner)
    if not worker:  # alone on this study: a RUNNING trial was left by a crash; run its params again
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
            print(f"trial {t.number} was left unfinished; its parameters are queued again", flush=True)
    return study


def finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def optimize(sweep_dir: Path, spec: dict[str, Any], worker: bool = False) -> int:
    import optuna
    from optuna.trial import TrialState

    fixed, space = spec["fixed"], [Param(**p) for p in spec["space"]]
    study = open_study(sweep_dir, spec["direction"], spec["seed"], worker)
    while finished(study) < spec["trials"]:
        trial = study.ask()
        try:
            value = run_trial(trial, fixed, space, sweep_dir, spec.get("prune_warmup", 1))
        except optuna.TrialPruned as e:
            study.tell(trial, state=TrialState.PRUNED)
            print(f"trial {trial.number}: {e}", flush=True)
            continue
        except Interrupted as e:
            study.tell(trial, state=TrialState.FAIL)
            print(f"sweep interrupted during trial {trial.number}; run the same command again to resume", flush=True)
            return e.exit_code
        except Exception as e:  # a diverging trial fails alone; the study goes on
            study.tell(trial, state=TrialState.FAIL)
            print(
                f"trial {trial.number} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                flush=True,
            )
            if isinstance(e, ConfigError) or len(study.get_trials(states=(TrialState.FAIL,))) > spec["trials"]:
                raise
            continue
        study.tell(trial, value)
        print(f"trial {trial.number}: {spec['metric']}={value:.6g} {trial.params}", flush=True)
    return 0 if worker else write_best(study, sweep_dir, spec)


def write_best(study: Any, sweep_dir: Path, spec: dict[str, Any]) -> int:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        print("error: no trial completed (all pruned or failed)", file=sys.stderr)
        return 1
    best = study.best_trial
    config = yaml.safe_load((sweep_dir / f"trial_{best.number:04d}" / "config.yaml").read_text())
    config["output_dir"] = None  # a rerun gets a fresh run dir instead of overwriting the trial's
    text = yaml.safe_dump(config, sort_keys=False)
    (sweep_dir / "best_config.yaml").write_text(text)
    print(f"best trial {best.number}: {spec['metric']}={best.value:.6g} {best.params}")
    print(f"# {sweep_dir / 'best_config.yaml'} (run it: distrain run config={sweep_dir / 'best_config.yaml'})")
    print(text, end="")
    return 0


def _take_flags(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """--worker, --slurm-array N and the Slurm options passed on to the array."""
    flags: dict[str, Any] = {"worker": False, "slurm_array": 0, "slurm": {}}
    names = {
        "--time": "time",
        "--partition": "partition",
        "--max-parallel": "max_parallel",
        "--cpus-per-task": "cpus_per_task",
    }
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if arg == "--worker":
            flags["worker"] = True
        elif name == "--slurm-array" or name in names:
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                raise ConfigError(f"{name} needs a value")
            i += 0 if eq else 1
            if name == "--slurm-array" or name in ("--max-parallel", "--cpus-per-task"):
                if not value.isdigit() or int(value) < 1:
                    raise ConfigError(f"{name}={value!r} is out of range; allowed: an integer >= 1")
                value = int(value)
            if name == "--slurm-array":
                flags["slurm_array"] = value
            else:
                flags["slurm"][names[name]] = value
        elif arg.startswith("--"):
            raise ConfigError(
                f"unknown option {arg!r}; options: --slurm-array N, --time, --partition, --max-parallel, --worker"
            )
        else:
            rest.append(arg)
        i += 1
    return rest, flags


@command
def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    argv, flags = _take_flags(argv)
    settings, fixed, space = parse_args(argv)
    sweep_dir = Path(settings["sweep_dir"]) if settings["sweep_dir"] else None
    spec_path = sweep_dir / "sweep.yaml" if sweep_dir else None
    if spec_path is not None and spec_path.is_file():  # resume (or an array worker): the saved spec rules
        spec = yaml.safe_load(spec_path.read_text())
        given = {"fixed": fixed, "space": [vars(p) for p in space]}
        if (fixed or space) and given != {k: spec[k] for k in given}:
            raise ConfigError(
                f"sweep_dir={sweep_dir} holds a sweep with other arguments; "
                "give the same ones (or none) to resume, or a new sweep_dir"
            )
        spec["trials"] = settings["trials"] if any(a.startswith("trials=") for a in argv) else spec["trials"]
    else:
        if flags["worker"]:
            raise ConfigError(f"--worker needs sweep_dir= of an existing sweep (no {spec_path})")
        if not space:
            raise ConfigError(
                "no search space given; e.g. 'optim.lr=loguniform(1e-4,1e-2)' 'model.hidden=choice(64,128)'"
            )
        cfg = check_space(fixed, space)
        if sweep_dir is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            sweep_dir = Path("runs") / "sweeps" / Path(cfg.recipe).stem / stamp
        spec = {
            "fixed": fixed,
            "space": [vars(p) for p in space],
            "trials": settings["trials"],
            "seed": settings["seed"],
            "prune_warmup": settings["prune_warmup"],
            "metric": cfg.train.metric,
            "direction": "minimize" if cfg.train.mode == "min" else "maximize",
        }
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if flags["slurm_array"]:
        from distrain.tools.slurm import submit_array

        open_study(sweep_dir, spec["direction"], spec["seed"], worker=False)  # create the DB before workers race
        command = [sys.executable, "-m", "distrain.cli", "sweep", "--worker", f"sweep_dir={sweep_dir.resolve()}"]
        job = submit_array(command, flags["slurm_array"], **flags["slurm"])
        print(
            f"submitted Slurm array job {job}: {flags['slurm_array']} workers on {sweep_dir / 'study.db'}; "
            f"then `distrain sweep sweep_dir={sweep_dir}` prints the best trial"
        )
        return 0
    print(f"sweep {sweep_dir}: {spec['trials']} trials, {spec['direction']} {spec['metric']}", flush=True)
    return optimize(sweep_dir, spec, worker=flags["worker"])
