"""`distrain launch [accelerate launch options] recipe=har [key=value ...]`: accelerate launch, checked.

Before any process starts it checks the launch config file (one line, exit 2), refuses a launch
that would run fewer processes than asked (exit 3), and resolves the distrain config once (exit
2). Then it runs accelerate's launcher in this process, with torch elastic's agent told to forward
every signal distrain handles (SIGUSR1 too) and to wait for the save, and returns distrain's own
exit code (rank 0 writes it to the file DISTRAIN_LAUNCH_STATUS names), not the agent's traceback.
A one-process launch execs the training process itself, so its signals and exit code are its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distrain.cli import command
from distrain.errors import ConfigError, LaunchError

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
USAGE = "usage: distrain launch [accelerate launch options] recipe=<name|path.py> [key=value ...]"
# Signals the agent forwards to the workers: its defaults plus SIGUSR1 (Slurm's warning signal), which
# would otherwise kill the launcher and orphan the training processes.
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
SHUTDOWN_TIMEOUT_S = 300  # the agent's wait for the workers' save before SIGKILL (torch's default: 30)
LEGACY_KEYS = ("fp16", "dynamo_backend")  # older config keys accelerate still converts


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate options, distrain's key=value args): split at `--`, else at the first key=value token."""
    if "--" in argv:
        i = argv.index("--")
        return with_shipped_config(argv[:i]), argv[i + 1 :]
    for i, arg in enumerate(argv):
        if not arg.startswith("-") and "=" in arg:
            return with_shipped_config(argv[:i]), argv[i:]
    return with_shipped_config(argv), []


def with_shipped_config(options: list[str]) -> list[str]:
    """`--config_file cpu_ddp` names a launch config distrain ships (no such file here): its path,
    so installed users need not know where the package lives."""
    from distrain.templates import LAUNCH_CONFIGS

    def shipped(value: str) -> str:
        path = LAUNCH_CONFIGS / (value if value.endswith(".yaml") else f"{value}.yaml")
        return str(path) if "/" not in value and not os.path.exists(value) and path.is_file() else value

    out = list(options)
    for i, option in enumerate(out):
        if option == "--config_file" and i + 1 < len(out):
            out[i + 1] = shipped(out[i + 1])
        elif option.startswith("--config_file="):
            out[i] = "--config_file=" + shipped(option.split("=", 1)[1])
    return out


def parse_launch_args(options: list[str], recipe_args: list[str]) -> argparse.Namespace:
    """accelerate's own parser, with distrain/run.py as the training script; errors as ConfigError."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def fail(message: str) -> typing.NoReturn:
        raise ConfigError(f"accelerate launch options: {message}")

    parser.error = fail  # type: ignore[method-assign]
    return parser.parse_args([*options, str(RUN_PY), *recipe_args])


# ------------------------------------------------------------------ the launch config file


def config_file_of(args: argparse.Namespace) -> str | None:
    """The file accelerate will read: --config_file, else its default config where one exists (not with --cpu)."""
    if args.config_file is not None:
        return str(args.config_file)
    from accelerate.commands.config.config_args import default_config_file

    return default_config_file if os.path.isfile(default_config_file) and not args.cpu else None


def read_launch_config(path: str) -> dict[str, Any]:
    """The launch config as a mapping; ConfigError (one line naming the file, line or key) if malformed."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig, SageMakerConfig
    from accelerate.utils import ComputeEnvironment, DistributedType

    where = f"launch config {path}"
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{where} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror or e}") from None
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not a text file (binary content)") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} line {e.lineno}: invalid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of accelerate settings, got {type(data).__name__}")

    env = data.get("compute_environment", ComputeEnvironment.LOCAL_MACHINE.value)
    envs = [e.value for e in ComputeEnvironment]
    if env not in envs:
        raise ConfigError(f"{where}: compute_environment: {env!r} is not one of {', '.join(envs)}")
    cls = SageMakerConfig if env == ComputeEnvironment.AMAZON_SAGEMAKER.value else ClusterConfig
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields and key not in LEGACY_KEYS:
            close = difflib.get_close_matches(str(key), sorted(fields), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; keys: {', '.join(sorted(fields))}")
    if "distributed_type" not in data:
        raise ConfigError(f"{where}: distributed_type is missing (e.g. NO, MULTI_GPU, FSDP, DEEPSPEED)")
    if cls is ClusterConfig:
        types = [t.value for t in DistributedType]
        if data["distributed_type"] not in types:
            hint = "(quote 'NO' in YAML) " if data["distributed_type"] is False else ""
            raise ConfigError(
                f"{where}: distributed_type: {data['distributed_type']!r} {hint}is not one of {', '.join(types)}"
            )
    _check_field_types(where, cls, data)
    return data


def _check_field_types(where: str, cls: type, data: dict[str, Any]) -> None:
    """int, bool, mapping and mixed_precision fields hold values of their type (YAML's bare no is False)."""
    from accelerate.utils import PrecisionType

    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key == "mixed_precision":
            allowed = [p.value for p in PrecisionType]
            if value is not None and value not in allowed:
                hint = " (quote 'no' in YAML)" if value is False else ""
                raise ConfigError(f"{where}: mixed_precision: {value!r}{hint} is not one of {', '.join(allowed)}")
            continue
        hint = hints.get(key)
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if value is None and optional:
            continue
        if base is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: {value!r} is not true or false")
        if base is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: {key}: {value!r} is not an integer")
        if base is dict and not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: must be a mapping, got {value!r}")


# ------------------------------------------------------------------ mismatches


def validated(args: argparse.Namespace) -> argparse.Namespace:
    """accelerate's own option checks and defaults (the config file merged in), as launch_command applies them.

    accelerate exposes them only as a private function; re-implementing them would drift from the
    launcher that really runs. Its "values not passed" warnings are left to the real launch.
    """
    from accelerate.commands import launch as accelerate_launch

    quiet = logging.getLogger(accelerate_launch.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        args, _, _ = accelerate_launch._validate_launch_command(args)
    except (ValueError, FileNotFoundError, AssertionError) as e:
        raise ConfigError(f"accelerate launch: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        quiet.setLevel(level)
    return args


def uses_simple_launcher(args: argparse.Namespace, config: dict[str, Any] | None) -> bool:
    """launch_command's choice: one plain subprocess unless a distributed launcher is asked for (--cpu wins)."""
    distributed = args.use_deepspeed or args.use_fsdp or args.use_megatron_lm or args.multi_gpu or args.tpu
    sagemaker = config is not None and config.get("compute_environment") == "AMAZON_SAGEMAKER"
    return not sagemaker and (args.cpu or not distributed)


def check_mismatch(options: list[str], args: argparse.Namespace, config_path: str | None) -> None:
    """Refuse what accelerate would silently run as ONE process: N>1 processes on its simple launcher."""
    if getattr(args, "mpirun_hostfile", None):
        return  # mpirun starts the N processes
    n = args.num_processes or 1
    if n <= 1:
        return
    given = "--num_processes" if any(o.split("=")[0] in ("--num_processes", "--num-processes") for o in options) \
        else f"num_processes in {config_path}"  # fmt: skip
    if args.cpu:
        raise LaunchError(
            f"--cpu --num_processes {n} runs ONE process (accelerate's --cpu is its single-process launcher); "
            "use --config_file launch_configs/cpu_ddp.yaml (or --multi_gpu with ACCELERATE_USE_CPU=1)"
        )
    where = f"launch config {config_path} has distributed_type NO" if config_path else "no launch config or --multi_gpu"
    raise LaunchError(
        f"{where} but {given} asks for {n} processes: accelerate would run ONE; use --config_file "
        "launch_configs/cpu_ddp.yaml on CPU, launch_configs/multi_gpu.yaml (or --multi_gpu) on GPUs, "
        "or --num_processes 1"
    )


# ------------------------------------------------------------------ running


@contextlib.contextmanager
def agent_env(status: Path) -> Iterator[None]:
    """torch elastic's options from env (its parser reads PET_*): forward every signal distrain handles,
    and give the workers time to save before the agent SIGKILLs them; a user's own settings stay.
    Also where rank 0 reports its exit code. The environment is put back afterwards (in-process callers)."""
    saved = {k: os.environ.get(k) for k in ("PET_SIGNALS_TO_HANDLE", "PET_SHUTDOWN_TIMEOUT", "DISTRAIN_LAUNCH_STATUS")}
    asked = [s.strip() for s in os.environ.get("PET_SIGNALS_TO_HANDLE", "").split(",") if s.strip()]
    os.environ["PET_SIGNALS_TO_HANDLE"] = ",".join(dict.fromkeys([*asked, *FORWARDED]))
    if not (os.environ.get("PET_SHUTDOWN_TIMEOUT") or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")):
        os.environ["PET_SHUTDOWN_TIMEOUT"] = str(SHUTDOWN_TIMEOUT_S)
    os.environ["DISTRAIN_LAUNCH_STATUS"] = str(status)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_status(path: Path) -> int | None:
    """Rank 0's final exit code, or None where it wrote none (it died, or never started)."""
    try:
        code = json.loads(path.read_text(encoding="utf-8")).get("exit_code")
    except (OSError, ValueError, AttributeError):
        return None
    return code if isinstance(code, int) else None


def as_exit_code(code: int) -> int:
    """A subprocess's negative return code (killed by signal N) as the shell shows it: 128+N."""
    return 128 - code if code < 0 else code


def root_cause(failures: dict[int, Any]) -> tuple[int, Any, bool]:
    """(rank, ProcessFailure, killed by a signal) of the rank that failed first, whatever its peers did next.

    A rank killed by a signal comes first (rank 0 then raises a lost gloo connection, exit 1), then
    one that exited non-zero; one killed by SIGTERM comes last: that is the agent stopping the
    survivors (distrain's own SIGTERM handler would have exited 143).
    """

    def order(item: tuple[int, Any]) -> tuple[int, int]:
        rank, f = item
        return (0 if f.exitcode < 0 and f.exitcode != -signal.SIGTERM else 1 if f.exitcode > 0 else 2), rank

    rank, failure = min(failures.items(), key=order)
    return rank, failure, order((rank, failure))[0] == 0


def signal_name(signum: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(signum).name
    return f"signal {signum}"


def run_distributed(options: list[str], recipe_args: list[str]) -> int:
    """accelerate's launcher in this process; distrain's exit code whatever the agent raises."""
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    status_dir = Path(tempfile.mkdtemp(prefix="distrain-launch-"))
    status = status_dir / "status.json"
    try:
        try:
            with agent_env(status):
                launch_command(parse_launch_args(options, recipe_args))
        except SignalException as e:
            code = read_status(status)
            if code is not None:
                return code
            print(f"error: the launcher got {signal_name(e.sigval)} and stopped the training processes "
                  "before rank 0 reported an exit code", file=sys.stderr)  # fmt: skip
            return 128 + int(e.sigval)
        except ChildFailedError as e:
            code = read_status(status)
            rank, failure, killed = root_cause(e.failures)
            if code and (code != 1 or not killed):
                return code  # rank 0's own code (a 0 with a failed peer is the peer's failure)
            code = as_exit_code(failure.exitcode)
            how = f"was killed by {signal_name(-failure.exitcode)}" if failure.exitcode < 0 else f"exited {code}"
            print(f"error: training process rank {rank} (pid {failure.pid}) {how}; see its log above",
                  file=sys.stderr)  # fmt: skip
            return code
        except subprocess.CalledProcessError as e:  # deepspeed's multi-node launcher
            code = read_status(status)
            return code if code is not None else as_exit_code(e.returncode)
        except (ValueError, RuntimeError, ImportError) as e:  # accelerate's own refusals
            raise ConfigError(f"accelerate launch: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        code = read_status(status)
        return 0 if code is None else code
    finally:
        reap_workers()
        shutil.rmtree(status_dir, ignore_errors=True)


def reap_workers() -> None:
    """Wait for training processes the agent left running (a second signal cut its shutdown short),
    passing further signals on, so that none outlives this command; SIGKILL after the timeout."""
    import psutil

    workers = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if str(RUN_PY) in child.cmdline():
                workers.append(child)
    if not workers:
        return

    def forward(signum: int, frame: object) -> None:
        for p in workers:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signum)

    previous = {name: signal.signal(getattr(signal, name), forward) for name in FORWARDED}
    timeout = int(os.environ.get("PET_SHUTDOWN_TIMEOUT") or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)
    try:
        _, alive = psutil.wait_procs(workers, timeout=timeout)
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def exec_single(args: argparse.Namespace) -> typing.NoReturn:
    """Become the one training process, with the environment accelerate's simple launcher would give it."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    try:
        cmd, env = prepare_simple_launcher_cmd_env(args)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"accelerate launch: {str(e).splitlines()[0]}") from None
    env["DISTRAIN_WORLD_SIZE"] = "1"  # checked above: one process, whatever MASTER_PORT the shell holds
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def launch(argv: list[str]) -> int:
    options, recipe_args = split_argv(argv)
    if any(o in ("-h", "--help") for o in options):
        print(USAGE)
        print("accelerate launch options: see `accelerate launch --help`; exit codes: distrain's (README: Launching)")
        return 0
    if not recipe_args:
        raise ConfigError(f"no recipe given; {USAGE[7:]}")
    args = parse_launch_args(options, recipe_args)
    config_path = config_file_of(args)
    config = read_launch_config(config_path) if config_path is not None else None
    args = validated(args)
    simple = uses_simple_launcher(args, config)
    if simple:
        check_mismatch(options, args, config_path)
    from distrain.recipe import resolve_config

    resolve_config(recipe_args)  # bad keys and values: one line now, not once per process
    if simple:
        exec_single(args)
    return run_distributed(options, recipe_args)


@command
def main(argv: list[str]) -> int:
    return launch(argv)
