"""What a checkpoint holds and who writes which part of it.

The live state of a module and its optimizer (`live_states`, and `set_live_states` to put one
back), the flat tensor/JSON split of an optimizer state, and the
pieces: which rank writes which part of each tensor (`rank_tensors`, on every rank) and the
resulting map of tensor -> pieces for the index (`layout`, on rank 0). Both follow one rule: a
DTensor's shard is written by the rank holding it (once per replica group), a FlatShard (a
DeepSpeed ZeRO partition: a contiguous run of the tensor flattened) by its rank as the
rectangular blocks that run covers, and a replicated tensor by rank `i % world` for the i-th such
tensor in name order, so all ranks write. A FlatShard's blocks (several per file) are stored
under names of their own, which the index marks ("block").
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

from distrain.checkpoint.shard_file import dtype_name

# ---------------------------------------------------------------- flattening


def flatten_optim(optim_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """DCP's optimizer state dict ({state: {fqn: {name: tensor}}, param_groups}) -> flat tensors + JSON."""
    tensors, scalars = {}, {}
    for fqn, entries in optim_sd.get("state", {}).items():
        for name, value in entries.items():
            if torch.is_tensor(value) or isinstance(value, FlatShard):
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
    yet gets its state first (a zero-lr step, as DCP does). The model state holds the
    parameters themselves (keep_vars: a DTensor's detach is not free); nothing here needs grad.
    """
    if not optimizer.state:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(optimizer)
    names = {id(p): n for n, p in module.named_parameters()}
    state = {names[id(p)]: dict(s) for p, s in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]  # fmt: skip
    return module.state_dict(keep_vars=True), {"state": state, "param_groups": groups}


def set_live_states(module: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any],
                    optim_state: dict[str, Any] | None) -> None:  # fmt: skip
    """Copy states laid out like live_states' into the module (and optimizer); tensors that are
    the live ones (loaded in place) are skipped, hyper-parameters and scalars are set."""
    with torch.no_grad():
        for key, t in module.state_dict(keep_vars=True).items():
            value = model_state.get(key)
            if value is not None and value is not t:
                _copy_local(t, value)
        if optim_state is None:
            return
        params = dict(module.named_parameters())
        for name, p in params.items():
            if name not in optim_state["state"]:
                optimizer.state.pop(p, None)  # no state when saved (never had a gradient): none now either
        for name, entries in optim_state["state"].items():
            live_state = optimizer.state[params[name]]
            for key, value in entries.items():
                current = live_state.get(key)
                if value is current:
                    continue
                if torch.is_tensor(value) and torch.is_tensor(current):
                    _copy_local(current, value)
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


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard without DTensor.to_local's autograd bookkeeping (no graph is
    wanted when checkpointing; the attribute is what to_local returns)."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t.to_local()


def _replicated(tensors: dict[str, Any]) -> list[str]:
    """Names of the plain (not DTensor, not FlatShard) tensors of a state, in the order that assigns their writers."""
    dt = dtensor_type()
    return sorted(k for k, v in tensors.items() if not isinstance(v, (dt, FlatShard)))


@dataclasses.dataclass(frozen=True, eq=False)
class FlatShard:
    """One rank's part of a tensor that is partitioned flat (DeepSpeed ZeRO): elements
    [start, start + local.numel()) of the full tensor flattened in row-major order, and where
    every rank's part lies, so rank 0 can index all of them and a load under any backend finds
    each region. `local` is the live partition (a view), so saving and loading copy nothing more."""

    local: torch.Tensor  # 1-D, this rank's values (may be empty)
    full_shape: tuple[int, ...]
    start: int
    spans: tuple[tuple[int, int, int], ...]  # (rank, start, numel) of every rank's non-empty part

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.full_shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def ndim(self) -> int:
        return len(self.full_shape)


def flat_blocks(start: int, end: int, shape: tuple[int, ...] | list[int]) -> list[tuple[list[int], list[int]]]:
    """The run [start, end) of a row-major tensor of `shape` as rectangular blocks (offset, shape),
    in order; each block is itself a contiguous run, at most 2 * ndim - 1 of them."""
    if end <= start:
        return []
    if not shape:
        return [([], [])]
    inner = math.prod(shape[1:])
    if inner == 0:
        return []
    (r0, a), (r1, b) = divmod(start, inner), divmod(end, inner)
    rest = list(shape[1:])
    if r0 == r1:  # within one row
        return [([r0, *o], [1, *s]) for o, s in flat_blocks(a, b, rest)]
    out = []
    if a:
        out += [([r0, *o], [1, *s]) for o, s in flat_blocks(a, inner, rest)]
        r0 += 1
    if r1 > r0:
        out.append(([r0, *[0] * len(rest)], [r1 - r0, *rest]))
    if b:
        out += [([r1, *o], [1, *s]) for o, s in flat_blocks(0, b, rest)]
    return out


def block_name(key: str, offset: list[int]) -> str:
    """The name a FlatShard's block is stored under in its file (several blocks of one tensor share a file)."""
    return f"{key}@{','.join(map(str, offset))}"


def piece_name(key: str, piece: dict[str, Any]) -> str:
    """The name piece `piece` of tensor `key` has in its file: a FlatShard's block ("block": true)
    is stored under block_name, anything else under the tensor's own name."""
    return block_name(key, piece["offset"]) if piece.get("block") is True else key


def placement(t: Any) -> Any:
    """What besides shape and dtype decides a state entry's pieces (for caching the index layout)."""
    if isinstance(t, dtensor_type()):
        return geometry(t)
    return t.spans if isinstance(t, FlatShard) else None


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a DTensor's shards lie: this rank's (global offset, unpadded shape, whether it writes
    it) and every written shard as (rank, offset, shape). Only non-empty shards are written, each
    once per replica group (by the rank at coordinate 0 of replicated mesh dims)."""

    offset: list[int]
    shape: list[int]
    writes: bool
    regions: tuple[tuple[int, list[int], list[int]], ...]


# Process-wide, not a CheckpointManager's: a memo of a pure function of an immutable spec, right for all.
_GEOMETRY: dict[int, tuple[Any, Geometry]] = {}


def geometry(t: torch.Tensor) -> Geometry:
    """A DTensor's Geometry, cached by its (immutable) spec: torch computes shard offsets in Python
    and hashing a mesh and placements costs microseconds, per tensor and per save or load. The
    cache holds the spec, so its id is not reused while the entry lives."""
    spec = t._spec  # type: ignore[attr-defined]
    hit = _GEOMETRY.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    shape, placements, ranks = tuple(t.shape), tuple(spec.placements), spec.mesh.mesh
    regions = []
    for coord in itertools.product(*(range(n) for n in ranks.shape)):
        if any(isinstance(p, Replicate) and coord[i] != 0 for i, p in enumerate(placements)):
            continue
        local_shape, offset = _compute_local_shape_and_global_offset(shape, tuple(ranks.shape), list(coord), placements)
        if all(local_shape):
            regions.append((int(ranks[coord]), list(offset), list(local_shape)))
    mine = spec.mesh.get_coordinate()
    if mine is None:
        geo = Geometry([0] * len(shape), [0] * len(shape), False, tuple(regions))
    else:
        local_shape, offset = _compute_local_shape_and_global_offset(shape, tuple(ranks.shape), mine, placements)
        me = int(ranks[tuple(mine)])
        geo = Geometry(list(offset), list(local_shape), any(r == me for r, _, _ in regions), tuple(regions))
    if len(_GEOMETRY) > 65536:  # specs of tensors long gone
        _GEOMETRY.clear()
    _GEOMETRY[id(spec)] = (spec, geo)
    return geo


def _local_shard(t: torch.Tensor) -> torch.Tensor | None:
    """The part of a DTensor this rank writes, or None (see Geometry)."""
    geo = geometry(t)
    if not geo.writes:
        return None
    local = local_tensor(t)
    return local[tuple(slice(0, s) for s in geo.shape)] if list(local.shape) != geo.shape else local  # padded


def rank_pieces(tensors: dict[str, Any], rank: int, world: int) -> dict[str, torch.Tensor]:
    """What this rank writes of a state, where it lives: its DTensor shards' local tensors, its
    FlatShards' blocks and every world-th replicated tensor."""
    mine = set(_replicated(tensors)[rank::world])
    dt = dtensor_type()
    out = {}
    for key, t in tensors.items():
        if isinstance(t, FlatShard):
            out |= _flat_blocks(key, t)
            continue
        local = _local_shard(t) if isinstance(t, dt) else t if key in mine else None
        if local is not None:
            out[key] = local
    return out


def rank_tensors(tensors: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """rank_pieces on CPU and contiguous (tensors sharing storage, such as tied weights, are written
    as they are)."""
    out = {}
    for key, local in rank_pieces(tensors, rank, world).items():
        if local.device.type != "cpu":
            local = local.to("cpu")
        out[key] = local if local.is_contiguous() else local.contiguous()
    return out


def _flat_blocks(key: str, t: FlatShard) -> dict[str, torch.Tensor]:
    """A FlatShard's blocks by their names in the file, on CPU (views of the partition where it is on CPU)."""
    out, pos = {}, 0
    local = t.local.detach()
    for offset, shape in flat_blocks(t.start, t.start + local.numel(), t.full_shape):
        n = math.prod(shape)
        block = local[pos : pos + n]
        pos += n
        block = block.to("cpu") if block.device.type != "cpu" else block
        out[block_name(key, offset)] = block.contiguous().view(shape)
    return out


def layout(tensors: dict[str, Any], world: int, file_of: Callable[[int], str]) -> dict[str, dict[str, Any]]:
    """Index entries of a state: global shape, dtype and the pieces [{file, offset, shape[, block]}]
    that rank_tensors writes on every rank, computed from shapes and placements alone; "block":
    the piece is stored under block_name (readers older than it find no tensor of its name and stop)."""
    owner = {k: i % world for i, k in enumerate(_replicated(tensors))}
    out = {}
    for key, t in tensors.items():
        if key in owner:
            pieces = [{"file": file_of(owner[key]), "offset": [0] * t.ndim, "shape": list(t.shape)}]
        elif isinstance(t, FlatShard):
            pieces = [{"file": file_of(r), "offset": o, "shape": s, "block": True}
                      for r, start, n in t.spans for o, s in flat_blocks(start, start + n, t.full_shape)]  # fmt: skip
        else:
            pieces = [{"file": file_of(r), "offset": o, "shape": s} for r, o, s in geometry(t).regions]
        out[key] = {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "pieces": pieces}
    return out
