"""The `parallel` config section: one plan from parallel.* and the launch environment.

In-process: how parallel.backend and the accelerate launch config's exported variables resolve
into a ParallelPlan, the contradictions between them (an error naming both), what is written back
for config.yaml, and the resume verdict. One real `torchrun` run checks that parallel.backend=fsdp2
alone (no launch config, no environment variable) gives FSDP2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from distrain import cli
from distrain.checkpoint.resume_check import kind
from distrain.config import Config, to_plain
from distrain.errors import ConfigError, LaunchError
from distrain.parallel.launch import ParallelPlan, build_accelerator, resolve_plan
from distrain.recipe import resolve_config

from helpers import BIN, REPO, TINY_HAR, free_port

# What `accelerate launch --config_file launch_configs/cpu_fsdp.yaml` exports (accelerate 1.x).
CPU_FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
                "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "false"}  # fmt: skip
# ... and launch_configs/cpu_zero3.yaml
CPU_ZERO3_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
                 "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none"}  # fmt: skip


@pytest.fixture
def launch(monkeypatch):
    """Clears every launcher variable; returns a function that sets a launch: world size and exports."""
    for var in list(os.environ):
        if var.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_", "DISTRAIN_")) or var in (
            "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
            "OMPI_COMM_WORLD_SIZE",
        ):  # fmt: skip
            monkeypatch.delenv(var)

    def set_launch(world: int = 1, **exports: str) -> None:
        if world > 1:  # what torchrun and accelerate launch's multi-process launcher set
            monkeypatch.setenv("WORLD_SIZE", str(world))
            monkeypatch.setenv("RANK", "0")
            monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
            monkeypatch.setenv("MASTER_PORT", "29500")
        for name, value in exports.items():
            monkeypatch.setenv(name, value)

    return set_launch


def plan_for(*overrides: str) -> tuple[ParallelPlan, Config]:
    cfg, _ = resolve_config(["recipe=har", *overrides])
    return resolve_plan(cfg), cfg


def test_auto_is_what_the_launch_asks(launch):
    plan, cfg = plan_for()
    assert (plan.backend, plan.world_size) == ("single", None)
    launch(world=2)  # torchrun, or a cpu_ddp/multi_gpu launch config: processes only
    assert plan_for()[0].backend == "ddp"
    launch(world=2, **CPU_FSDP_ENV)
    plan, cfg = plan_for()
    assert (plan.backend, plan.source, plan.reshard_after_forward, plan.replicate) == (
        "fsdp2", "the launch config", True, 1)  # fmt: skip
    assert cfg.parallel.backend == "fsdp2", "config.yaml records the resolved backend, not auto"


def test_zero_stage_comes_from_the_launch_config(launch):
    launch(world=2, **CPU_ZERO3_ENV)
    plan, cfg = plan_for()
    assert (plan.backend, plan.zero_stage, plan.offload_optimizer) == ("zero3", 3, "none")
    assert cfg.parallel.backend == "zero3" and cfg.parallel.zero_offload_params == "none"


def test_torchrun_selects_fsdp2_and_zero_from_the_config_alone(launch):
    launch(world=2)
    plan, _ = plan_for("parallel.backend=fsdp2", "parallel.fsdp_reshard_after_forward=false",
                       "parallel.fsdp_replicate=2")  # fmt: skip
    assert (plan.backend, plan.source, plan.reshard_after_forward, plan.replicate) == (
        "fsdp2", "parallel.backend", False, 2)  # fmt: skip
    plan, _ = plan_for("parallel.backend=zero2", "parallel.zero_offload_optimizer=cpu")
    assert (plan.backend, plan.zero_stage, plan.offload_optimizer, plan.offload_params) == ("zero2", 2, "cpu", "none")


def test_the_written_config_reproduces_the_backend_without_the_launch_config(launch, tmp_path):
    launch(world=2, **{**CPU_FSDP_ENV, "FSDP_RESHARD_AFTER_FORWARD": "false"})
    _, cfg = plan_for()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
    for name in CPU_FSDP_ENV:
        os.environ.pop(name)  # now under torchrun: no launch config
    plan, _ = plan_for(f"config={tmp_path / 'config.yaml'}")
    assert (plan.backend, plan.source, plan.reshard_after_forward) == ("fsdp2", "parallel.backend", False)


@pytest.mark.parametrize(("exports", "backend", "names"), [
    (CPU_FSDP_ENV, "ddp", ["distributed_type FSDP", "parallel.backend=ddp"]),
    (CPU_FSDP_ENV, "zero3", ["distributed_type FSDP", "parallel.backend=zero3"]),
    (CPU_ZERO3_ENV, "fsdp2", ["zero_stage 3", "parallel.backend=fsdp2"]),
    (CPU_ZERO3_ENV, "zero2", ["zero_stage 3", "parallel.backend=zero2"]),
    (CPU_ZERO3_ENV, "single", ["zero_stage 3", "parallel.backend=single"]),
])  # fmt: skip
def test_a_launch_config_contradicting_parallel_backend_names_both(launch, exports, backend, names):
    launch(world=2, **exports)
    with pytest.raises(LaunchError) as e:
        plan_for(f"parallel.backend={backend}")
    assert all(n in str(e.value) for n in names), str(e.value)
    assert "\n" not in str(e.value)


def test_a_launch_config_option_contradicting_parallel_names_both(launch):
    launch(world=2, **CPU_FSDP_ENV)
    with pytest.raises(LaunchError, match=r"fsdp_offload_params=false but parallel\.fsdp_cpu_offload=true"):
        plan_for("parallel.fsdp_cpu_offload=true")
    assert plan_for("parallel.fsdp_cpu_offload=false")[0].cpu_offload is False  # agreeing: fine
    launch(world=2, PARALLELISM_CONFIG_DP_REPLICATE_SIZE="2")
    with pytest.raises(LaunchError, match=r"replicate_size=2 but parallel\.fsdp_replicate=1"):
        plan_for("parallel.fsdp_replicate=1")


def test_deepspeed_json_stage_and_offload_against_parallel(launch, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    launch(world=2)
    plan, _ = plan_for("parallel.backend=zero3", f"parallel.deepspeed_config={ds}")
    assert (plan.zero_stage, plan.offload_optimizer, plan.deepspeed_config) == (3, "cpu", str(ds))
    with pytest.raises(LaunchError, match=r"stage=3 but the backend is zero2"):
        plan_for("parallel.backend=zero2", f"parallel.deepspeed_config={ds}")
    with pytest.raises(LaunchError, match=r"offload_optimizer\.device=cpu but parallel\.zero_offload_optimizer=none"):
        plan_for("parallel.backend=zero3", f"parallel.deepspeed_config={ds}", "parallel.zero_offload_optimizer=none")
    launch(world=2, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ds))  # stage from the JSON
    assert plan_for()[0].backend == "zero3"


def test_world_size_against_the_backend(launch):
    launch(world=2)
    with pytest.raises(LaunchError, match=r"parallel\.backend=single but the launcher started 2 processes"):
        plan_for("parallel.backend=single")
    with pytest.raises(ConfigError, match="do not divide the 2 processes"):
        plan_for("parallel.backend=fsdp2", "parallel.fsdp_replicate=3")
    launch(world=1)
    os.environ.pop("WORLD_SIZE")
    plan, cfg = plan_for("parallel.backend=ddp")  # DDP of one process is the plain loop
    assert (plan.backend, cfg.parallel.backend) == ("single", "single") and plan.notes
    assert plan_for("parallel.backend=fsdp2")[0].backend == "fsdp2"  # FSDP2 on one process, as before
    assert plan_for("parallel.backend=zero2")[0].zero_stage == 2


def test_the_fsdp_request_survives_hiding_it_from_accelerate(launch, monkeypatch):
    launch(world=1, **CPU_FSDP_ENV)
    monkeypatch.setenv("DISTRAIN_USE_FSDP", "")  # undone after the test, like the variables launch() sets
    plan, cfg = plan_for()
    build_accelerator(cfg, plan)
    assert "ACCELERATE_USE_FSDP" not in os.environ, "accelerate must not see it: distrain applies FSDP2"
    assert plan_for()[0].backend == "fsdp2", "a second run in the same process (a sweep trial) still gets FSDP2"


def test_fsdp_version_1_is_refused(launch):
    launch(world=2, **{**CPU_FSDP_ENV, "FSDP_VERSION": "1"})
    with pytest.raises(ConfigError, match="fsdp_version=1"):
        plan_for()


def test_parallel_is_live_on_resume():
    assert kind("parallel.backend") == kind("parallel.fsdp_reshard_after_forward") == "live"


def test_contradiction_is_one_line_exit_3_and_nothing_written(launch, tmp_path, capfd):
    launch(world=1, **CPU_FSDP_ENV)
    out = tmp_path / "run"
    assert cli.run_main([*TINY_HAR, "parallel.backend=ddp", f"output_dir={out}"]) == 3
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "distributed_type FSDP" in err[0] and "parallel.backend=ddp" in err[0], err
    assert not out.exists()


@pytest.mark.multiproc
def test_torchrun_runs_fsdp2_from_parallel_backend(tmp_path: Path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "TORCH_ELASTIC_", "ACCELERATE_", "FSDP_", "DISTRAIN_"))}  # fmt: skip
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "distrain.run",
           *TINY_HAR, "parallel.backend=fsdp2", "train.max_steps=2", f"output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (out / "train.log").read_text()
    assert re.search(r"parallel +fsdp2 \(from parallel\.backend\)", log)
    assert re.search(r"sharding +FSDP2 full shard, 2 shards", log)
    assert json.loads((out / "summary.json").read_text())["backend"] == "fsdp2"
    assert yaml.safe_load((out / "config.yaml").read_text())["parallel"]["backend"] == "fsdp2"
