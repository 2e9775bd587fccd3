"""Sharded safetensors checkpoints: atomic save, checksums, retention, resume discovery, load.

Layout of `<run>/checkpoints/step_<N:08d>/` (and `best/`):

    model-<rank>.safetensors   this rank's pieces of the model state (DTensor shards under FSDP2;
                               replicated tensors are split between ranks so all ranks write)
    optim-<rank>.safetensors   the same for the optimizer state, keyed by parameter name
    rng-<rank>.safetensors     this rank's RNG states (torch, CUDA, numpy, python) as uint8/int64
    index.json                 tensor -> global shape, dtype and pieces (file, offset, shape);
                               file -> xxh3-128 checksum and size; optimizer param groups
    trainer_state.json         step, epoch, samples consumed, scheduler, grad scaler, best metric,
                               early-stopping counters, world size, backend, config hash, versions
    config.yaml                the run's config (so `distrain export` needs only the checkpoint)
    COMPLETE                   written last; a folder without it is never loaded

Ranks write into `checkpoints/.tmp-<name>`, fsync, rank 0 renames it into place, writes
COMPLETE, then points `checkpoints/latest` at it; older checkpoints are deleted only after that.
Loading reads each target tensor's region from the pieces that overlap it, so a checkpoint
saved on any number of ranks, under DDP or FSDP2, loads into any other layout. No pickle:
tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from distrain.config import ConfigError

log = logging.getLogger("distrain")

FORMAT = "distrain-checkpoint"
VERSION = 1
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


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _crash_point(stage: str, rank: int, step: int) -> None:
    want = os.environ.get(CRASH_ENV, "")
    if not want or rank != 0:
        return
    name, _, at = want.partition(":")
    if name == stage and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def file_checksum(path: str | os.PathLike) -> str:
    """xxh3-128 of a file (about 10 GB/s, so verifying at every load is cheap)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Atomic small-file write: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


# ---------------------------------------------------------------- pieces


def _local_piece(t: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
    """The part of a (possibly DTensor) tensor this rank writes and its global offset, or None."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        coord = t.device_mesh.get_coordinate()
        if coord is None:
            return None
        # Replicas of a shard are written once: by the rank at coordinate 0 of replicated mesh dims.
        if any(isinstance(p, Replicate) and coord[i] != 0 for i, p in enumerate(t.placements)):
            return None
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        local = t.to_local()
        local = local[tuple(slice(0, s) for s in shape)] if list(local.shape) != list(shape) else local
        if local.numel() == 0:
            return None
        return local, list(offset)
    return t, [0] * t.ndim


def _pieces_for_rank(
    tensors: dict[str, torch.Tensor], rank: int, world: int
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Split a state into what this rank writes: its DTensor shards, and every world-th replicated tensor."""
    from torch.distributed.tensor import DTensor

    plain = sorted(k for k, v in tensors.items() if not isinstance(v, DTensor))
    owner = {k: i % world for i, k in enumerate(plain)}
    out, meta = {}, {}
    seen: set[int] = set()
    for key, t in tensors.items():
        meta[key] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "piece": None}
        piece = None if key in owner and owner[key] != rank else _local_piece(t)
        if piece is None:
            continue
        local, offset = piece
        local = local.detach().to("cpu")
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

    Returns the final folder. Retention (keep_last) applies to step_* folders only, and runs
    after the new checkpoint is COMPLETE and `latest` points at it.
    """
    root = Path(run_dir) / CKPT_DIR
    final = root / name
    tmp = root / f".tmp-{name}"
    step = int(trainer_state.get("step", 0))
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    _crash_point("before_shards", rank, step)

    tag = f"{rank:05d}"
    files: dict[str, dict[str, Any]] = {}
    tensor_meta: dict[str, dict[str, Any]] = {}
    optim_tensors, optim_extra = flatten_optim(optim_state)
    for i, (kind, state) in enumerate((("model", model_state), ("optim", optim_tensors))):
        if i == 1:
            _crash_point("between_shards", rank, step)
        local, meta = _pieces_for_rank(state, rank, world)
        fname = f"{kind}-{tag}.safetensors"
        if local:
            save_file({f"{kind}.{k}": v for k, v in local.items()}, str(tmp / fname), metadata={"format": FORMAT})
            _fsync_file(tmp / fname)
            files[fname] = {"xxh3_128": file_checksum(tmp / fname), "bytes": (tmp / fname).stat().st_size}
        for k, m in meta.items():
            piece = m.pop("piece")
            m["pieces"] = [{"file": fname, **piece}] if piece else []
            tensor_meta[f"{kind}.{k}"] = m
    rng_tensors, rng_meta = rng_state()
    rng_file = f"rng-{tag}.safetensors"
    save_file(rng_tensors, str(tmp / rng_file), metadata=rng_meta)
    _fsync_file(tmp / rng_file)
    files[rng_file] = {"xxh3_128": file_checksum(tmp / rng_file), "bytes": (tmp / rng_file).stat().st_size}

    gathered = [None] * world
    if _is_dist():
        dist.all_gather_object(gathered, (files, tensor_meta))
    else:
        gathered = [(files, tensor_meta)]
    if rank == 0:
        all_files: dict[str, Any] = {}
        tensors: dict[str, Any] = {}
        for rank_files, rank_meta in gathered:  # type: ignore[misc]
            all_files.update(rank_files)
            for k, m in rank_meta.items():
                entry = tensors.setdefault(k, {"shape": m["shape"], "dtype": m["dtype"], "pieces": []})
                entry["pieces"].extend(m["pieces"])
        index = {"format": FORMAT, "version": VERSION, "world_size": world, "files": all_files,
                 "tensors": tensors, "optim": optim_extra}  # fmt: skip
        _write_text(tmp / INDEX, json.dumps(index, indent=1))
        _write_text(tmp / STATE, json.dumps(trainer_state, indent=1, default=_json_default))
        _write_text(tmp / "config.yaml", config_text)
        _fsync_dir(tmp)
        if final.exists():  # an incomplete or older folder of the same name (e.g. best/) goes aside first
            old = root / f".tmp-old-{name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _crash_point("before_complete", rank, step)
        _write_text(final / COMPLETE, json.dumps({"step": step}) + "\n")
        _fsync_dir(final)
        _crash_point("before_latest", rank, step)
        if name.startswith("step_"):
            _write_text(root / LATEST, name + "\n")
            if keep_last:
                apply_retention(root, keep_last)
    _barrier()
    return final


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


# ---------------------------------------------------------------- load


class _Reader:
    """Reads any region of a saved tensor from the pieces that overlap it."""

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path, self.index = path, index
        self._handles: dict[str, Any] = {}

    def _open(self, fname: str) -> Any:
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.path / fname), framework="pt")
        return self._handles[fname]

    def read(self, key: str, offset: Iterable[int] | None = None, shape: Iterable[int] | None = None) -> torch.Tensor:
        entry = self.index["tensors"][key]
        full = entry["shape"]
        offset = list(offset) if offset is not None else [0] * len(full)
        shape = list(shape) if shape is not None else list(full)
        if not full:  # 0-dim (e.g. Adam's step)
            return self._open(entry["pieces"][0]["file"]).get_tensor(key)
        out = None
        covered = 0
        for piece in entry["pieces"]:
            po, ps = piece["offset"], piece["shape"]
            lo = [max(a, b) for a, b in zip(offset, po, strict=True)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, po, ps, strict=True)]
            if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
                continue
            handle = self._open(piece["file"])
            if lo == po and hi == [b + m for b, m in zip(po, ps, strict=True)]:
                src = handle.get_tensor(key)
            else:
                src = handle.get_slice(key)[tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, po, strict=True))]
            if lo == offset and [h - a for a, h in zip(lo, hi, strict=True)] == shape:
                return src
            if out is None:
                out = torch.empty(shape, dtype=src.dtype)
            out[tuple(slice(a - o, h - o) for a, h, o in zip(lo, hi, offset, strict=True))] = src
            covered += math.prod(h - a for a, h in zip(lo, hi, strict=True))
        if out is None or covered != math.prod(shape):
            raise CheckpointError(f"checkpoint {self.path}: pieces of {key} do not cover {offset}+{shape}")
        return out

    def close(self) -> None:
        self._handles.clear()


def _target_region(t: torch.Tensor) -> tuple[list[int], list[int]]:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return list(offset), list(shape)
    return [0] * t.ndim, list(t.shape)


def _fill(reader: _Reader, key: str, target: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like `target` (same DTensor placement) holding the saved values."""
    from torch.distributed.tensor import DTensor

    offset, shape = _target_region(target)
    if math.prod(shape) == 0:
        local = torch.empty(shape, dtype=target.dtype)
    else:
        local = reader.read(key, offset, shape).to(target.dtype)
    if isinstance(target, DTensor):
        want = target.to_local()
        if list(want.shape) != shape:  # padded local shards: keep the padding
            padded = torch.zeros_like(want, device="cpu")
            padded[tuple(slice(0, s) for s in shape)] = local
            local = padded
        local = local.to(want.device)
        return DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                  shape=target.shape, stride=target.stride())  # fmt: skip
    return local.to(target.device)


def check_fits(path: Path, index: dict[str, Any], state: dict[str, Any], model_state: dict[str, torch.Tensor],
               recipe: str | None) -> None:  # fmt: skip
    """Refuse a checkpoint of another recipe or another model shape, naming what differs."""
    saved_recipe = state.get("recipe")
    if recipe is not None and saved_recipe is not None and Path(saved_recipe).stem != Path(recipe).stem:
        raise CheckpointError(f"checkpoint {path} is from recipe={saved_recipe}, not recipe={recipe}")
    saved = {k.removeprefix("model."): v for k, v in index["tensors"].items() if k.startswith("model.")}
    missing = sorted(set(model_state) - set(saved))
    unexpected = sorted(set(saved) - set(model_state))
    common = sorted(set(saved) & set(model_state))
    wrong = [f"{k} is {saved[k]['shape']} there, {list(model_state[k].shape)} here"
             for k in common if saved[k]["shape"] != list(model_state[k].shape)]  # fmt: skip
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape of " + "; ".join(wrong[:3]))
        if missing:
            parts.append(f"missing in the checkpoint: {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"not in this model: {', '.join(unexpected[:3])}")
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({'; '.join(parts)}); same recipe and model.* settings needed"
        )


def load_states(
    path: Path, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Saved values laid out like the given (target) model and optimizer states."""
    index = read_json(path / INDEX)
    reader = _Reader(path, index)
    try:
        model_out = {k: _fill(reader, f"model.{k}", t) for k, t in model_state.items()}
        optim_out = None
        if optim_state is not None:
            targets, _ = flatten_optim(optim_state)
            saved = {k.removeprefix("optim."): k for k in index["tensors"] if k.startswith("optim.")}
            missing = sorted(set(targets) - set(saved))
            extra = sorted(set(saved) - set(targets))
            if missing or extra:
                what = f"lacks optimizer state {missing[0]}" if missing else f"has unused optimizer state {extra[0]}"
                raise CheckpointError(f"checkpoint {path} {what} (another optimizer?)")
            tensors = {k: _fill(reader, saved[k], t) for k, t in targets.items()}
            optim_out = unflatten_optim(tensors, index["optim"], optim_state)
    finally:
        reader.close()
    return model_out, optim_out


def load_rng(path: Path, rank: int) -> bool:
    """Restore this rank's RNG states if the checkpoint has a file for this rank."""
    f = path / f"rng-{rank:05d}.safetensors"
    if not f.is_file():
        return False
    with safe_open(str(f), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
        meta = h.metadata()
    set_rng_state(tensors, meta)
    return True


def full_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The consolidated model weights of a checkpoint, on CPU, with no process group."""
    path = Path(path)
    index = verify(path)
    reader = _Reader(path, index)
    try:
        return {k.removeprefix("model."): reader.read(k).clone() for k in index["tensors"] if k.startswith("model.")}
    finally:
        reader.close()
