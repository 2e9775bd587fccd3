"""Gathering evaluation outputs across batches and ranks, each sample of the split once, in order.

An output is a tensor whose first dimension is the sample ([B, ...]) or a dict of them. Rows may
differ in shape between batches (a [B, T_batch] output under dynamic padding) and ranks: every
rank sends its elements flat with the shapes of its batches, padded to the longest rank's for the
all-gather and trimmed after, so nothing distrain pads reaches the metrics. Uniform rows come back
as one tensor [N, ...]; rows whose shapes differ as a list of N tensors, one per sample, each as its
batch returned it (distrain.recipe's docstring: evaluation outputs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from distrain.errors import ConfigError

Rows = torch.Tensor | list[torch.Tensor]


def gather_outputs(parts: list[Any], valid: torch.Tensor, world_size: int, what: str) -> Any:
    """One output's per-batch values on this rank (tensors, or dicts of them with the same keys), gathered
    over ranks in rank order and trimmed to the rows `valid` marks (EvalBatchSampler.gathered_mask)."""
    if isinstance(parts[0], dict):
        keys = list(parts[0])
        for part in parts:
            if not isinstance(part, dict) or list(part) != keys:
                raise ConfigError(f"{what}: step returned dicts with different keys across batches ({keys} and "
                                  f"{list(part) if isinstance(part, dict) else type(part).__name__})")  # fmt: skip
        return {k: gather_rows([p[k] for p in parts], valid, world_size, f"{what}[{k!r}]") for k in keys}
    if any(isinstance(p, dict) for p in parts):
        raise ConfigError(f"{what}: step returned a dict for some batches and a tensor for others")
    return gather_rows(parts, valid, world_size, what)


def gather_rows(parts: list[torch.Tensor], valid: torch.Tensor, world_size: int, what: str) -> Rows:
    """Tensors [B_i, ...] of this rank's batches -> every valid row of every rank, on the CPU."""
    ndim, dtype = parts[0].ndim, parts[0].dtype
    if any(p.ndim != ndim or p.dtype != dtype for p in parts):
        found = sorted({f"{p.dtype} {p.ndim}-D" for p in parts})
        raise ConfigError(f"{what}: step returned tensors of different dtypes or dimensions across batches: "
                          f"{', '.join(found)}")  # fmt: skip
    device = parts[0].device
    wire = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool all-gather
    flat = torch.cat([p.reshape(-1) for p in parts]).to(wire)
    shapes = torch.tensor([list(p.shape) for p in parts], dtype=torch.int64, device=device)
    if world_size > 1:
        header = torch.tensor([ndim, len(parts), flat.numel()], dtype=torch.int64, device=device)
        headers = [h.tolist() for h in all_gather(header, world_size)]
        if len({(h[0], h[1]) for h in headers}) > 1:
            raise ConfigError(f"{what}: ranks returned outputs of different dimensions or batch counts "
                              f"(dims, batches per rank: {[(h[0], h[1]) for h in headers]})")  # fmt: skip
        all_shapes = [s.tolist() for s in all_gather(shapes, world_size)]
        longest = max(h[2] for h in headers)
        padded = torch.cat([flat, flat.new_zeros(longest - flat.numel())])
        flats = [f[: h[2]] for f, h in zip(all_gather(padded, world_size), headers, strict=True)]
    else:
        all_shapes, flats = [shapes.tolist()], [flat]
    batches: list[torch.Tensor] = []
    for rank_flat, rank_shapes in zip(flats, all_shapes, strict=True):
        rank_flat, offset = rank_flat.cpu(), 0
        for shape in rank_shapes:
            n = math.prod(shape)
            batches.append(rank_flat[offset : offset + n].view(shape).to(dtype))
            offset += n
    keep = valid[: sum(len(b) for b in batches)]
    if len({tuple(b.shape[1:]) for b in batches}) == 1:  # uniform rows: one tensor, as metrics always got
        return torch.cat(batches)[keep]
    rows = [row for b in batches for row in b]
    return [row for row, k in zip(rows, keep.tolist(), strict=True) if k]


def all_gather(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Every rank's `tensor` (all the same shape), in rank order."""
    out = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(out, tensor.contiguous())
    return out
