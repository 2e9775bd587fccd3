"""Datasets and the deterministic batch plan.

Data order is a pure function of (seed, epoch): one permutation of the whole training set
per epoch. An optimizer step takes the next `global_batch` samples of that permutation and
splits them over ranks and micro-batches, so the samples of a step do not depend on the
world size, and the position in an epoch is a global sample count that survives a restart
on another number of ranks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distrain.config import DataConfig
from distrain.train.rng import FETCH, seed_global, stream_seed


class ArrayDataset(Dataset):
    """Columns of pre-built tensors. A batch is one index operation per column, no per-sample Python."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.columns.items()}


class BatchIndices(list):
    """A list of sample indices that also tells the dataset which epoch it is in (for augmentation)
    and the seed its fetch runs under (None: the RNGs are left as they are)."""

    epoch: int = 0
    seed: int | None = None


class SeededFetch(Dataset):
    """A dataset whose batches are fetched with the global RNGs seeded from the batch's position,
    so a dataset that draws from them (torch.rand in __getitem__, say) gives the same batch in a
    resumed run, in a worker process or not, whatever the worker's earlier batches were."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> Any:
        seed = getattr(indices, "seed", None)
        if seed is not None:
            seed_global(seed)
        getitems = getattr(self.dataset, "__getitems__", None)
        return getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]


class PerSample(Dataset):
    """A dataset fetched sample by sample, `[dataset[i] for i in indices]`, for the recipe's collate."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        return [self.dataset[i] for i in indices]


def as_dataset(data: Any) -> Dataset:
    """Accept an ArrayDataset, a dict of tensors/arrays, a Hugging Face Dataset, or any torch Dataset."""
    if isinstance(data, dict):
        return ArrayDataset({k: v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v)) for k, v in data.items()})
    if type(data).__module__.startswith("datasets."):  # Hugging Face: tensorise once, not per batch
        return ArrayDataset(dict(data.with_format("torch")[:]))
    return data


def _collate_passthrough(batch: Any) -> Any:
    return batch


def loader_kwargs(cfg: DataConfig, dataset: Dataset, world_size: int, on_cuda: bool) -> dict[str, Any]:
    """DataLoader settings: what the user set, else what suits the hardware and the dataset."""
    in_memory = isinstance(dataset, ArrayDataset)
    workers = cfg.num_workers
    if workers is None:  # in-memory tensors are faster in-process; decoding datasets want workers
        workers = 0 if in_memory else max(1, min(4, (os.cpu_count() or 2) // max(world_size, 1) - 1))
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": on_cuda if cfg.pin_memory is None else cfg.pin_memory,
        "collate_fn": _collate_passthrough if hasattr(dataset, "__getitems__") else None,
    }
    if workers > 0:
        kwargs["persistent_workers"] = True if cfg.persistent_workers is None else cfg.persistent_workers
        if cfg.prefetch_factor is not None:
            kwargs["prefetch_factor"] = cfg.prefetch_factor
    return kwargs


@dataclass
class BatchPlan:
    """Which samples each rank sees at each micro-step of each optimizer step."""

    num_samples: int
    micro_batch: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    drop_last: bool = True

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def chunks(self) -> int:
        return self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest >= self.chunks and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def step_samples(self, order: np.ndarray, consumed: int) -> np.ndarray:
        """Global sample indices of the optimizer step that starts `consumed` samples into the epoch;
        empty when the epoch has no further step (a short tail is dropped with drop_last, or when it
        cannot give every rank and micro-step a sample)."""
        idx = order[consumed : consumed + self.global_batch]
        short = len(idx) < self.chunks or (self.drop_last and len(idx) < self.global_batch)
        return idx[:0] if short else idx

    def micro_batches(self, step_idx: np.ndarray) -> list[np.ndarray]:
        """This rank's micro-batches of one step; chunk m*world+r goes to micro-step m on rank r."""
        if len(step_idx) == self.global_batch:  # a full step: equal parts, as array_split makes them, without its cost
            parts = step_idx.reshape(self.chunks, self.micro_batch)
        else:
            parts = np.array_split(step_idx, self.chunks)
        return [parts[m * self.world_size + self.rank] for m in range(self.grad_accum)]


class TrainBatchSampler(Sampler):
    """Yields this rank's micro-batch index lists for one epoch, from a global sample position."""

    def __init__(self, plan: BatchPlan):
        self.plan = plan
        self.epoch = 0
        self.consumed = 0

    def set_position(self, epoch: int, consumed: int) -> None:
        self.epoch, self.consumed = epoch, consumed

    def __iter__(self) -> Iterator[list[int]]:
        order = self.plan.order(self.epoch)
        consumed = self.consumed
        while True:
            step_idx = self.plan.step_samples(order, consumed)
            if len(step_idx) == 0:
                return
            for m, part in enumerate(self.plan.micro_batches(step_idx)):
                batch = BatchIndices(part.tolist())
                batch.epoch = self.epoch
                batch.seed = stream_seed(self.plan.seed, FETCH, self.epoch, consumed, m, self.plan.rank)
                yield batch
            consumed += len(step_idx)

    def __len__(self) -> int:
        return (self.plan.steps_per_epoch - self.consumed // self.plan.global_batch) * self.plan.grad_accum


class EpochBatches:
    """One rank's way through an epoch from a global sample position: `count` is the global sample
    count of the next optimizer step (0: the epoch has no step left) and `take()` fetches this
    rank's micro-batches of that step, on the device, and moves the position past it."""

    def __init__(self, plan: BatchPlan, sampler: TrainBatchSampler, loader: DataLoader, epoch: int, consumed: int,
                 device: torch.device, non_blocking: bool = False):  # fmt: skip
        self.plan, self.epoch, self.consumed = plan, epoch, consumed
        self.device, self.non_blocking = device, non_blocking
        self._order = plan.order(epoch)
        self.count = len(plan.step_samples(self._order, consumed))
        sampler.set_position(epoch, consumed)  # before the loader's workers (if any) start reading it
        self._batches = iter_batches(loader)

    def take(self) -> list[Any]:
        micro = [move_to(next(self._batches), self.device, self.non_blocking) for _ in range(self.plan.grad_accum)]
        self.consumed += self.count
        self.count = len(self.plan.step_samples(self._order, self.consumed))
        return micro


def iter_batches(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches. In-process ones (no workers, no pinning) are fetched as the DataLoader's
    single-process iterator fetches them, without its per-batch bookkeeping (a profiler range and
    index checks), which costs more than gathering a batch of in-memory columns."""
    if loader.num_workers > 0 or loader.pin_memory:
        return iter(loader)
    dataset, collate = loader.dataset, loader.collate_fn
    getitems = getattr(dataset, "__getitems__", None)
    if getitems:
        return (collate(getitems(idx)) for idx in loader.batch_sampler)
    return (collate([dataset[i] for i in idx]) for idx in loader.batch_sampler)  # type: ignore[index]


class EvalBatchSampler(Sampler):
    """Contiguous equal shards per rank (padded by repeating the last sample) so every rank runs
    the same number of forwards (FSDP and ZeRO-3 gather weights in lockstep); `valid` trims the pad."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int, rank: int):
        self.per_rank = math.ceil(num_samples / world_size) if num_samples else 0
        start = rank * self.per_rank
        idx = np.arange(start, start + self.per_rank)
        self.valid = idx < num_samples
        self.indices = np.minimum(idx, max(num_samples - 1, 0))
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(0, self.per_rank, self.batch_size):
            yield BatchIndices(self.indices[s : s + self.batch_size].tolist())

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def gathered_mask(self) -> torch.Tensor:
        """Validity of each row after an all-gather in rank order (row j is sample j)."""
        return torch.arange(self.per_rank * self.world_size) < self.num_samples


def build_loader(dataset: Dataset, sampler: Sampler, kwargs: dict[str, Any], seed: int | None = None,
                 collate: Callable[[list[Any]], Any] | None = None) -> DataLoader:  # fmt: skip
    """A DataLoader over `sampler`'s index lists. With `seed` (training), batches are fetched under
    seeded RNGs (SeededFetch; in-memory columns draw nothing and need none) and the loader's own
    draws (worker base seeds) come from a generator of its own, not from the global RNG. With
    `collate` (the recipe's), samples are fetched one by one and it makes the batch."""
    if collate is not None:
        dataset, kwargs = PerSample(dataset), {**kwargs, "collate_fn": collate}
    if seed is None:
        return DataLoader(dataset, batch_sampler=sampler, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    fetched = dataset if isinstance(dataset, ArrayDataset) else SeededFetch(dataset)
    return DataLoader(fetched, batch_sampler=sampler, generator=generator, **kwargs)


def move_to(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, non_blocking) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    if torch.is_tensor(batch):
        return len(batch)
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0])
    raise TypeError(f"cannot tell the batch size of {type(batch).__name__}")
