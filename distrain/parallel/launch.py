"""From the launcher's environment to a running process group, checked: the world size asked for,
the precision, FSDP claimed from accelerate, the Accelerator, torch's global switches, teardown.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from distrain.config import Config
from distrain.errors import ConfigError, LaunchError


def requested_world_size() -> int | None:
    """World size the launcher was asked for, read from the variables each launcher sets.

    Raises LaunchError where the variables show a launch that cannot give that world: WORLD_SIZE>1
    without the rendezvous a launcher sets, or accelerate's simple launcher asked for N>1 processes.
    """
    for var in ("DISTRAIN_WORLD_SIZE", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var):
            world = int(os.environ[var])
            if var == "WORLD_SIZE" and world > 1:
                _check_rendezvous(world)
            return world
    _check_simple_launcher()
    return None



def _check_rendezvous(world: int) -> None:
    """torchrun, accelerate launch and distrain launch set all of these with WORLD_SIZE; a WORLD_SIZE
    left in the shell alone would make torch wait for ranks that were never started."""
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise LaunchError(
            f"WORLD_SIZE={world} is set but no launcher started this process ({', '.join(missing)} unset): "
            "start it with accelerate launch/torchrun/distrain launch, or unset WORLD_SIZE"
        )



def _check_simple_launcher() -> None:
    """accelerate's simple launcher (distributed_type NO, or --cpu without --multi_gpu) starts ONE process
    even when asked for more; it then still sets MASTER_PORT (for mpirun, which it runs only with
    --mpirun_hostfile, and which sets OMPI/PMI sizes) and its own ACCELERATE_DYNAMO_BACKEND."""
    if not (os.environ.get("MASTER_PORT") and os.environ.get("ACCELERATE_DYNAMO_BACKEND")):
        return
    asked = _launcher_num_processes()
    if asked is not None and asked <= 1:
        return  # MASTER_PORT came from the user's shell, not from a launcher asked for N
    n = f"{asked} processes" if asked else "more than one process"
    how = "--cpu --num_processes N" if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" else (
        "a launch config with distributed_type NO")  # fmt: skip
    raise LaunchError(
        f"accelerate launch was asked for {n} but {how} runs ONE process; use --config_file "
        "launch_configs/cpu_ddp.yaml on CPU, launch_configs/multi_gpu.yaml (or --multi_gpu) on GPUs"
    )



def _launcher_num_processes() -> int | None:
    """The process count the parent `accelerate launch` was asked for (--num_processes, else its config
    file's num_processes); None where that cannot be read. Best effort, from /proc."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not any("accelerate" in os.path.basename(a) for a in argv[:3]):
        return None
    values: dict[str, str] = {}
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        name = name.replace("-", "_").lstrip("_")
        if name in ("num_processes", "config_file"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            values.setdefault(name, value)
    if values.get("num_processes", "").isdigit():
        return int(values["num_processes"])
    if "config_file" not in values:
        return None
    import yaml

    try:
        with open(values["config_file"], encoding="utf-8") as f:
            n = yaml.safe_load(f).get("num_processes")
    except (OSError, AttributeError, ValueError, yaml.YAMLError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) else None



def _check_precision(cfg: Config) -> None:
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", cfg.precision):
        raise ConfigError(
            f"precision={cfg.precision} but the launch config asks mixed_precision={launcher}; "
            f"set precision={launcher} or mixed_precision: 'no' in the launch config (distrain's precision decides)"
        )



def fsdp_requested() -> bool:
    """The launch config asked for FSDP (`accelerate launch` exports ACCELERATE_USE_FSDP from the YAML)."""
    return "true" in (os.environ.get("ACCELERATE_USE_FSDP", "").lower(), os.environ.get("DISTRAIN_USE_FSDP", ""))



def _claim_fsdp_request() -> None:
    """distrain applies FSDP2 itself, on CPU and GPU alike: accelerate would silently use DDP on CPU,
    and on GPU its prepare would wrap the model a second time. So accelerate must not see the request."""
    if os.environ.pop("ACCELERATE_USE_FSDP", "").lower() == "true":
        os.environ["DISTRAIN_USE_FSDP"] = "true"
        os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", None)  # HSDP sizes are read by FSDPBackend



def build_accelerator(cfg: Config) -> Accelerator:
    """One Accelerator per run. On a machine without CUDA, multi-process runs use gloo on CPU."""
    _check_precision(cfg)
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        # accelerate turns fp16 autocast off on CPU without a word; refuse instead of training in fp32.
        raise ConfigError("precision=fp16 needs a CUDA GPU (accelerate has no CPU fp16); use precision=bf16 or no")
    world = requested_world_size()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    # Accelerator(cpu=True) drops a DeepSpeed request: DeepSpeed on CPU runs with cpu=False and gloo.
    cpu = not torch.cuda.is_available() and not deepspeed
    handlers: list[Any] = []
    if not torch.cuda.is_available() and world and world > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    _claim_fsdp_request()
    atexit.register(_close_process_group)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.precision,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if world is not None and accelerator.num_processes != world:
        raise LaunchError(
            f"the launcher asked for {world} processes but accelerate sees {accelerator.num_processes}; "
            "on CPU use launch_configs/cpu_ddp.yaml or ACCELERATE_USE_CPU=1 with --multi_gpu"
        )
    return accelerator



def _close_process_group() -> None:
    """Destroy the process group at exit, as torch asks, rather than leave it to C++ destructors."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()



def exit_alone(code: int) -> None:
    """Leave a multi-process run without the barrier, which a rank that did not fail might never reach."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _exit_now(code)


def leave_process_group(code: int) -> int:
    """End a multi-process run together and exit without C++ teardown.

    With gloo, a rank whose interpreter tears the process group down while a peer is still
    finishing aborts now and then ("terminate called without an active exception").
    Everything is written and closed at this point, so after a barrier the ranks leave with
    os._exit, which skips those destructors. One process returns the code.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return code
    dist.barrier()
    _exit_now(code)
    return code  # not reached


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def configure_torch(cfg: Config) -> None:
    """Global torch switches: fast matmuls on CUDA, or full determinism when asked."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
