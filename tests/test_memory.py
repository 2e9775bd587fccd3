"""Memory per process: the training-state estimate, the refusal of a run that cannot fit, the one-line
out-of-memory error, and (opt-in, DISTRAIN_MEMORY_TESTS=1: minutes on 2 CPU cores, not in CI) the
103M-parameter Llama of benchmarks/llama_recipe.py, which under a per-process memory cap only the
sharding backends can train, and whose measured bytes per parameter put FSDP2 and ZeRO-3 below DDP.

The cap is RLIMIT_DATA, set by the test on the launcher (and inherited by its ranks): it bounds a
process's private writable memory, the heap torch allocates tensors from.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from distrain.errors import MemoryBudgetError, OutOfMemory
from distrain.train import memory

from helpers import BIN, REPO, TINY_HAR, free_port, metrics_rows, weights

RECIPE = REPO / "benchmarks" / "llama_recipe.py"
BIG = os.environ.get("DISTRAIN_MEMORY_TESTS") == "1"
needs_big = pytest.mark.skipif(not BIG, reason="the 103M-parameter runs take minutes: set DISTRAIN_MEMORY_TESTS=1")
LLAMA_PARAMS = 103_302_144  # the recipe's default model: 8 x 12.85M per layer + two 256 x 1024 embeddings


def plan(backend: str, **kw) -> SimpleNamespace:
    fields = {"backend": backend, "replicate": 1, "cpu_offload": False, "offload_optimizer": "none",
              "offload_params": "none", "deepspeed": backend.startswith("zero")}  # fmt: skip
    return SimpleNamespace(**{**fields, **kw})


ADAMW = SimpleNamespace(name="adamw", momentum=0.0)


# ---------------------------------------------------------------- the estimate


@pytest.mark.parametrize(("backend", "per_param"), [
    ("single", 16), ("ddp", 16), ("zero0", 16), ("fsdp2", 8), ("zero3", 8),
    ("zero1", 14), ("zero2", 12),  # DeepSpeed's cloned fp32 master partition, even in fp32 (issue 16's floors)
])  # fmt: skip
def test_state_estimate_per_backend_at_two_processes_is_the_issues_floor(backend, per_param):
    est = memory.estimate(1_000_000, 1_000_000, plan(backend), 2, ADAMW, "no")
    assert est.per_process == per_param * 1_000_000
    assert est.per_param == per_param


def test_state_estimate_counts_frozen_parameters_and_the_optimizer_kind():
    # frozen: weights only; SGD with momentum one buffer, without none
    assert memory.estimate(10, 4, plan("ddp"), 2, ADAMW, "no").per_process == 10 * 4 + 4 * 12
    sgd = SimpleNamespace(name="sgd", momentum=0.9)
    assert memory.estimate(10, 10, plan("ddp"), 2, sgd, "no").per_process == 10 * 12
    assert memory.estimate(10, 10, plan("fsdp2"), 2, SimpleNamespace(name="sgd", momentum=0.0), "no").per_process == 40
    # FSDP2 over 4 processes as 2 replicas x 2 shards keeps half, not a quarter
    assert memory.estimate(100, 100, plan("fsdp2", replicate=2), 4, ADAMW, "no").per_process == 800
    # ZeRO-3 in bf16: bf16 weights and grads, the fp32 master and the moments, all partitioned
    assert memory.estimate(100, 100, plan("zero3"), 2, ADAMW, "bf16").per_process == 50 * (2 + 2 + 4 + 8)


def test_held_bytes_counts_tied_weights_once_and_meta_not_at_all():
    lin = torch.nn.Linear(100, 10, bias=False)
    tied = torch.nn.Sequential(lin, torch.nn.Linear(10, 100, bias=False))
    tied[1].weight = torch.nn.Parameter(lin.weight.data.t())  # a view: the same storage
    assert memory.held_bytes(tied, torch.device("cpu")) == 1000 * 4
    with torch.device("meta"):
        assert memory.held_bytes(torch.nn.Linear(100, 10), torch.device("cpu")) == 0


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


@pytest.fixture
def data_limit():
    """Sets this process's RLIMIT_DATA soft limit; the old one comes back after (raising it is allowed)."""
    old = resource.getrlimit(resource.RLIMIT_DATA)

    def set_soft(soft: int | None) -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (old[0] if soft is None else soft, old[1]))

    yield set_soft
    resource.setrlimit(resource.RLIMIT_DATA, old)


def test_check_fits_refuses_a_replica_that_the_limit_cannot_hold_and_passes_a_shard(data_limit):
    model = torch.nn.Linear(1000, 5000)  # 5.0M parameters: 20 MB of weights, 80 MB of training state
    cfg = SimpleNamespace(optim=ADAMW, precision="no")
    # 50 MiB beyond what the process uses now, plus the 20 MB its weights hold: < 80 MB (DDP), > 40 MB (FSDP2)
    data_limit(_status_bytes("VmData") + 50 * 2**20)
    try:
        with pytest.raises(MemoryBudgetError) as e:
            memory.check_fits(model, cfg, plan("ddp"), 2, torch.device("cpu"))
        est = memory.check_fits(model, cfg, plan("fsdp2"), 2, torch.device("cpu"))
    finally:
        data_limit(None)
    assert est.per_process == 16 * 2_502_500
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    assert msg.startswith("out of memory (estimated before training): ddp keeps 0.07 GiB of training state per process")
    assert "5,005,000 parameters x 16.0 B" in msg and "RLIMIT_DATA soft limit" in msg
    assert "FSDP2" in msg and "ZeRO-3" in msg and "cpu_fsdp.yaml" in msg and "cpu_zero3.yaml" in msg


def test_offloaded_runs_are_not_estimated(data_limit):
    model = torch.nn.Linear(1000, 5000)
    data_limit(_status_bytes("VmData") + 30 * 2**20)
    try:
        memory.check_fits(model, SimpleNamespace(optim=ADAMW, precision="no"), plan("zero3", offload_optimizer="cpu"),
                          2, torch.device("cpu"))  # fmt: skip
    finally:
        data_limit(None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_of_a_few_mib_go_back_to_the_system():
    """After return_freed_memory (the Trainer's, for models of memory.LARGE_MODEL parameters or more),
    tensors of 1 MiB and more are mapped on their own: freed, they leave the resident set, even
    between small tensors that stay."""
    assert memory.return_freed_memory()
    torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)  # freed at once: raises glibc's default threshold
    big, small = [], []
    for _ in range(40):
        big.append(torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1))
        small.append(torch.ones(16 * 2**10, dtype=torch.uint8))  # stay, between the big ones
    held = _status_bytes("VmRSS")
    del big
    assert held - _status_bytes("VmRSS") > 120 * 2**20


# ---------------------------------------------------------------- a real out-of-memory error


def test_out_of_memory_errors_become_one_line_naming_the_estimate():
    model = torch.nn.Linear(1000, 100)
    memory.check_fits(model, SimpleNamespace(optim=ADAMW, precision="no"), plan("ddp"), 1, torch.device("cpu"))
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 2147483648 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip
    for e in (cpu, MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")):
        oom = memory.out_of_memory(e, rank=1)
        assert isinstance(oom, OutOfMemory) and oom.exit_code == 1
        msg = str(oom)
        assert "\n" not in msg and msg.startswith("out of memory on rank 1: ")
        assert "100,100 parameters x 16.0 B" in msg and "FSDP2" in msg and "ZeRO-3" in msg
    assert "enforce fail" not in str(memory.out_of_memory(cpu, 0))
    assert memory.out_of_memory(ValueError("shapes differ"), 0) is None
    assert memory.out_of_memory(RuntimeError("expected a tensor"), 0) is None


def test_out_of_memory_while_training_exits_1_with_one_line(monkeypatch, tmp_path, capsys):
    from distrain.cli import run_main
    from distrain.train.trainer import Trainer

    def train(self):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 8 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip

    monkeypatch.setattr(Trainer, "train", train)
    code = run_main([*TINY_HAR, "train.max_steps=1", f"output_dir={tmp_path / 'run'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error: out of memory on rank 0: can't allocate memory")
    assert "parameters x 16.0 B" in err[0]


def test_other_errors_while_training_keep_their_traceback(monkeypatch, tmp_path):
    from distrain.cli import run_main
    from distrain.train.trainer import Trainer

    def train(self):
        raise ValueError("a bug")

    monkeypatch.setattr(Trainer, "train", train)
    with pytest.raises(ValueError, match="a bug"):
        run_main([*TINY_HAR, "train.max_steps=1", f"output_dir={tmp_path / 'run'}"])


# ---------------------------------------------------------------- the 103M model under a cap


# 12 B per parameter between the 16 B of a full replica and the 8 B of a shard at 2 processes, on top
# of 0.45 GiB for the interpreter, torch, transformers, DeepSpeed and the data (0.34 GiB measured).
CAP = int(0.45 * 2**30) + 12 * LLAMA_PARAMS


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (CAP, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def launch_capped(args: list[str], launch_config: str | None, timeout: float = 1200) -> subprocess.CompletedProcess:
    """distrain.run through `accelerate launch` (or one plain process), each process capped at CAP."""
    if launch_config is None:
        cmd = [sys.executable, "-m", "distrain.run", *args]
    else:
        config = REPO / "launch_configs" / f"{launch_config}.yaml"
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port",
               str(free_port()), "-m", "distrain.run", *args]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
                          preexec_fn=_capped)  # fmt: skip


def llama(run_dir: Path, *extra: str) -> list[str]:
    return [f"recipe={RECIPE}", "data.batch_size=1", "log.progress=false", "log.every=1", f"output_dir={run_dir}",
            *extra]  # fmt: skip


@pytest.mark.multiproc
def test_ddp_of_a_model_whose_state_does_not_fit_the_cap_stops_with_one_line(tmp_path):
    pytest.importorskip("transformers")
    run = tmp_path / "ddp"
    proc = launch_capped(llama(run, "train.max_steps=1"), "cpu_ddp", timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # the launcher's own exit code is its business (accelerate's turns the ranks' 2 into 1); the ranks' is 2
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("torch/distributed/elastic")[0], proc.stderr[-3000:]
    line = errors[0]
    assert line.startswith("error: out of memory (estimated before training): ddp keeps 1.54 GiB"), line
    assert f"{LLAMA_PARAMS:,} parameters x 16.0 B" in line and "RLIMIT_DATA" in line
    assert "FSDP2" in line and "ZeRO-3" in line
    assert not run.exists()  # refused before the run dir was claimed


@pytest.mark.slow
@pytest.mark.multiproc
@needs_big
@pytest.mark.parametrize("launch_config", ["cpu_fsdp", "cpu_zero3"])
def test_sharded_backends_train_save_resume_and_export_the_model_under_the_cap(tmp_path, launch_config):
    pytest.importorskip("transformers")
    run = tmp_path / launch_config
    first = launch_capped(llama(run, "train.max_steps=1"), launch_config)
    assert first.returncode == 0, first.stderr[-4000:]
    step1 = run / "checkpoints" / "step_00000001"
    assert step1.is_dir()
    resumed = launch_capped(llama(run, "train.max_steps=2", f"resume={step1}"), launch_config)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["segments"] == 2
    assert [r["step"] for r in metrics_rows(run) if "loss" in r] == [1, 2]
    out = tmp_path / "export"
    export = subprocess.run([str(BIN / "distrain"), "export", str(run), "--out", str(out), "--trust-recipe"],
                            capture_output=True, text=True, timeout=600, cwd=REPO, preexec_fn=_capped,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    exported, trained = load_file(str(out / "model.safetensors")), weights(run)
    assert sum(t.numel() for t in trained.values()) == LLAMA_PARAMS
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


@pytest.mark.slow
@pytest.mark.multiproc
@needs_big
def test_fsdp2_and_zero3_keep_well_under_ddps_memory_per_rank(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import memory as bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    results = bench.run_all(["ddp", "fsdp2", "zero3"], tmp_path, [])
    per_param = {b: bench.bytes_per_param(big, tiny) for b, (big, tiny) in results.items()}
    assert per_param["fsdp2"] < 0.6 * per_param["ddp"], per_param
    assert per_param["zero3"] < 0.6 * per_param["ddp"], per_param
