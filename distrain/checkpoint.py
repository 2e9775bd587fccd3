"""Sharded safetensors checkpoints: atomic save, checksums, retention, resume discovery, load.

Layout of `<run>/checkpoints/step_<N:08d>/` (and `best/`):

    shard-<rank>.safetensors   what this rank writes: its pieces of the model state (`model.*`:
                               DTensor shards under FSDP2; replicated tensors are split between
                               ranks so all ranks write), the same for the optimizer state
                               (`optim.*`, keyed by parameter name), and its RNG states (`rng.*`)
    index.json                 tensor -> global shape, dtype and pieces (file, offset, shape);
                               file -> xxh3-128 checksum and size; optimizer param groups
    trainer_state.json         step, epoch, samples consumed, scheduler, grad scaler, best metric,
                               early-stopping counters, world size, backend, config hash, versions
    config.yaml                the run's config (so `distrain export` needs only the checkpoint)
    COMPLETE                   written last; a folder without it is never loaded

Ranks write into `checkpoints/.tmp-<name>`, fsync, rank 0 renames it into place, writes
COMPLETE, then points `checkpoints/latest` at it; older checkpoints are deleted only after that.
Loading (distrain/checkpoint_load.py) copies each target tensor's region, read from the pieces
that overlap it, into the live tensor, so a checkpoint saved on any number of ranks, under DDP or
FSDP2, loads into any other layout without a second copy of the state in memory. No pickle: tensors are safetensors,
everything else JSON.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from distrain.config import ConfigError

log = logging.getLogger("distrain")

FORMAT = "distrain-checkpoint"
VERSION = 2  # 2: one shard file per rank (model, optimizer and RNG state together)
CKPT_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
INDEX = "index.json"
STATE = "trainer_state.json"
# Test hook: DISTRAIN_CRASH_AT=<stage>[:<step>] SIGKILLs rank 0 at that point of a save, so the
# fault-injection tests can check that an interrupted save never damages earlier checkpoints.
CRASH_ENV = "DISTRAIN_CRASH_AT"
CRASH_STAGES = ("before_shards", "between_shards", "before_complete", "before_latest")
# Keys that may change between a run and its continuation without making the resume suspicious.
VOLATILE_KEYS = ("resume", "output_dir", "print_config", "log", "ckpt", "train.max_steps", "train.max_epochs")


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model (exit code 2)."""


# ---------------------------------------------------------------- small helpers


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _crash_point(stage: str, rank: int, step: int) -> None:
    want = os.environ.get(CRASH_ENV, "")
    if not want or rank != 0:
        return
    name, _, at = want.partition(":")
    if name == stage and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def file_checksum(path: str | os.PathLike) -> str:
    """xxh3-128 of a file, hashed through a memory map (3x faster than reading it in chunks:
    0.04 s for 600 MB in the page cache here), so verifying at every load is cheap."""
    import mmap

    import xxhash

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return xxhash.xxh3_128(m).hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(folder: Path, texts: dict[str, str]) -> None:
    """Write and flush small files inside a folder that is itself renamed into place later."""
    for name, text in texts.items():
        with open(folder / name, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


_WRITER: ThreadPoolExecutor | None = None


def _fsync_files(paths: list[Path]) -> None:
    """fsync files concurrently: the file system commits them together (measured here: three
    small files in 0.7 ms, against 1.4 ms one after another)."""
    for f in [_in_thread(_fsync_file, p) for p in paths]:
        f.result()


def _in_thread(fn: Any, *args: Any) -> Future:
    """Run fn on a background writer thread (file writes release the GIL, and concurrent fsyncs
    share a journal commit), returning its future. The thread is kept: starting one per save
    costs about a millisecond on a busy machine."""
    global _WRITER
    if _WRITER is None:
        _WRITER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="distrain-ckpt")
    return _WRITER.submit(fn, *args)


def _point_latest(root: Path, name: str) -> None:
    """Atomically replace `latest` (temp file, rename). Not fsynced: it is a pointer for people and
    tools, resume=auto scans for COMPLETE folders instead, so after a power cut the worst case is
    that it still names the previous checkpoint."""
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_hash(cfg_dict: dict[str, Any]) -> str:
    """Hash of the settings that must not change across a resume (not max_steps, logging, paths)."""
    d = json.loads(json.dumps(cfg_dict, default=str))
    for key in VOLATILE_KEYS:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    import accelerate
    import safetensors

    from distrain import __version__

    return {"distrain": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "safetensors": safetensors.__version__}  # fmt: skip


# ---------------------------------------------------------------- RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states as tensors (+ metadata strings): torch CPU/CUDA, numpy, python."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)]),
            "python": json.dumps([version, gauss_next])}  # fmt: skip
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_next = json.loads(meta["python"])
    random.setstate((version, tuple(int(x) for x in tensors["python"].tolist()), gauss_next))


# ---------------------------------------------------------------- flattening


def flatten_optim(optim_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """DCP's optimizer state dict ({state: {fqn: {name: tensor}}, param_groups}) -> flat tensors + JSON."""
    tensors, scalars = {}, {}
    for fqn, entries in optim_sd.get("state", {}).items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{fqn}.{name}"] = value
            else:
                scalars[f"{fqn}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optim_sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optim(
    tensors: dict[str, torch.Tensor], extra: dict[str, Any], template: dict[str, Any]
) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *extra.get("scalars", {}).items()]:
        fqn, _, name = key.rpartition(".")
        state.setdefault(fqn, {})[name] = value
    groups = []
    for saved, current in zip(extra["param_groups"], template.get("param_groups", []), strict=False):
        # Hyper-parameters come from the checkpoint, keeping the current types (tuples stay tuples).
        groups.append({k: type(current[k])(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups or extra["param_groups"]}


# ---------------------------------------------------------------- live states


def live_states(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """A module's and its optimizer's state as the tensors they hold, keyed by parameter name.

    The layout of DCP's get_state_dict (plain tensors, or DTensor shards under FSDP2; optimizer
    state {"state": {name: {...}}, "param_groups": [...]}) without its per-call bookkeeping,
    which costs milliseconds and dominates small checkpoints. An optimizer that has not stepped
    yet gets its state first (a zero-lr step, as DCP does).
    """
    if not optimizer.state:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(optimizer)
    names = {id(p): n for n, p in module.named_parameters()}
    state = {names[id(p)]: dict(s) for p, s in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]  # fmt: skip
    return module.state_dict(), {"state": state, "param_groups": groups}


def set_live_states(module: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optim_state: dict[str, Any] | None) -> None:  # fmt: skip
    """Copy states laid out like live_states' into the module (and optimizer); no-op on themselves."""
    with torch.no_grad():
        live = dict(module.named_parameters())
        live.update(module.named_buffers())
        if set(model_state) - set(live):  # extra state a module saves itself: state_dict has it all
            live = module.state_dict()
        for key, t in live.items():
            if key in model_state:
                _copy_local(t, model_state[key])
        if optim_state is None:
            return
        params = dict(module.named_parameters())
        for name, entries in optim_state["state"].items():
            live_state = optimizer.state[params[name]]
            for key, value in entries.items():
                if torch.is_tensor(value) and torch.is_tensor(live_state.get(key)):
                    _copy_local(live_state[key], value)
                else:
                    live_state[key] = value
    for group, saved in zip(optimizer.param_groups, optim_state["param_groups"], strict=False):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _copy_local(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src for tensors of the same layout (DTensors: their local shards)."""
    dst = local_tensor(dst) if isinstance(dst, dtensor_type()) else dst
    src = local_tensor(src) if isinstance(src, dtensor_type()) else src
    if dst.data_ptr() != src.data_ptr() or dst.shape != src.shape:
        dst.copy_(src)


# ---------------------------------------------------------------- pieces


@functools.cache
def dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


@functools.lru_cache(maxsize=65536)
def shard_region(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> tuple[list[int], list[int]]:
    """(global offset, local shape) of this rank's shard; cached, as a model has few distinct
    (shape, placement) pairs and torch computes it in Python (tens of microseconds a tensor)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return list(offset), list(local_shape)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard without DTensor.to_local's autograd bookkeeping (no graph is
    wanted when checkpointing; the attribute is what to_local returns)."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t.to_local()


def _local_piece(t: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
    """The part of a (possibly DTensor) tensor this rank writes and its global offset, or None."""
    if isinstance(t, dtensor_type()):
        from torch.distributed.tensor import Replicate

        coord = t.device_mesh.get_coordinate()
        if coord is None:
            return None
        # Replicas of a shard are written once: by the rank at coordinate 0 of replicated mesh dims.
        if any(isinstance(p, Replicate) and coord[i] != 0 for i, p in enumerate(t.placements)):
            return None
        offset, shape = shard_region(tuple(t.shape), t.device_mesh, tuple(t.placements))
        local = local_tensor(t)
        local = local[tuple(slice(0, s) for s in shape)] if list(local.shape) != shape else local
        if local.numel() == 0:
            return None
        return local, offset
    return t, [0] * t.ndim


def _pieces_for_rank(
    tensors: dict[str, torch.Tensor], rank: int, world: int, seen: set[int]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Split a state into what this rank writes: its DTensor shards, and every world-th replicated tensor."""
    plain = sorted(k for k, v in tensors.items() if not isinstance(v, dtensor_type()))
    owner = {k: i % world for i, k in enumerate(plain)}
    out, meta = {}, {}
    for key, t in tensors.items():
        meta[key] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "piece": None}
        piece = None if key in owner and owner[key] != rank else _local_piece(t)
        if piece is None:
            continue
        local, offset = piece
        if local.device.type != "cpu":
            local = local.to("cpu")
        ptr = local.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing storage (tied weights, views of one buffer)
        if ptr in seen or not local.is_contiguous():
            local = local.clone().contiguous()
        seen.add(ptr)
        out[key] = local
        meta[key]["piece"] = {"offset": offset, "shape": list(local.shape)}
    return out, meta


# ---------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | os.PathLike,
    name: str,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config_text: str,
    rank: int = 0,
    world: int = 1,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `name` (step_<N> or best) under <run_dir>/checkpoints; every rank calls it.

    Returns the final folder, which is COMPLETE on rank 0's return (other ranks return once their
    shard is flushed; anything that reads a checkpoint goes through rank 0 first). Retention
    (keep_last) applies to step_* folders only, and runs after the new checkpoint is in place
    and `latest` points at it. One collective: a barrier once every shard is flushed.
    """
    root = Path(run_dir) / CKPT_DIR
    final = root / name
    tmp = root / f".tmp-{name}"
    step = int(trainer_state.get("step", 0))
    tmp.mkdir(parents=True, exist_ok=True)  # may hold files of a crashed save: see _finish_folder
    if rank == 0:
        _clear_stale(root, keep=tmp)
    _crash_point("before_shards", rank, step)

    side = None
    if rank == 0:  # the rank-independent files are written and flushed while the shard is
        texts = {STATE: json.dumps(trainer_state, indent=1, default=_json_default), "config.yaml": config_text}
        side = _in_thread(_write_files, tmp, texts)
    optim_tensors, optim_extra = flatten_optim(optim_state)
    seen: set[int] = set()  # storages already in the file (safetensors refuses shared storage)
    local_model, meta_model = _pieces_for_rank(model_state, rank, world, seen)
    local_optim, meta_optim = _pieces_for_rank(optim_tensors, rank, world, seen)
    rng_tensors, rng_meta = rng_state()
    shard = tmp / shard_name(rank)
    tensors = {f"model.{k}": v for k, v in local_model.items()} | {f"optim.{k}": v for k, v in local_optim.items()}
    tensors |= {f"rng.{k}": v for k, v in rng_tensors.items()}
    save_file(tensors, str(shard), metadata={"format": FORMAT, **{f"rng.{k}": v for k, v in rng_meta.items()}})
    _fsync_file(shard)
    # What rank 0 needs for the index, handed over as a file next to the shard: a barrier is one
    # cheap collective, where gathering Python objects takes two plus pickling.
    part = {"file": shard.name, "xxh3_128": file_checksum(shard), "bytes": shard.stat().st_size,
            "tensors": {f"{kind}.{k}": m for kind, meta in (("model", meta_model), ("optim", meta_optim))
                        for k, m in meta.items()}}  # fmt: skip
    part_text = json.dumps(part)
    if rank != 0:
        (tmp / f"{shard.name}.json").write_text(part_text)  # read once the barrier is passed
    _crash_point("between_shards", rank, step)
    if _is_dist():
        dist.barrier()
    if rank != 0:
        return final

    assert side is not None
    parts = [part, *(read_json(tmp / f"{shard_name(r)}.json") for r in range(1, world))]
    index_tensors: dict[str, Any] = {}
    for p in parts:
        for k, m in p["tensors"].items():
            entry = index_tensors.setdefault(k, {"shape": m["shape"], "dtype": m["dtype"], "pieces": []})
            if m["piece"] is not None:
                entry["pieces"].append({"file": p["file"], **m["piece"]})
    files = {p["file"]: {"xxh3_128": p["xxh3_128"], "bytes": p["bytes"]} for p in parts}
    index = {"format": FORMAT, "version": VERSION, "world_size": world, "files": files,
             "tensors": index_tensors, "optim": optim_extra}  # fmt: skip
    (tmp / INDEX).write_text(json.dumps(index))
    _crash_point("before_complete", rank, step)
    (tmp / COMPLETE).write_text(json.dumps({"step": step}) + "\n")  # the last file written
    _fsync_files([tmp / INDEX, tmp / COMPLETE])
    side.result()
    _finish_folder(root, tmp, final, keep={INDEX, STATE, "config.yaml", COMPLETE, *files})
    _crash_point("before_latest", rank, step)
    if name.startswith("step_"):
        _point_latest(root, name)
        if keep_last:
            apply_retention(root, keep_last)
    return final


def _clear_stale(root: Path, keep: Path) -> None:
    """Remove the temp folders of crashed saves (rank 0, at the start of a save).

    Only at the start: other ranks may already be writing the next save's temp folder while rank
    0 finishes this one, but never one other than `keep` at this point. An older folder moved
    aside to be replaced (best/) that a crash left as the only copy is put back, so a finished
    checkpoint is never lost.
    """
    for stale in root.glob(".tmp-*"):
        if stale == keep:
            continue
        original = root / stale.name.removeprefix(".tmp-old-")
        if stale.name.startswith(".tmp-old-") and not original.exists():
            os.replace(stale, original)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _finish_folder(root: Path, tmp: Path, final: Path, keep: set[str]) -> None:
    """Rename the flushed temp folder into place (rank 0): the step that makes a checkpoint exist.

    The folder may hold files of a crashed save of the same name: its shards were overwritten by
    this save and any other file (a rank's hand-over note, or a shard of a rank that no longer
    exists) is removed here. An older folder of the same name (best/) is moved aside, replaced,
    then deleted.
    """
    for leftover in tmp.iterdir():
        if leftover.name not in keep:
            leftover.unlink()
    _fsync_dir(tmp)
    if final.exists():
        old = root / f".tmp-old-{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def _json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in trainer_state.json")


def step_dirs(root: Path) -> list[Path]:
    """step_* folders under a checkpoints/ folder, oldest first."""
    out = []
    for p in root.glob("step_*"):
        tail = p.name.removeprefix("step_")
        if p.is_dir() and tail.isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name.removeprefix("step_")))


def apply_retention(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` COMPLETE step_* folders (best/ is separate); delete the rest."""
    dirs = step_dirs(root)
    complete = [p for p in dirs if (p / COMPLETE).is_file()]
    keep = set(complete[-keep_last:])
    newest = complete[-1] if complete else None
    for p in dirs:
        # incomplete folders older than the newest complete one are crash leftovers
        if p not in keep and newest is not None and int(p.name[5:]) < int(newest.name[5:]):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- discovery and verification


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint folder is COMPLETE and every file matches its recorded size and checksum.

    Returns the index; raises CheckpointError naming the first bad file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): its save was interrupted")
    index = read_json(path / INDEX)
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path / INDEX} is not a distrain checkpoint index")
    for fname, info in index["files"].items():
        f = path / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} has {size} bytes, {info['bytes']} were written (truncated?)")
        if file_checksum(f) != info["xxh3_128"]:
            raise CheckpointError(f"checkpoint file {f} fails its checksum (corrupted)")
    read_json(path / STATE)
    return index


def find_resumable(run_dir: str | os.PathLike) -> Path | None:
    """The newest COMPLETE checkpoint that verifies; incomplete or corrupt ones are skipped with a warning."""
    for p in reversed(step_dirs(Path(run_dir) / CKPT_DIR)):
        try:
            verify(p)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        return p
    return None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from itself, a run dir (newest good checkpoint) or a checkpoints/ folder."""
    p = Path(path)
    if (p / INDEX).is_file() or (p / COMPLETE).is_file():
        return p
    found = find_resumable(p.parent if p.name == CKPT_DIR else p)
    if found is not None:
        return found
    raise CheckpointError(f"{path} holds no complete checkpoint (looked for {CKPT_DIR}/step_*/{COMPLETE})")
