"""Launch mismatches and `distrain launch`: one line and exit 2/3 before any process starts, and
distrain's own exit code from a launcher that forwards every signal (signals end to end: test_signals.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distrain import cli
from distrain.errors import LaunchError
from distrain.parallel.launch import requested_world_size

from helpers import BIN, REPO, RUN_PY, TINY_HAR, free_port, metrics_rows

CONFIGS = REPO / "launch_configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "DISTRAIN_WORLD_SIZE", "PMI_SIZE",
                 "OMPI_COMM_WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU",
                 "DISTRAIN_LAUNCH_STATUS")  # fmt: skip


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory; a refused launch must leave it empty."""
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return here


def launch_in_process(capfd, argv: list[str]) -> tuple[int, list[str]]:
    code = cli.main(["launch", *argv])
    return code, capfd.readouterr().err.strip().splitlines()


def assert_one_line(lines: list[str], *words: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    for word in words:
        assert word in lines[0], (word, lines[0])


# ------------------------------------------------------------------ malformed launch configs: exit 2

BAD_CONFIGS = {
    "yaml_syntax": ("distributed_type: MULTI_GPU\nnum_processes: [2\n", ["line 3", "invalid YAML"]),
    "unknown_key": ("distributed_type: MULTI_GPU\nnum_procesess: 2\n", ["'num_procesess'", "num_processes"]),
    "distributed_type": ("distributed_type: FOO\nnum_processes: 2\n", ["'FOO'", "MULTI_GPU", "DEEPSPEED"]),
    "distributed_type_bare_no": ("distributed_type: NO\n", ["False", "quote 'NO'"]),
    "num_processes_word": ("distributed_type: MULTI_GPU\nnum_processes: two\n", ["num_processes", "'two'", "integer"]),
    "num_processes_bool": ("distributed_type: MULTI_GPU\nnum_processes: true\n", ["num_processes", "integer"]),
    "use_cpu_word": ("distributed_type: MULTI_GPU\nuse_cpu: maybe\n", ["use_cpu", "'maybe'", "true or false"]),
    "mixed_precision_bare_no": ("distributed_type: MULTI_GPU\nmixed_precision: no\n", ["mixed_precision", "quote"]),
    "fsdp_config_scalar": ("distributed_type: FSDP\nfsdp_config: 3\n", ["fsdp_config", "mapping"]),
    "compute_environment": ("compute_environment: MOON\ndistributed_type: NO\n", ["compute_environment", "'MOON'"]),
    "no_distributed_type": ("num_processes: 2\n", ["distributed_type is missing"]),
    "a_list": ("- distributed_type: MULTI_GPU\n", ["mapping", "list"]),
    "empty": ("", ["mapping", "NoneType"]),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_malformed_launch_config_is_one_line_exit_2(name, cwd, tmp_path, capfd):
    text, words = BAD_CONFIGS[name]
    path = tmp_path / "launch.yaml"
    path.write_text(text)
    code, lines = launch_in_process(capfd, ["--config_file", str(path), *TINY_HAR])
    assert code == 2
    assert_one_line(lines, str(path), *words)
    assert not any(cwd.iterdir())


def test_launch_config_that_is_not_a_yaml_file(cwd, tmp_path, capfd):
    binary = tmp_path / "launch.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    for path, words in ((binary, ["not a text file"]), (tmp_path, ["is a folder"]),
                        (tmp_path / "missing.yaml", ["does not exist"])):  # fmt: skip
        code, lines = launch_in_process(capfd, ["--config_file", str(path), *TINY_HAR])
        assert code == 2
        assert_one_line(lines, str(path), *words)
    bad_json = tmp_path / "launch.json"
    bad_json.write_text('{"distributed_type": "NO",\n "num_processes": }\n')
    code, lines = launch_in_process(capfd, ["--config_file", str(bad_json), *TINY_HAR])
    assert code == 2
    assert_one_line(lines, "line 2", "invalid JSON")
    assert not any(cwd.iterdir())


def test_bad_distrain_key_or_launch_option_is_one_line_before_any_process(cwd, capfd):
    ddp = str(CONFIGS / "cpu_ddp.yaml")
    code, lines = launch_in_process(capfd, ["--config_file", ddp, *TINY_HAR, "optim.lr=x"])
    assert code == 2
    assert_one_line(lines, "optim.lr")
    code, lines = launch_in_process(capfd, ["--config_file", ddp, *TINY_HAR, "optim.learning_rate=1"])
    assert code == 2
    assert_one_line(lines, "optim.learning_rate")
    code, lines = launch_in_process(capfd, ["--config_file", ddp, "--num_procs", "2", *TINY_HAR])
    assert code == 2
    assert_one_line(lines, "--num_procs")
    assert not any(cwd.iterdir())


# ------------------------------------------------------------------ mismatches: exit 3


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--config_file", str(CONFIGS / "single_gpu.yaml"), "--num_processes", "2"],
         ["distributed_type NO", "--num_processes asks for 2", "cpu_ddp.yaml", "multi_gpu.yaml"]),
        (["--cpu", "--num_processes", "3"], ["--cpu --num_processes 3", "ONE process", "cpu_ddp.yaml"]),
        (["--config_file", "NO_TWO", "--"], ["distributed_type NO", "num_processes in", "asks for 2"]),
    ],
    ids=["single_gpu_config_two_processes", "cpu_flag", "config_no_with_two"],
)  # fmt: skip
def test_one_process_launch_asked_for_more_is_exit_3(argv, words, cwd, tmp_path, capfd):
    if "NO_TWO" in argv:
        path = tmp_path / "no_two.yaml"
        path.write_text("distributed_type: 'NO'\nnum_processes: 2\nmixed_precision: 'no'\n")
        argv = [str(path) if a == "NO_TWO" else a for a in argv]
    code, lines = launch_in_process(capfd, [*argv, *TINY_HAR, "output_dir=run"])
    assert code == 3
    assert_one_line(lines, *words)
    assert not any(cwd.iterdir())


# ------------------------------------------------------------------ worker side


def test_world_size_needs_a_launcher(cwd, monkeypatch):
    assert requested_world_size() is None  # plain python
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert requested_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match=r"WORLD_SIZE=2 is set but no launcher started this process \(RANK, "
                                          r"MASTER_ADDR, MASTER_PORT unset\)"):  # fmt: skip
        requested_world_size()
    for var, value in (("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # torchrun / accelerate's torch launcher
    assert requested_world_size() == 2


def test_simple_launcher_signature_is_refused_but_not_a_shell_master_port(cwd, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29500")  # left in the shell, or set by a Slurm script
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert requested_world_size() is None
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # ... and accelerate's simple launcher
    with pytest.raises(LaunchError, match="more than one process but a launch config with distributed_type NO"):
        requested_world_size()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(LaunchError, match=r"--cpu --num_processes N runs ONE process"):
        requested_world_size()
    monkeypatch.setenv("DISTRAIN_WORLD_SIZE", "1")  # distrain launch checked it and exec'd one process
    assert requested_world_size() == 1


def test_world_size_without_launcher_real_process(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(RUN_PY), *TINY_HAR, f"output_dir={out}"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env={**ENV, "WORLD_SIZE": "2"})  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert_one_line(proc.stderr.strip().splitlines(), "WORLD_SIZE=2", "RANK", "MASTER_ADDR", "unset WORLD_SIZE")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.multiproc
def test_accelerate_launch_single_gpu_config_with_two_processes_is_refused_by_the_worker(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "single_gpu.yaml"),
                           "--num_processes", "2", str(RUN_PY), *TINY_HAR, f"output_dir={out}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ENV)  # fmt: skip
    assert proc.returncode != 0  # accelerate's simple launcher turns the worker's 3 into its own 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "asked for 2 processes" in errors[0] and "runs ONE process" in errors[0], errors
    assert "cpu_ddp.yaml" in errors[0] and "exit status 3" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_main_reports_its_exit_code_to_the_launch_status_file(cwd, tmp_path, monkeypatch, capfd):
    status = tmp_path / "status.json"
    monkeypatch.setenv("DISTRAIN_LAUNCH_STATUS", str(status))
    assert cli.main(["run", *TINY_HAR, "optim.lr=x"]) == 2
    assert json.loads(status.read_text()) == {"exit_code": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "status.json"]  # no temp file left
    capfd.readouterr()
    status.unlink()
    monkeypatch.setenv("RANK", "1")  # a RANK left in the shell alone does not silence a lone process
    assert cli.main(["run", *TINY_HAR, "optim.lr=x"]) == 2
    assert json.loads(status.read_text()) == {"exit_code": 2} and capfd.readouterr().err.count("error:") == 1
    status.unlink()
    monkeypatch.setenv("WORLD_SIZE", "2")  # other ranks of a launched run neither print nor report
    assert cli.main(["run", *TINY_HAR, "optim.lr=x"]) == 2
    assert not status.exists() and capfd.readouterr().err == ""  # rank 0 says it once


# ------------------------------------------------------------------ distrain launch end to end


def distrain_launch(args: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "distrain.cli", "launch", "--config_file", str(CONFIGS / "cpu_ddp.yaml"),
            "--main_process_port", str(free_port()), *TINY_HAR, f"output_dir={out}", *args]  # fmt: skip


@pytest.mark.multiproc
def test_distrain_launch_ddp_runs_to_the_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(distrain_launch(["train.max_steps=3"], out), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=ENV)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert max(r["step"] for r in metrics_rows(out) if "loss" in r) == 3
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


# ------------------------------------------------------------------ the agent's exceptions -> distrain's code


def _fake_agent(monkeypatch, status_code: int | None, raised: Exception | None) -> dict[str, str]:
    """accelerate's launch_command replaced by one that writes rank 0's status and raises what the agent would."""
    import accelerate.commands.launch as accelerate_launch

    seen: dict[str, str] = {}

    def launch_command(args):
        seen.update({k: os.environ[k] for k in ("PET_SIGNALS_TO_HANDLE", "PET_SHUTDOWN_TIMEOUT")})
        if status_code is not None:
            Path(os.environ["DISTRAIN_LAUNCH_STATUS"]).write_text(json.dumps({"exit_code": status_code}))
        if raised is not None:
            raise raised

    monkeypatch.setattr(accelerate_launch, "launch_command", launch_command)
    return seen


def _child_failed(**codes: int):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {int(r[4:]): ProcessFailure(int(r[4:]), 1000 + int(r[4:]), c, "<N/A>") for r, c in codes.items()}
    return ChildFailedError("run.py", failures)


@pytest.mark.parametrize(
    "status, raised, code, stderr",
    [
        (143, "signal", 143, None),  # the ranks saved and exited 143; the agent re-raised SIGTERM
        (None, "signal", 143, "got SIGTERM"),  # no rank reported
        (2, "child", 2, None),  # rank 0's own refusal
        (1, "child_killed", 137, "rank 1 (pid 1001) was killed by SIGKILL"),  # rank 0 lost its peer
        (None, "child_exit", 3, "rank 1 (pid 1001) exited 3"),
        (0, None, 0, None),
    ],
    ids=["status_after_signal", "signal_no_status", "status_2", "peer_killed", "peer_exit", "done"],
)  # fmt: skip
def test_launch_returns_distrains_exit_code_not_the_agents(status, raised, code, stderr, cwd, monkeypatch, capfd):
    from torch.distributed.elastic.multiprocessing.api import SignalException

    exc = {"signal": SignalException("sigterm", signal.SIGTERM), "child": _child_failed(rank0=2, rank1=-15),
           "child_killed": _child_failed(rank0=-15, rank1=-9), "child_exit": _child_failed(rank0=-15, rank1=3),
           None: None}[raised]  # fmt: skip
    monkeypatch.delenv("PET_SIGNALS_TO_HANDLE", raising=False)
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    seen = _fake_agent(monkeypatch, status, exc)
    code_got, lines = launch_in_process(capfd, ["--config_file", str(CONFIGS / "cpu_ddp.yaml"), *TINY_HAR])
    assert code_got == code
    if stderr is None:
        assert lines == []
    else:
        assert_one_line(lines, stderr)
    assert "SIGUSR1" in seen["PET_SIGNALS_TO_HANDLE"].split(",") and "SIGTERM" in seen["PET_SIGNALS_TO_HANDLE"]
    assert int(seen["PET_SHUTDOWN_TIMEOUT"]) >= 300
    assert "DISTRAIN_LAUNCH_STATUS" not in os.environ and not any(cwd.iterdir())
    assert "PET_SIGNALS_TO_HANDLE" not in os.environ and "PET_SHUTDOWN_TIMEOUT" not in os.environ  # put back


@pytest.mark.parametrize("launcher_argv, refused", [
    (["--config_file", str(CONFIGS / "single_gpu.yaml")], False),  # num_processes: 1 in the file
    (["--num_processes", "1"], False),
    (["--num_processes=2"], True),
    (["--config_file", "NO_TWO"], True),
])  # fmt: skip
def test_master_port_from_the_shell_is_not_taken_for_a_launcher(launcher_argv, refused, cwd, tmp_path, monkeypatch):
    """The simple launcher's signature (MASTER_PORT + accelerate's env) counts only where the parent
    `accelerate launch` was asked for more than one process (or where that cannot be read)."""
    no_two = tmp_path / "no_two.yaml"
    no_two.write_text("distributed_type: 'NO'\nnum_processes: 2\n")
    argv = [str(no_two) if a == "NO_TWO" else a for a in launcher_argv]
    parent = subprocess.Popen(["bash", "-c", 'exec -a /venv/bin/accelerate "$0" -c "import time; time.sleep(30)" "$@"',
                               sys.executable, "launch", *argv])
    try:
        monkeypatch.setattr(os, "getppid", lambda: parent.pid)
        monkeypatch.setenv("MASTER_PORT", "29500")
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
        for _ in range(500):  # until bash has exec'd
            if Path(f"/proc/{parent.pid}/cmdline").read_bytes().startswith(b"/venv/bin/accelerate\0"):
                break
            time.sleep(0.01)
        if refused:
            with pytest.raises(LaunchError, match="asked for 2 processes"):
                requested_world_size()
        else:
            assert requested_world_size() is None
    finally:
        parent.kill()
        parent.wait()


def test_config_file_may_name_a_shipped_launch_config(cwd, tmp_path):
    """Installed users write `--config_file cpu_ddp`; a real file of that name, or an unknown name, stays as given."""
    from distrain.templates import LAUNCH_CONFIGS
    from distrain.tools.launch import split_argv

    shipped = str(LAUNCH_CONFIGS / "cpu_ddp.yaml")
    assert split_argv(["--config_file", "cpu_ddp", "recipe=har"]) == (["--config_file", shipped], ["recipe=har"])
    assert split_argv(["--config_file=cpu_ddp.yaml", "--", "recipe=har"])[0] == [f"--config_file={shipped}"]
    (cwd / "cpu_ddp").write_text("distributed_type: NO\n")
    assert split_argv(["--config_file", "cpu_ddp", "recipe=har"])[0] == ["--config_file", "cpu_ddp"]
    assert split_argv(["--config_file", "nope", "recipe=har"])[0] == ["--config_file", "nope"]
