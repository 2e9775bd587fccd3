"""`data.batch_size=auto`: the largest micro-batch that fits, keeping the global batch via accumulation.

On CUDA a trial runs forward, backward and an optimizer step on a throw-away copy of the model;
an out-of-memory error halves the size and retries, starting from the largest allowed size.
On CPU nothing fails cleanly (the kernel swaps or kills), so the size doubles from 1 while the
step's memory stays within a budget (`data.auto_memory_mb`, default half the available RAM):
weights, gradients and optimizer state plus every activation saved for backward, measured with
autograd's saved-tensor hooks on a real forward+backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distrain.config import Config
from distrain.errors import ConfigError
from distrain.train.data import collate_fetched, move_to

MiB = 2**20


@dataclass
class AutoBatch:
    micro_batch: int
    grad_accum: int
    note: str  # how it was found, for the plan


def sample_batch(dataset: Any, size: int, collate: Callable[[list[Any]], Any] | None = None) -> Any:
    """The first `size` samples (cycled when the dataset is smaller), batched like the loader does
    (by the recipe's `collate` when it has one)."""
    indices = [i % len(dataset) for i in range(size)]
    if collate is not None:
        return collate([dataset[i] for i in indices])
    if hasattr(dataset, "__getitems__"):
        return collate_fetched(dataset.__getitems__(indices))  # a Subset's: a list of samples
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while `fn` runs (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def cpu_step_bytes(model: torch.nn.Module, loss_fn: Callable[[Any], torch.Tensor], batch: Any, optim_slots: int) -> int:
    """Memory of one training step on CPU: weights + grads + optimizer slots + saved activations + batch."""
    params = [p for p in model.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    exclude = {p.untyped_storage().data_ptr() for p in params}
    acts = saved_activation_bytes(lambda: loss_fn(batch), exclude)
    model.zero_grad(set_to_none=True)
    inputs = _tensor_bytes(batch)
    return weights + trainable * (1 + optim_slots) + acts + inputs


def _tensor_bytes(batch: Any) -> int:
    if torch.is_tensor(batch):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(_tensor_bytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_tensor_bytes(v) for v in batch)
    return 0


def largest_fitting(fits: Callable[[int], bool], cap: int, halving: bool) -> int:
    """Largest size that fits: halve from `cap` (CUDA: a failure is cheap), or double from 1 up to `cap`."""
    if halving:
        size = cap
        while size >= 1:
            if fits(size):
                return size
            size //= 2
        return 0
    size, best = 1, 0
    while fits(size):
        best = size
        if size >= cap:
            break
        size = min(size * 2, cap)
    return best


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def available_memory_mb() -> float:
    import psutil

    return psutil.virtual_memory().available / MiB


def find_batch(cfg: Config, recipe: Any, dataset: Any, device: torch.device, world_size: int,
               autocast: Callable[[], contextlib.AbstractContextManager]) -> AutoBatch:  # fmt: skip
    """Pick the micro-batch and accumulation for `data.batch_size=auto` (all ranks agree on it)."""
    d = cfg.data
    target = d.global_batch
    if target is not None and target % world_size:
        raise ConfigError(f"data.global_batch={target} is not divisible by the {world_size} processes")
    per_rank = target // world_size if target else None
    accum = cfg.train.grad_accum
    samples_cap = len(dataset) // (world_size * (1 if per_rank else accum))
    cap = max(1, min(d.auto_max_batch, per_rank or samples_cap, samples_cap))

    found, how = _search(recipe.build_model().to(device), cfg, recipe, dataset, device, cap, autocast)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probe model and its optimizer state are gone with _search
    found = _agree(found, world_size, device)
    if found < 1:
        raise ConfigError(
            "data.batch_size=auto: not even one sample fits"
            + (f" in data.auto_memory_mb={d.auto_memory_mb:g}" if device.type != "cuda" else " in GPU memory")
        )
    if per_rank:
        micro = largest_divisor_at_most(per_rank, found)
        accum = per_rank // micro
        how += f"; {micro} divides the per-rank {per_rank} of data.global_batch={target}"
    else:
        micro = found
    return AutoBatch(micro_batch=micro, grad_accum=accum, note=f"micro-batch {micro}: {how}")


def _agree(found: int, world_size: int, device: torch.device) -> int:
    """Every rank must use the same micro-batch: the smallest one found."""
    if world_size == 1:
        return found
    import torch.distributed as dist

    t = torch.tensor([found], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())



def _search(model: torch.nn.Module, cfg: Config, recipe: Any, dataset: Any, device: torch.device, cap: int,
            autocast: Callable[[], contextlib.AbstractContextManager]) -> tuple[int, str]:  # fmt: skip
    from distrain.train.optim import build_optimizer

    model.train()
    collate = getattr(recipe, "collate", None)

    def loss_fn(batch: Any) -> torch.Tensor:
        with autocast():
            return recipe.step(model, batch).loss.float().mean()

    if device.type == "cuda":
        optimizer = build_optimizer(model, cfg.optim, cfg.optim.lr)

        def fits(size: int) -> bool:
            try:
                loss_fn(move_to(sample_batch(dataset, size, collate), device)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize(device)
                return True
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                return False

        return largest_fitting(fits, cap, halving=True), f"largest that fits in CUDA memory (halving from {cap})"
    budget = cfg.data.auto_memory_mb or available_memory_mb() / 2
    slots = {"adamw": 2, "adam": 2, "sgd": 1}[cfg.optim.name]
    needed: dict[int, int] = {}

    def fits(size: int) -> bool:
        needed[size] = cpu_step_bytes(model, loss_fn, sample_batch(dataset, size, collate), slots)
        return needed[size] <= budget * MiB

    found = largest_fitting(fits, cap, halving=False)
    used = needed.get(found, 0) / MiB
    return found, f"largest of 1, 2, 4, ..., {cap} whose step needs <= {budget:.0f} MiB (it needs {used:.1f} MiB)"
