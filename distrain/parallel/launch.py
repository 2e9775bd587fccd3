"""From the launcher's environment to a running process group, checked: the world size asked for,
the precision, FSDP claimed from accelerate, the Accelerator, torch's global switches, teardown.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

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



CLAIMED_FSDP = "DISTRAIN_USE_FSDP"  # the launch config's FSDP request, once hidden from accelerate


@dataclass(frozen=True)
class ParallelPlan:
    """The backend and its options, resolved once from `parallel.*` and the launch environment.

    `backend` uses parallel.backend's names (single, ddp, fsdp2, zero0-3); `source` says what chose
    it. The defaults are one plain process.
    """

    backend: str = "single"
    source: str = "default"
    world_size: int | None = None  # what the launcher was asked for; None: no launcher (one process)
    notes: tuple[str, ...] = ()  # decisions worth a plan line
    # FSDP2
    reshard_after_forward: bool = True
    replicate: int = 1  # HSDP replicas; 1: plain FSDP
    cpu_offload: bool = False
    shard_blocks: tuple[str, ...] = ()  # the launch config's fsdp_transformer_layer_cls_to_wrap; (): SHARD_BLOCKS
    activation_checkpointing: bool = False  # the launch config's fsdp_activation_checkpointing
    meta_init: bool = False  # build on meta, materialise each rank's shards (distrain.parallel.meta_init)
    # DeepSpeed
    zero_stage: int | None = None  # None: not DeepSpeed
    offload_optimizer: str = "none"
    offload_params: str = "none"
    deepspeed_config: str | None = None

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    def rows(self) -> list[tuple[str, str]]:
        """The plan lines printed at start: what chose the backend, and why it differs from what was asked."""
        return [("parallel", f"{self.backend} (from {self.source})"), *(("parallel note", n) for n in self.notes)]


def _truthy(value: str | None) -> bool:
    return (value or "").lower() == "true"


def launch_backend() -> tuple[str, str] | None:
    """(backend, what the launch config said) where `accelerate launch` exported an FSDP or DeepSpeed request;
    None where the launcher only starts processes (torchrun, a multi_gpu/cpu_ddp config, no launcher)."""
    env = os.environ
    if _truthy(env.get("ACCELERATE_USE_FSDP")) or _truthy(env.get(CLAIMED_FSDP)):
        if env.get("FSDP_VERSION", "2") != "2":
            raise ConfigError(
                f"launch config fsdp_version={env['FSDP_VERSION']}; distrain runs FSDP2 only: set fsdp_version: 2"
            )
        return "fsdp2", "distributed_type FSDP"
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None:  # a deepspeed_config_file carries the stage; accelerate's default is 2
            stage = _json_zero(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")).get("stage", 2)
        return f"zero{int(stage)}", f"distributed_type DEEPSPEED with zero_stage {int(stage)}"
    return None


def _json_zero(path: str | None) -> dict[str, Any]:
    """The zero_optimization block of a DeepSpeed JSON, without its "auto" values ({} without a file)."""
    if not path or path == "none":
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            block = json.load(f).get("zero_optimization", {})
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"DeepSpeed config {path} cannot be read as JSON: {e}") from None
    if not isinstance(block, dict):
        return {}
    out = {k: v for k, v in block.items() if v != "auto"}
    for key in ("offload_optimizer", "offload_param"):
        device = block.get(key, {}).get("device") if isinstance(block.get(key), dict) else None
        out.pop(key, None)
        if device not in (None, "auto"):
            out[key] = str(device).lower()
    return out


def _pick(key: str, asked: Any, default: Any, *sides: tuple[str, Any]) -> Any:
    """parallel.<key> if set, else the first launch side's value (sides: (what says it, value)), else the
    default; two set values that differ are an error naming both."""
    known = [(name, v) for name, v in ((f"parallel.{key}", asked), *sides) if v is not None]
    for name, value in known[1:]:
        if value != known[0][1]:
            first, chosen = known[0]
            leave = f" or leave parallel.{key} unset" if first.startswith("parallel.") else ""
            raise LaunchError(f"{name}={_show(value)} but {first}={_show(chosen)}: make them agree{leave}")
    return known[0][1] if known else default


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _env_bool(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.lower() not in ("false", "0", "no", "shard_grad_op", "2")


def resolve_plan(cfg: Config) -> ParallelPlan:
    """The backend and its options from `cfg.parallel` and the launch environment, read once.

    A launch config asking for FSDP or DeepSpeed that contradicts parallel.backend (or a set option)
    is a LaunchError naming both; parallel.backend=auto takes the launch config's request. The resolved
    backend and options are written back into cfg.parallel, so the run's config.yaml reproduces them.
    """
    par = cfg.parallel
    world = requested_world_size()
    processes = world or 1
    launched = launch_backend()
    notes: list[str] = []
    if launched is not None:
        backend, said = launched
        if par.backend not in ("auto", backend):
            raise LaunchError(
                f"the launch config asks for {said} ({backend}) but parallel.backend={par.backend}: "
                f"use parallel.backend={backend} (or auto) or a launch config without {said.split(' with')[0]}"
            )
        source = "the launch config"
    elif par.backend == "auto":
        backend, source = ("ddp" if processes > 1 else "single"), "auto: the number of processes"
    else:
        backend, source = par.backend, "parallel.backend"
    if backend == "single" and processes > 1:
        raise LaunchError(
            f"parallel.backend=single but the launcher started {processes} processes: "
            "use parallel.backend=auto (or ddp, fsdp2, zero1-3), or start one process"
        )
    if backend == "ddp" and processes == 1:  # nothing to all-reduce: DDP of one process is the plain loop
        backend = "single"
        notes.append("parallel.backend=ddp with one process runs as single")
    fields: dict[str, Any] = {}
    if backend == "fsdp2":
        fields = _fsdp_fields(par, processes)
    elif backend.startswith("zero"):
        fields = _zero_fields(par, int(backend[4:]))
    plan = ParallelPlan(backend=backend, source=source, world_size=world, notes=tuple(notes), **fields)
    _record(cfg, plan)
    return plan


def _fsdp_fields(par: Any, processes: int) -> dict[str, Any]:
    env = os.environ
    reshard = _pick("fsdp_reshard_after_forward", par.fsdp_reshard_after_forward, True,
                    ("the launch config has fsdp_reshard_after_forward", _env_bool("FSDP_RESHARD_AFTER_FORWARD")))
    launch_replicate = env.get("PARALLELISM_CONFIG_DP_REPLICATE_SIZE")
    launched = int(launch_replicate) if launch_replicate else None
    if launched in (None, 1) and env.get("FSDP_SHARDING_STRATEGY", "").upper() in ("HYBRID_SHARD", "4"):
        launched = max(1, processes // int(env.get("LOCAL_WORLD_SIZE", processes)))  # HSDP: one replica per node
    replicate = _pick("fsdp_replicate", par.fsdp_replicate, None,
                      ("the launch config has parallelism_config_dp_replicate_size", launched))
    if replicate is None:
        replicate = processes // par.fsdp_shard if par.fsdp_shard else 1
    if processes % replicate:
        raise ConfigError(f"HSDP replicas {replicate} (parallel.fsdp_replicate or the launch config's "
                          f"parallelism_config_dp_replicate_size) do not divide the {processes} processes")  # fmt: skip
    if par.fsdp_shard is not None and replicate * par.fsdp_shard != processes:
        raise ConfigError(f"parallel.fsdp_shard={par.fsdp_shard} x {replicate} replicas != the {processes} processes")
    offload = _pick("fsdp_cpu_offload", par.fsdp_cpu_offload, False,
                    ("the launch config has fsdp_offload_params", _env_bool("FSDP_OFFLOAD_PARAMS")))
    # accelerate's RAM-efficient loading (only rank 0 reads the weights) is what meta construction does, better
    loading = _env_bool("FSDP_CPU_RAM_EFFICIENT_LOADING")
    meta_init = _pick("fsdp_meta_init", par.fsdp_meta_init, True,
                      ("the launch config has fsdp_cpu_ram_efficient_loading", loading))
    state_dict_type = env.get("FSDP_STATE_DICT_TYPE")
    if state_dict_type is not None and state_dict_type.upper() != "SHARDED_STATE_DICT":
        raise ConfigError(
            f"launch config fsdp_state_dict_type={state_dict_type}; distrain writes sharded checkpoints "
            "(torch.distributed.checkpoint, reshardable) and a consolidated model.safetensors at the end: "
            "set fsdp_state_dict_type: SHARDED_STATE_DICT or leave it out"
        )
    names = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return {
        "meta_init": meta_init,
        "reshard_after_forward": reshard,
        "replicate": replicate,
        "cpu_offload": offload,
        "shard_blocks": tuple(n.strip() for n in names.split(",") if n.strip()),
        "activation_checkpointing": _truthy(env.get("FSDP_ACTIVATION_CHECKPOINTING")),
    }


def _zero_fields(par: Any, stage: int) -> dict[str, Any]:
    env = os.environ
    launched_json = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    launched_json = None if launched_json in (None, "", "none") else launched_json
    path = _pick("deepspeed_config", par.deepspeed_config, None,
                 ("the launch config has deepspeed_config_file", launched_json))
    block = _json_zero(path)
    where = f"DeepSpeed config {path}"
    if "stage" in block and int(block["stage"]) != stage:
        raise LaunchError(f"{where} has zero_optimization.stage={block['stage']} but the backend is zero{stage}: "
                          "make them agree")  # fmt: skip

    def device(key: str, launch_key: str, json_key: str) -> str:
        launched = env.get("ACCELERATE_DEEPSPEED_" + launch_key.upper())
        asked = getattr(par, key)
        return _pick(key, None if asked == "auto" else asked, "none",
                     (f"the launch config has {launch_key}", launched.lower() if launched else None),
                     (f"{where} has zero_optimization.{json_key}.device", block.get(json_key)))

    return {
        "zero_stage": stage,
        "offload_optimizer": device("zero_offload_optimizer", "offload_optimizer_device", "offload_optimizer"),
        "offload_params": device("zero_offload_params", "offload_param_device", "offload_param"),
        "deepspeed_config": path,
    }


def _record(cfg: Config, plan: ParallelPlan) -> None:
    """Write the resolved backend and its options into cfg.parallel: config.yaml then reproduces the run."""
    par = cfg.parallel
    par.backend = plan.backend
    if plan.backend == "fsdp2":
        par.fsdp_reshard_after_forward, par.fsdp_cpu_offload = plan.reshard_after_forward, plan.cpu_offload
        par.fsdp_replicate, par.fsdp_meta_init = plan.replicate, plan.meta_init
    elif plan.deepspeed:
        par.zero_offload_optimizer, par.zero_offload_params = plan.offload_optimizer, plan.offload_params
        par.deepspeed_config = plan.deepspeed_config


def _claim_fsdp_request() -> None:
    """distrain applies FSDP2 itself, on CPU and GPU alike: accelerate would silently use DDP on CPU,
    and on GPU its prepare would wrap the model a second time. So accelerate must not see the request;
    it stays in CLAIMED_FSDP for the next run in this process (a sweep's trials)."""
    if _truthy(os.environ.pop("ACCELERATE_USE_FSDP", None)):
        os.environ[CLAIMED_FSDP] = "true"
        os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", None)  # HSDP sizes are in the plan


def _deepspeed_plugin(plan: ParallelPlan) -> Any:
    """accelerate's DeepSpeedPlugin from the plan, the same under accelerate launch, torchrun and python."""
    from accelerate.utils import DeepSpeedPlugin

    # Fields left out (zero3_init_flag, nvme paths, ...) are read by the plugin from accelerate's exports.
    return DeepSpeedPlugin(
        hf_ds_config=plan.deepspeed_config or "none",
        zero_stage=plan.zero_stage,
        offload_optimizer_device=plan.offload_optimizer,
        offload_param_device=plan.offload_params,
        # without a launch config, as every shipped one sets it: no zero.Init for models built by the recipe
        zero3_init_flag=None if "ACCELERATE_DEEPSPEED_ZERO3_INIT" in os.environ else False,
    )


def build_accelerator(cfg: Config, plan: ParallelPlan | None = None) -> Accelerator:
    """One Accelerator per run, set up for `plan` (resolved from cfg here when not given).
    On a machine without CUDA, multi-process runs use gloo on CPU."""
    plan = plan if plan is not None else resolve_plan(cfg)
    _check_precision(cfg)
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        # accelerate turns fp16 autocast off on CPU without a word; refuse instead of training in fp32.
        raise ConfigError("precision=fp16 needs a CUDA GPU (accelerate has no CPU fp16); use precision=bf16 or no")
    world = plan.world_size
    # Accelerator(cpu=True) drops a DeepSpeed request: DeepSpeed on CPU runs with cpu=False and gloo.
    cpu = not torch.cuda.is_available() and not plan.deepspeed
    handlers: list[Any] = []
    if not torch.cuda.is_available() and ((world and world > 1) or plan.deepspeed):
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if plan.backend == "ddp":  # gradients as views of DDP's all-reduce buckets: one copy of them, not two
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=True))
    if plan.deepspeed and not world:
        single_process_rendezvous()  # DeepSpeed wants a process group even for one process
    _claim_fsdp_request()
    atexit.register(_close_process_group)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.precision,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
        deepspeed_plugin=_deepspeed_plugin(plan) if plan.deepspeed else None,
    )
    if world is not None and accelerator.num_processes != world:
        raise LaunchError(
            f"the launcher asked for {world} processes but accelerate sees {accelerator.num_processes}; "
            "on CPU use launch_configs/cpu_ddp.yaml or ACCELERATE_USE_CPU=1 with --multi_gpu"
        )
    return accelerator



def single_process_rendezvous() -> None:
    """The variables a launcher sets, for a process group of one started without a launcher."""
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
