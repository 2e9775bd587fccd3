"""Will the training state fit? The per-process estimate for the chosen backend, before the optimizer exists.

The training state of P parameters in fp32 with Adam is 16 bytes per parameter (weights 4,
gradients 4, two moments 8); each backend keeps a share of it on every process: all of it under
one process and DDP, 1/N under FSDP2 and ZeRO-3, and under ZeRO-1/2 the replicated weights (and
gradients for ZeRO-1) plus 1/N of the rest, where DeepSpeed also keeps an fp32 master copy of its
partition, even in fp32. `check_fits` compares that share with the memory this process may still
use (the RLIMIT_DATA / RLIMIT_AS soft limit, the cgroup's memory limit shared by the node's
processes, or the free memory of the CUDA device) plus what the parameters already hold, and stops
the run on every rank at once, before anything is written, when it cannot fit: a run that would
otherwise be killed, or fail at its first optimizer step, after minutes of start-up. The estimate is
a floor (activations, buffers and the backend's gathers come on top), so it refuses only runs that
cannot work. `out_of_memory` turns a real out-of-memory error during the run into one line that
names the same estimate.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distrain.errors import MemoryBudgetError, OutOfMemory

GIB = 2**30
SHARDED = ("fsdp2", "zero3")  # the backends that split the weights themselves


@dataclass(frozen=True)
class StateEstimate:
    """The training state one process of `backend` keeps for `params` parameters."""

    backend: str
    world_size: int
    params: int
    per_process: int  # bytes
    parts: str  # how it adds up, for messages

    @property
    def per_param(self) -> float:
        return self.per_process / max(self.params, 1)


@dataclass(frozen=True)
class Budget:
    """The memory this process may still use for the training state, and which limit says so."""

    available: int  # bytes, the parameters this process already holds included
    source: str


_last: StateEstimate | None = None  # this process's estimate, for out_of_memory's message


# glibc's mallopt parameter, and the fixed threshold distrain sets: blocks from 1 MiB up are mapped on their own.
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 2**20


def return_freed_memory() -> bool:
    """Have glibc's malloc map every block of MMAP_THRESHOLD or more on its own, so a freed
    tensor's memory goes back to the system at once. By default the threshold rises with each
    large block freed (up to 32 MiB), after which tensors of a few MiB (a shard of a layer's
    weight, an optimizer's temporaries) come from the heap, whose freed pages stay in the
    resident set (a few hundred MiB per rank for the 103M Llama of docs/performance.md §6).
    Smaller blocks are unaffected. False (nothing changed) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.gnu_get_libc_version and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


# Parameters from which freed memory is returned at once: below it the mmap calls cost more time
# (docs/performance.md §6) than the resident memory they save is worth.
LARGE_MODEL = 2**24


def keep_resident_set_small(model: torch.nn.Module) -> bool:
    """For a model of LARGE_MODEL parameters or more (counted across its shards' local parts):
    return_freed_memory and trim what the heap already holds free. True if applied."""
    if sum(p.numel() for p in model.parameters()) < LARGE_MODEL:
        return False
    applied = return_freed_memory()
    trim_heap()
    return applied


def trim_heap() -> None:
    """Give the pages the C heap holds free back to the system (glibc's malloc_trim; elsewhere
    nothing): blocks freed before return_freed_memory fixed the threshold, or below it."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return


def moment_bytes(optim: Any) -> int:
    """Optimizer state bytes per trainable fp32 parameter: two moments for Adam(W), one buffer for SGD momentum."""
    if optim.name in ("adam", "adamw"):
        return 8
    return 4 if getattr(optim, "momentum", 0) else 0


def estimate(params: int, trainable: int, plan: Any, world_size: int, optim: Any, precision: str) -> StateEstimate:
    """The training state per process for `plan.backend` (parallel.backend's names) at `world_size` processes."""
    n = max(world_size, 1)
    m = moment_bytes(optim)
    backend = plan.backend
    # DeepSpeed holds weights and gradients in the training precision beside an fp32 master partition;
    # DDP and FSDP2 keep fp32 weights (autocast, or FSDP2's fp32 shards cast per block) and fp32 gradients.
    low = plan.deepspeed and precision in ("bf16", "fp16")
    w = g = 2 if low else 4
    if backend == "fsdp2":
        shards = max(n // max(plan.replicate, 1), 1)
        total = math.ceil(params / shards) * w + math.ceil(trainable / shards) * (g + m)
        parts = f"(weights {w} + grads {g} + {optim.name} state {m}) / {shards} shards"
    elif backend == "zero3":
        total = math.ceil(params / n) * w + math.ceil(trainable / n) * (g + m + (4 if low else 0))
        parts = f"(weights {w} + grads {g} + {optim.name} state {m}{' + fp32 master 4' if low else ''}) / {n}"
    elif backend == "zero2":
        total = params * w + math.ceil(trainable / n) * (g + 4 + m)
        parts = f"weights {w} + (grads {g} + fp32 master 4 + {optim.name} state {m}) / {n}"
    elif backend == "zero1":
        total = params * w + trainable * g + math.ceil(trainable / n) * (4 + m)
        parts = f"weights {w} + grads {g} + (fp32 master 4 + {optim.name} state {m}) / {n}"
    else:  # single, ddp, zero0: a full replica on every process
        total = params * w + trainable * (g + m + (4 if low else 0))
        master = " + fp32 master 4" if low else ""
        parts = f"weights {w} + grads {g} + {optim.name} state {m}{master}, a full replica per process"
    return StateEstimate(backend, n, params, total, parts)


def held_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes the model's parameters hold on `device` now (a shard under FSDP2 and ZeRO-3, nothing on meta)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)  # a ZeRO-3 partition: p itself is an empty placeholder
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p
        if local.is_meta or local.device.type != device.type:
            continue
        storage = local.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:  # tied weights share one storage
            seen.add(key)
            total += storage.nbytes()
    return total


def _status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmData", "VmSize"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_free() -> tuple[int, str] | None:
    """Bytes the cgroup's memory limit leaves free (page cache counted as free), and the limit's file."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_file, usage_file, cache_key = base / "memory.max", base / "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, usage_file, cache_key = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes", (
                "total_inactive_file")  # fmt: skip
        else:
            continue
        try:
            raw = limit_file.read_text().strip()
            if raw == "max" or int(raw) >= 2**62:  # v1 writes "no limit" as a huge number
                continue
            used = int(usage_file.read_text())
            stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines() if " " in line)
            used -= int(stat.get(cache_key, 0))
        except (OSError, ValueError):
            continue
        return max(int(raw) - used, 0), str(limit_file)
    return None


def budget(model: torch.nn.Module, device: torch.device) -> Budget | None:
    """The tightest of the limits that apply to this process, None when none does."""
    held = held_bytes(model, device)
    found: list[Budget] = []
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        found.append(Budget(free + held, f"free memory of {torch.cuda.get_device_name(device)}"))
    else:
        status = _status()
        for limit, name, usage in ((resource.RLIMIT_DATA, "RLIMIT_DATA", "VmData"),
                                   (resource.RLIMIT_AS, "RLIMIT_AS", "VmSize")):  # fmt: skip
            soft, _ = resource.getrlimit(limit)
            if soft != resource.RLIM_INFINITY and usage in status:
                found.append(Budget(soft - status[usage] + held, f"{name} soft limit {soft / GIB:.2f} GiB"))
        cgroup = _cgroup_free()
        if cgroup is not None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # the node's processes share the cgroup
            free, where = cgroup
            found.append(Budget(free // local + held, f"cgroup limit {where}, shared by {local} processes"))
    return min(found, key=lambda b: b.available) if found else None


def suggestion(est: StateEstimate, device: torch.device) -> str:
    """What would fit: a sharding backend, more processes, offload."""
    n = est.world_size
    on_cpu = device.type != "cuda"
    fsdp = "launch_configs/cpu_fsdp.yaml" if on_cpu else "launch_configs/fsdp.yaml"
    zero3 = "launch_configs/cpu_zero3.yaml" if on_cpu else "launch_configs/deepspeed_zero3.yaml"
    if est.backend not in SHARDED:
        share = est.params * 16 / max(n, 2)
        return (f"shard it with FSDP2 (--config_file {fsdp} or parallel.backend=fsdp2) or ZeRO-3 (--config_file "
                f"{zero3}), about {share / GIB:.2f} GiB per process at {max(n, 2)} processes")
    return ("use more processes (each keeps 1/N), ZeRO-3 offload (launch_configs/deepspeed_zero3_offload.yaml) "
            "or more memory")


def check_fits(model: torch.nn.Module, cfg: Any, plan: Any, world_size: int, device: torch.device) -> StateEstimate:
    """MemoryBudgetError, on every rank, when the backend's training state cannot fit this process's memory.

    Call it after the model is built and sharded, before the optimizer is: the parameters it already
    holds count toward the estimate. Offloaded runs keep state off the device and are not checked.
    """
    from distrain.parallel.base import count_params

    global _last
    params, trainable = count_params(model)
    est = estimate(params, trainable, plan, world_size, cfg.optim, cfg.precision)
    _last = est
    offloaded = plan.cpu_offload or plan.offload_optimizer != "none" or plan.offload_params != "none"
    room = None if offloaded else budget(model, device)
    need, have = float(est.per_process), float(room.available) if room is not None else math.inf
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # the tightest process decides for all, so every rank stops (or goes on) together
            both = torch.tensor([need, -have if math.isfinite(have) else -1e300], dtype=torch.float64, device=device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            need, have = float(both[0]), -float(both[1])
    if have < need:
        source = room.source if room is not None else "another process's limit"  # the ranks' limits are alike
        who = "the tightest process has" if world_size > 1 else "the process has"
        raise MemoryBudgetError(
            f"out of memory (estimated before training): {est.backend} keeps {need / GIB:.2f} GiB of training state "
            f"per process ({est.params:,} parameters x {est.per_param:.1f} B: {est.parts}) but {who} "
            f"{max(have, 0) / GIB:.2f} GiB for it ({source}); {suggestion(est, device)}"
        )
    return est


def is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, Python's MemoryError, or a CPU allocation torch reports as a RuntimeError."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def out_of_memory(e: BaseException, rank: int) -> OutOfMemory | None:
    """The one-line error for a real out-of-memory error `e`, naming the estimate; None for any other error."""
    if not is_out_of_memory(e):
        return None
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.split("DefaultCPUAllocator: ")[-1]  # drop the "[enforce fail at alloc_cpu.cpp:...]" prefix
    where = f"out of memory on rank {rank}: {text}"
    est = _last
    if est is None:
        return OutOfMemory(where)
    device = torch.device("cuda") if isinstance(e, torch.OutOfMemoryError) and torch.cuda.is_available() else (
        torch.device("cpu"))  # fmt: skip
    return OutOfMemory(
        f"{where}; {est.backend} keeps about {est.per_process / GIB:.2f} GiB of training state per process "
        f"({est.params:,} parameters x {est.per_param:.1f} B: {est.parts}) before activations; "
        f"{suggestion(est, device)}"
    )
