"""Loading checkpoints: each target tensor's region, read from the saved pieces that overlap it,
copied into the live tensor in place; the model-fit check; RNG states; consolidated weights.

The format and saving: format.py and save.py beside it.
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.autograd.graph import increment_version

from distrain.checkpoint.collective import agree_failed
from distrain.checkpoint.format import BLOCKS, INDEX, block_size, plain_name, read_json, shard_name
from distrain.checkpoint.integrity import describe_fault, hashed_while_loading, recorded_files, verify
from distrain.checkpoint.layout import (
    FlatShard,
    dtensor_type,
    flat_blocks,
    flatten_optim,
    geometry,
    local_tensor,
    piece_name,
    unflatten_optim,
)
from distrain.checkpoint.shard_file import ShardFile, ShardFileError
from distrain.errors import CheckpointError, ChecksumError


class _Reader:
    """Reads any region of a saved tensor from the pieces that overlap it (views of mapped files)."""

    def __init__(self, path: Path, index: dict[str, Any], defer: tuple[str, dict[str, torch.Tensor]] | None = None):
        self.path, self.index = path, index
        self._files: dict[str, ShardFile] = {}
        self._defer_file, self._deferred = defer if defer is not None else (None, {})

    def _file(self, fname: str) -> ShardFile:
        if fname not in self._files:
            if not plain_name(fname):  # verify refuses these too; an index read without it must not reach out
                raise CheckpointError(f"checkpoint {self.path}: a piece names {fname!r}, not a file of the folder")
            try:
                self._files[fname] = ShardFile(self.path / fname)
            except ShardFileError as e:
                raise CheckpointError(f"checkpoint file {e}") from None
        return self._files[fname]

    def _piece(self, key: str, piece: dict[str, Any]) -> torch.Tensor:
        try:
            t = self._file(piece["file"]).tensor(piece_name(key, piece))
        except ShardFileError as e:
            raise CheckpointError(f"checkpoint file {e}") from None
        if list(t.shape) != piece["shape"]:
            raise CheckpointError(f"checkpoint {self.path}: {key} in {piece['file']} has shape {list(t.shape)}, "
                                  f"the index says {piece['shape']}")  # fmt: skip
        return t

    def _exact_piece(self, key: str, offset: list[int] | None, shape: list[int] | None) -> dict[str, Any] | None:
        entry = self.index["tensors"][key]
        offset = offset if offset is not None else [0] * len(entry["shape"])
        shape = shape if shape is not None else entry["shape"]
        for piece in entry["pieces"]:
            if piece["offset"] == offset and piece["shape"] == shape:
                return piece
        return None

    def fill(self, key: str, dst: torch.Tensor, offset: list[int] | None = None) -> None:
        """dst[...] = the saved values of `key` (or of its region at `offset` of dst's shape)."""
        shape = list(dst.shape)
        piece = self._exact_piece(key, offset, shape)
        if piece is not None:  # the usual case (same layout as saved): straight from the file
            name = piece_name(key, piece)
            if piece["file"] == self._defer_file and dst.is_cpu and dst.is_contiguous():
                self._deferred[name] = dst  # copied while the file is hashed (load_verified)
                return
            try:
                if self._file(piece["file"]).copy_into(name, dst):
                    return
            except ShardFileError as e:
                raise CheckpointError(f"checkpoint file {e}") from None
        dst.copy_(self.read(key, offset, shape))

    def read(self, key: str, offset: list[int] | None = None, shape: list[int] | None = None) -> torch.Tensor:
        """The saved values of `key` (or of its region offset+shape), a view of the files when one
        piece holds them all; copy before changing it."""
        entry = self.index["tensors"][key]
        offset = offset if offset is not None else [0] * len(entry["shape"])
        shape = shape if shape is not None else entry["shape"]
        piece = self._exact_piece(key, offset, shape)
        if piece is not None:
            return self._piece(key, piece)
        out = None
        covered = 0
        for piece in entry["pieces"]:
            po, ps = piece["offset"], piece["shape"]
            lo = [max(a, b) for a, b in zip(offset, po, strict=True)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, po, ps, strict=True)]
            if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
                continue
            src = self._piece(key, piece)[tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, po, strict=True))]
            if out is None:
                out = torch.empty(shape, dtype=src.dtype)
            out[tuple(slice(a - o, h - o) for a, h, o in zip(lo, hi, offset, strict=True))] = src
            covered += math.prod(h - a for a, h in zip(lo, hi, strict=True))
        if out is None or covered != math.prod(shape):
            raise CheckpointError(f"checkpoint {self.path}: pieces of {key} do not cover {offset}+{shape}")
        return out

    def close(self) -> None:
        self._files.clear()  # the maps close once no tensor views them


def _fill(reader: _Reader, key: str, target: Any) -> None:
    """Copy the saved values of `key` into `target` in place (this rank's shard of a DTensor, or
    of a FlatShard: block by block, so a checkpoint of the same partitioning is read piece for piece)."""
    if isinstance(target, FlatShard):
        local, pos = target.local, 0
        for offset, shape in flat_blocks(target.start, target.start + local.numel(), target.full_shape):
            n = math.prod(shape)
            reader.fill(key, local[pos : pos + n].view(shape), offset)
            pos += n
        return
    if not isinstance(target, dtensor_type()):
        reader.fill(key, target)
        return
    geo = geometry(target)
    if not all(geo.shape):
        return
    local = local_tensor(target)
    if list(local.shape) != geo.shape:  # a padded local shard: the padding stays as it is
        local = local[tuple(slice(0, s) for s in geo.shape)]
    reader.fill(key, local, geo.offset)


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
    path: Path, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any] | None,
    index: dict[str, Any] | None = None, defer: tuple[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Copy the saved values into the tensors of the given model and optimizer states, in place.

    The states are Backend.checkpoint_state's, whose tensors are the live weights and optimizer
    moments (or their shards), so loading needs no second copy of the model in memory. Returns
    the model state and the optimizer state with the saved hyper-parameters and scalars. `index`:
    the checkpoint's index.json if already read (verify returns it). `defer` (file, {}): tensors
    that are exactly a piece of that file are not copied but collected, for load_verified.
    """
    index = index if index is not None else read_json(path / INDEX)
    targets: dict[str, torch.Tensor] = {}
    if optim_state is not None:
        targets, _ = flatten_optim(optim_state)
        saved = {k.removeprefix("optim."): k for k in index["tensors"] if k.startswith("optim.")}
        # A parameter that never had a gradient has no optimizer state in the run that saved it;
        # the fresh optimizer here got state for every parameter, which set_live_states drops again.
        stateful = {k.rpartition(".")[0] for k in saved}
        targets = {k: v for k, v in targets.items() if k.rpartition(".")[0] in stateful}
        missing = sorted(set(targets) - set(saved))
        extra = sorted(set(saved) - set(targets))
        if missing or extra:
            what = f"lacks optimizer state {missing[0]}" if missing else f"has unused optimizer state {extra[0]}"
            raise CheckpointError(f"checkpoint {path} {what} (another optimizer?)")
    reader = _Reader(path, index, defer)
    try:
        with torch.no_grad():
            for k, t in model_state.items():
                _fill(reader, f"model.{k}", t)
            for k, t in targets.items():
                _fill(reader, f"optim.{k}", t)
    finally:
        reader.close()
    optim_out = None if optim_state is None else unflatten_optim(targets, index["optim"], optim_state)
    return model_state, optim_out


def load_verified(path: Path, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any] | None,
                  index: dict[str, Any], rank: int = 0, world: int = 1, verified: bool = False,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:  # fmt: skip
    """load_states on every rank, with one verdict for all: a failure on any rank (a bad shard
    header only it reads, an OSError) raises CheckpointError on every rank, after the live
    state has been partly overwritten, so the caller must load another checkpoint or stop.

    When checkpoint.hashed_while_loading (a checkpoint of this world size, 64 MB or more;
    verify(defer_same_world=True) left the shard checksums for here) and not `verified` (all
    checksums checked before), each rank hashes its own shard while it copies from it, so each
    byte is read once, not twice (~20% faster at 600 MB a rank); a mismatch raises ChecksumError
    on every rank. One all-reduce when world > 1.
    """
    error, bad_bytes = "", False
    values: tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None = None
    try:
        files = recorded_files(path)
        if verified or not hashed_while_loading(index, files, world):
            values = load_states(path, model_state, optim_state, index)
        else:
            own = shard_name(rank)
            deferred: dict[str, torch.Tensor] = {}  # tensors of this rank's shard copied during its hash pass
            values = load_states(path, model_state, optim_state, index, defer=(own, deferred))
            if not _copy_and_hash(ShardFile(path / own), deferred, files[own]["xxh3_128"]):
                error, bad_bytes = f"checkpoint file {path / own} fails its checksum (corrupted)", True
    except ShardFileError as e:
        error = f"checkpoint file {e}"
    except CheckpointError as e:
        error = str(e)
    except Exception as e:  # kept for the verdict: the other ranks wait in it
        error = f"checkpoint {path} could not be loaded: {type(e).__name__}: {e}"
    if agree_failed(bool(error), world):
        if not error:  # another rank's fault: named from here too if verification finds it
            error = describe_fault(path, "failed to load on another rank (see its error)")
            bad_bytes = "checksum" in error
        raise (ChecksumError if bad_bytes else CheckpointError)(error)
    assert values is not None
    return values


_CHUNK = 256 << 10  # copied, then hashed while still in the L2 cache


def _copy_and_hash(shard: ShardFile, deferred: dict[str, torch.Tensor], recorded: list[str]) -> bool:
    """Hash every byte of a shard file in order, per block as checkpoint.block_checksums does, and
    copy the tensors in `deferred` into their targets: large ones chunk by chunk during the hash
    pass, so each chunk is hashed while still in the cache; small ones (Python overhead per call
    would outweigh that) one memmove each. True if every block matches `recorded`."""
    import xxhash

    base = shard.address
    large = []
    for name, dst in deferred.items():
        dtype, shape, start, nbytes = shard.span(name) if name in shard.entries else (None, None, 0, 0)
        if dtype != dst.dtype or shape != list(dst.shape):  # the index and the file must agree
            raise CheckpointError(f"checkpoint file {shard.path} holds {name} as {dtype} {shape}, the index "
                                  f"as {dst.dtype} {list(dst.shape)}")  # fmt: skip
        if nbytes >= _CHUNK:
            large.append((start, nbytes, dst))
        elif nbytes:
            ctypes.memmove(dst.data_ptr(), base + start, nbytes)
            increment_version(dst)

    size = shard.size
    step = block_size(size)
    hashers = [xxhash.xxh3_128() for _ in range(BLOCKS)]
    view = shard.view()

    def feed(a: int, b: int) -> None:
        while a < b:
            block = a // step
            end = min(b, (block + 1) * step)
            hashers[block].update(view[a:end])
            a = end

    pos = 0
    for start, nbytes, dst in sorted(large, key=lambda x: x[0]):
        feed(pos, start)  # the header and everything before this tensor, in as few calls as blocks allow
        ptr = dst.data_ptr()
        for a in range(start, start + nbytes, _CHUNK):
            b = min(a + _CHUNK, start + nbytes)
            ctypes.memmove(ptr + a - start, base + a, b - a)
            feed(a, b)
        increment_version(dst)
        shard.release(pos, start + nbytes - pos)  # hashed and copied: out of the resident set
        pos = start + nbytes
    feed(pos, size)
    view.release()
    shard.release(0, size)
    return [h.hexdigest() for h in hashers] == recorded


def full_model_state(path: str | os.PathLike, index: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The consolidated model weights of a checkpoint, on CPU, with no process group. `index`: the
    one checkpoint.resolve returned for it (already verified); else the checkpoint is verified here."""
    path = Path(path)
    index = index if index is not None else verify(path)
    reader = _Reader(path, index)
    try:
        return {k.removeprefix("model."): reader.read(k).clone() for k in index["tensors"] if k.startswith("model.")}
    finally:
        reader.close()
