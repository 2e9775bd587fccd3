"""The few collectives checkpoint code needs, on the device the process group runs on."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1



def agree_failed(failed: bool, world: int) -> bool:
    """Whether any rank failed (one all-reduce when world > 1): every rank gets the same answer,
    so a rank whose own step went wrong never leaves the others waiting in a collective."""
    if world == 1 or not is_dist():
        return failed
    verdict = torch.tensor([int(failed)], dtype=torch.int64, device=collective_device())
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    return bool(verdict.item())



def signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x



def collective_device() -> torch.device:
    """Where the default process group's tensors live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
