"""`distrain slurm submit` and the batch templates, on a real one-node Slurm (tests/slurm_cluster.py).

The cluster tests compare Slurm jobs with the same run launched directly: final weights and
metrics must be equal, also after a USR1 drill and a partition-priority preemption, whose
requeued jobs must resume (every training step logged exactly once) rather than start over.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distrain.tools.slurm import SlurmOptions, render_training, submit_array
from distrain.tools.slurm import main as slurm_main

from helpers import TINY_HAR, metrics_rows, run_distrain, weights
from slurm_cluster import LocalSlurm, SlurmUnavailable, install

DISTRAIN = [sys.executable, "-m", "distrain.cli"]
STEPS = 100  # ~5 epochs of the tiny har run: long enough to interrupt in the middle
TINY = [*TINY_HAR, f"train.max_steps={STEPS}"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cluster():
    try:
        install()
        slurm = LocalSlurm()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        yield slurm.start()
    finally:
        slurm.stop()  # stops the daemons it started, by PID, whatever happened


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The tiny run launched directly with the same launch config the CPU template uses."""
    out = tmp_path_factory.mktemp("direct") / "run"
    run_distrain([*TINY, f"output_dir={out}"], launch_config="cpu_ddp")
    return out


def submit(cluster: LocalSlurm, args: list[str], cwd: Path) -> str:
    proc = subprocess.run([*DISTRAIN, "slurm", "submit", *args], cwd=cwd, env=cluster.env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("submitted job ")[1].split(";")[0]


def wait_done(cluster: LocalSlurm, job: str, timeout: float = 240) -> dict[str, str]:
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return cluster.wait_state(job, ended, timeout)


def log_of(cwd: Path, job: str) -> str:
    logs = list((cwd / "runs" / "slurm").glob(f"*-{job}*.out"))
    return "\n".join(p.read_text() for p in logs)


def wait_for_step(run_dir: Path, step: int, timeout: float = 180) -> int:
    """Block until the run has logged a training step >= `step`; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists():
            steps = [r["step"] for r in metrics_rows(run_dir) if "loss" in r]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.1)
    raise TimeoutError(f"{run_dir} did not reach step {step}")


def assert_same_run(run_dir: Path, ref: Path) -> None:
    got, want = weights(run_dir), weights(ref)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=f"weights differ at {k}")
    s, r = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref))
    assert s["steps"] == r["steps"] == STEPS
    for key, value in r["test"].items():
        if isinstance(value, float):
            assert s["test"][key] == pytest.approx(value, abs=1e-6), key


def assert_resumed(run_dir: Path, log: str, signalled_at: int) -> None:
    """The requeued job continued from a checkpoint taken after the signal; no step ran twice."""
    resumed = [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(resumed) == 1 and signalled_at <= resumed[0] < STEPS, resumed
    steps = [r["step"] for r in metrics_rows(run_dir) if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), f"steps repeated or lost: {steps}"


# ---------------------------------------------------------------- rendering (no cluster needed)


def _stub(path: Path, text: str) -> None:
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_dry_run_two_nodes_eight_gpus(tmp_path):
    """The rendered 2 x 8 script: concrete resources, c10d on the first node, per-node machine ranks."""
    proc = subprocess.run(
        [*DISTRAIN, "slurm", "submit", "recipe=har", "optim.lr=3e-4", "--nodes", "2", "--gpus-per-node", "8",
         "--time", "04:00:00", "--partition", "gpu", "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for want in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=04:00:00", "--partition=gpu",
                 "--requeue", "--signal=B:USR1@120", "--open-mode=append"):  # fmt: skip
        assert f"#SBATCH {want}" in sbatch, want
    assert not any("$" in line for line in sbatch), "an #SBATCH line relies on shell expansion"
    assert not list(tmp_path.iterdir()), "--dry-run wrote files"

    # Run the script with stand-ins for srun (2 nodes), scontrol and accelerate: each node must get
    # its own machine rank and the same rendezvous endpoint.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    out = tmp_path / "launches.txt"
    _stub(bin_dir / "scontrol", 'case "$1 $2" in "show hostnames") printf "gpu-a\\ngpu-b\\n";; '
                                '*) echo JobState=RUNNING;; esac\n')  # fmt: skip
    # srun: drop the options, run the command once per node with that node's SLURM_NODEID
    _stub(bin_dir / "srun", 'while [[ $1 == --* ]]; do shift; done\n'
                            'for n in 0 1; do SLURM_NODEID=$n "$@" & done; wait\n')  # fmt: skip
    _stub(bin_dir / "accelerate", f'echo "node=$SLURM_NODEID $*" >> {out}\n')
    accelerate = str(Path(sys.executable).parent / "accelerate")
    assert accelerate in script
    script = script.replace(accelerate, str(bin_dir / "accelerate"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "64",
           "WANDB_API_KEY": "sekret-value"}  # fmt: skip
    env.pop("SLURM_ARRAY_JOB_ID", None)
    run = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = sorted(out.read_text().splitlines())
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        words = line.split()
        assert words[0] == f"node={rank}"
        arg = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
        assert arg["--machine_rank"] == str(rank)
        assert arg["--num_machines"] == "2" and arg["--num_processes"] == "16"
        assert arg["--rdzv_backend"] == "c10d"
        assert arg["--main_process_ip"] == "gpu-a" and arg["--main_process_port"] == str(20000 + 4242)
        assert "optim.lr=3e-4" in words and "resume=auto" in words
        assert f"output_dir={tmp_path.resolve()}/runs/har/slurm-4242" in words
    assert "SLURM_RESTART_COUNT=0" in run.stdout and "--- pip freeze" in run.stdout
    assert "WANDB_API_KEY=***" in run.stdout and "sekret-value" not in run.stdout  # printenv masks secrets


def _free_job_id() -> int:
    """A job id whose derived rendezvous port (20000 + id % 20000) is free here."""
    for job in random.sample(range(1, 20000), 100):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 20000 + job))
            except OSError:
                continue
            return job
    raise RuntimeError("no free port in 20000-39999")


@pytest.mark.multiproc
def test_multinode_launch_line_trains_like_a_direct_run(reference, tmp_path):
    """The rendered 2-node script, its two "nodes" run on this machine (1 CPU process each): the
    c10d rendezvous forms one world of 2 and trains exactly like the direct 2-process run."""
    proc = subprocess.run([*DISTRAIN, "slurm", "submit", *TINY, "--nodes", "2", "--gpus-per-node", "1",
                           "--launch-config", "cpu_ddp", "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", 'case "$1 $2" in "show hostnames") echo localhost;; *) echo JobState=RUNNING;; esac\n')
    # srun: one task per "node"; node 1 starts a little later, so node 0 hosts the c10d store
    # (here both nodes are localhost, and accelerate checks the port is free on machine rank 0).
    _stub(bin_dir / "srun", 'while [[ $1 == --* ]]; do shift; done\n'
                            'SLURM_NODEID=0 "$@" & a=$!; sleep 3; SLURM_NODEID=1 "$@" & b=$!\n'
                            'wait $a; ra=$?; wait $b; rb=$?; exit $(( ra > rb ? ra : rb ))\n')  # fmt: skip
    job = _free_job_id()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": str(job),
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "1",
           # torchrun sets this for 2 local processes, not for 1 per node: same float reduction order
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("SLURM_ARRAY_JOB_ID", None)
    run = subprocess.run(["bash", "-c", proc.stdout], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = tmp_path / "runs" / "har" / f"slurm-{job}"
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == 2
    assert_same_run(run_dir, reference)


def test_gpu_template_one_node(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = render_training(["recipe=har"], SlurmOptions(gpus_per_node=4, time="2-00:00:00"))
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --nodes=1" in script
    assert "#SBATCH --cpus-per-task=32" in script and "#SBATCH --time=2-00:00:00" in script
    assert "--num_machines 1 --num_processes 4" in script and "--machine_rank" not in script


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "0"], "--nodes=0 is out of range"),
        (["--time", "4h"], "--time='4h' is not a Slurm time"),
        (["optim.lrr=1"], "unknown key 'optim.lrr'"),
        (["--launch-config", "nope"], "--launch-config=nope does not exist"),
    ],
)
def test_bad_options_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert slurm_main(["submit", "recipe=har", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_array_options_render_one_case_per_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = render_training(["recipe=har"], SlurmOptions(max_parallel=1), [["train.seed=1"], ["optim.lr=0.01"]])
    assert "#SBATCH --array=0-1%1" in script
    assert "0) TASK_ARGS=(train.seed=1) ;;" in script and "1) TASK_ARGS=(optim.lr=0.01) ;;" in script
    assert "%x-%A_%a.out" in script


# ---------------------------------------------------------------- on a real Slurm


@pytest.mark.slurm
@pytest.mark.multiproc
def test_bad_partition_is_reported_by_sbatch(cluster, tmp_path):
    proc = subprocess.run([*DISTRAIN, "slurm", "submit", *TINY, "--partition", "nosuch"], cwd=tmp_path,
                          env=cluster.env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "nosuch" in proc.stderr.lower(), proc.stderr
    assert not list(tmp_path.iterdir()), "a refused job left files behind"


@pytest.mark.slurm
@pytest.mark.multiproc
def test_cpu_job_matches_direct_run(cluster, reference, tmp_path):
    job = submit(cluster, [*TINY, "--procs", "2", "--time", "10"], tmp_path)
    info = wait_done(cluster, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    run_dir = tmp_path / "runs" / "har" / f"slurm-{job}"
    assert_same_run(run_dir, reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["slurm"] == {"job_id": job, "restart_count": 0}
    assert "SLURM_RESTART_COUNT=0" in log and "--- printenv" in log and "--- pip freeze" in log
    assert "\nSLURM_JOB_ID=" in log and "\ntorch==" in log


@pytest.mark.slurm
@pytest.mark.multiproc
def test_usr1_drill_requeues_and_resumes(cluster, reference, tmp_path):
    job = submit(cluster, [*TINY, "--time", "10"], tmp_path)
    run_dir = tmp_path / "runs" / "har" / f"slurm-{job}"
    seen = wait_for_step(run_dir, 3)
    cluster.cmd(["scancel", "--signal=USR1", "--batch", job])
    info = wait_done(cluster, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "got SIGUSR1" in log and f"requeueing {job}" in log and "SLURM_RESTART_COUNT=1" in log
    assert_resumed(run_dir, log, seen)
    assert_same_run(run_dir, reference)
    assert json.loads((run_dir / "summary.json").read_text())["slurm"]["restart_count"] == 1


@pytest.mark.slurm
@pytest.mark.multiproc
def test_partition_preemption_requeues_and_resumes(cluster, reference, tmp_path):
    job = submit(cluster, [*TINY, "--time", "10", "--partition", "debug"], tmp_path)
    run_dir = tmp_path / "runs" / "har" / f"slurm-{job}"
    seen = wait_for_step(run_dir, 3)
    # A job in the higher-priority partition that needs every CPU of the node preempts ours.
    high = cluster.cmd(["sbatch", "--parsable", "-p", "high", "-c", str(cluster.cpus), "-o", "/dev/null",
                        "--wrap", "sleep 1"]).strip()  # fmt: skip
    assert wait_done(cluster, high)["JobState"] == "COMPLETED"
    info = wait_done(cluster, job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log[-3000:]
    # Preemption here sends only TERM, and only to the job steps: the nodes report 143 and the job requeues.
    assert "training exited with code 143" in log and "SLURM_RESTART_COUNT=1" in log
    assert_resumed(run_dir, log, seen)
    assert_same_run(run_dir, reference)


@pytest.mark.slurm
@pytest.mark.multiproc
def test_array_runs_each_task_with_its_overrides(cluster, tmp_path):
    # One process per task so that both tasks fit on the node at once.
    args = [*TINY_HAR, "train.max_steps=20", "--procs", "1", "--time", "10",
            "--array", "train.seed=1", "--array", "train.seed=2 optim.lr=0.01"]  # fmt: skip
    job = submit(cluster, args, tmp_path)
    tasks = [f"{job}_0", f"{job}_1"]
    for task in tasks:
        assert wait_done(cluster, task)["JobState"] == "COMPLETED", log_of(tmp_path, job)[-3000:]
    dirs = [tmp_path / "runs" / "har" / f"slurm-{t}" for t in tasks]
    configs = [(d / "config.yaml").read_text() for d in dirs]
    assert "seed: 1" in configs[0] and "seed: 2" in configs[1] and "lr: 0.01" in configs[1]
    for d, task in zip(dirs, tasks, strict=True):
        summary = json.loads((d / "summary.json").read_text())
        assert summary["steps"] == 20 and summary["slurm"]["job_id"] == task
    w0, w1 = weights(dirs[0]), weights(dirs[1])
    assert any(not torch.equal(w0[k], w1[k]) for k in w0), "the two tasks trained the same thing"
    assert len(list((tmp_path / "runs" / "slurm").glob("*.out"))) == 2  # one log per task



@pytest.mark.slurm
def test_submit_array_runs_the_command_in_each_task(cluster, tmp_path, monkeypatch):
    """The entry point `distrain sweep --slurm-array N` uses: the same command in N tasks."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    job = submit_array(["bash", "-c", 'echo "task $SLURM_ARRAY_TASK_ID" > out_$SLURM_ARRAY_TASK_ID.txt'], 2,
                       time="5", cpus_per_task=1, job_name="sweep")  # fmt: skip
    for task in range(2):
        assert wait_done(cluster, f"{job}_{task}", timeout=120)["JobState"] == "COMPLETED"
        assert (tmp_path / f"out_{task}.txt").read_text() == f"task {task}\n"
    assert len(list((tmp_path / "runs" / "slurm").glob("sweep-*.out"))) == 2
