"""distrain sweep: search-space errors, an in-process Optuna study on pharma, resume, pruning via Trainer.on_eval."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from distrain.recipe import resolve_config
from distrain.tools.sweep import main as sweep
from distrain.train.trainer import Trainer

TINY = [
    "recipe=pharma",
    "train.max_epochs=3",
    "train.patience=0",
    "model.layers=1",
    "log.progress=false",
    "ckpt.save_best=false",
    "ckpt.save_final=false",
]
SPACE = ["optim.lr=loguniform(1e-4,1e-2)", "model.hidden=choice(8,16,32)"]


@pytest.mark.parametrize(
    "arg, message",
    [
        ("optim.lr=loguniform(1e-4)", "loguniform takes two numbers"),
        ("optim.lr=loguniform(0,1)", "loguniform needs low > 0"),
        ("optim.lr=uniform(1,0.5)", "low must be below high"),
        ("optim.lr=normal(0,1)", "is not a search space"),
        ("model.hidden=choice()", "choice needs at least one value"),
        ("model.hidden=int(1.5,4)", "bounds must be integers"),
        ("model.hidden=choice(8,wide)", "model.hidden='wide' must be an integer"),
        ("optim.lrr=uniform(0.1,0.2)", "unknown key 'optim.lrr'; closest valid key: optim.lr"),
        ("prune_warmup=-1", "prune_warmup=-1 is out of range"),
    ],
)
def test_malformed_space_is_one_line_exit_2(tmp_path, capsys, arg, message):
    code = sweep([*TINY, arg, f"sweep_dir={tmp_path / 's'}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_sweep_runs_trials_saves_best_and_resumes(tmp_path, capsys):
    d = tmp_path / "s"
    assert sweep([*TINY, *SPACE, "trials=3", f"sweep_dir={d}"]) == 0
    out = capsys.readouterr().out
    trials = sorted(d.glob("trial_*/trial.json"))
    records = [json.loads(p.read_text()) for p in trials]
    assert len(records) == 3 and all((p.parent / "summary.json").is_file() for p in trials)
    # Reference: the best value from the trial run dirs' own summaries, not from Optuna.
    values = {
        r["number"]: json.loads((d / f"trial_{r['number']:04d}" / "summary.json").read_text())["best_metric"]["loss"]
        for r in records
    }
    best = min(values, key=values.get)
    assert f"best trial {best}:" in out
    best_cfg = yaml.safe_load((d / "best_config.yaml").read_text())
    params = next(r["params"] for r in records if r["number"] == best)
    assert (
        best_cfg["optim"]["lr"] == pytest.approx(params["optim.lr"])
        and best_cfg["model"]["hidden"] == params["model.hidden"]
    )
    cfg, _ = resolve_config([f"config={d / 'best_config.yaml'}"])  # runnable as it is
    assert cfg.recipe == "pharma" and cfg.output_dir is None

    # A crash leaves a RUNNING trial behind; the same command re-runs its parameters and adds one more trial.
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{d / 'study.db'}")
    stale = study.ask(
        {
            "optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
            "model.hidden": optuna.distributions.CategoricalDistribution([8, 16, 32]),
        }
    )
    assert sweep([*TINY, *SPACE, "trials=4", f"sweep_dir={d}"]) == 0
    out = capsys.readouterr().out
    assert f"trial {stale.number} was left unfinished" in out
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{d / 'study.db'}")
    states = optuna.trial.TrialState
    done = [t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]  # the 4th may be pruned
    assert len(done) == 4 and done[-1].params == stale.params
    assert [t.number for t in study.trials if t.state == states.FAIL] == [stale.number]
    # Other arguments on an existing sweep_dir are refused.
    assert sweep([*TINY, "optim.lr=uniform(0.1,0.2)", f"sweep_dir={d}"]) == 2


def test_pruning_from_on_eval_ends_the_run_cleanly(tmp_path):
    cfg, recipe = resolve_config([*TINY, "train.eval_every=2", f"output_dir={tmp_path / 'r'}"])
    trainer = Trainer(cfg, recipe)
    seen = []

    def prune(step, metrics):
        seen.append((step, metrics["loss"]))
        raise optuna.TrialPruned("median")

    trainer.on_eval.append(prune)
    with pytest.raises(optuna.TrialPruned):
        trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert seen == [(2, rows[-1]["val/loss"])]  # the callback saw the logged evaluation, and training stopped there
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_array_workers_share_the_study(tmp_path, monkeypatch, capsys):
    from slurm_cluster import LocalSlurm, SlurmUnavailable, install

    try:
        install()
        slurm = LocalSlurm().start()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
        d = tmp_path / "s"
        args = [*TINY, *SPACE, "trials=4", f"sweep_dir={d}", "--slurm-array", "2", "--time", "10", "--cpus-per-task=1"]
        assert sweep(args) == 0
        job = capsys.readouterr().out.split("submitted Slurm array job ")[1].split(":")[0]
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        for task in range(2):
            assert slurm.wait_state(f"{job}_{task}", ended, 300)["JobState"] == "COMPLETED"
        logs = [p.read_text() for p in (tmp_path / "runs" / "slurm").glob("*.out")]
        assert len(logs) == 2 and all("trial " in log for log in logs), logs  # both workers ran trials
        study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{d / 'study.db'}")
        states = optuna.trial.TrialState
        assert len([t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]) >= 4
        assert sweep([f"sweep_dir={d}"]) == 0  # collects: prints and saves the best trial
        assert (d / "best_config.yaml").is_file()
    finally:
        slurm.stop()
