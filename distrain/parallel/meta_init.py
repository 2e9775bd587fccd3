"""Sharded construction: the model is built on the meta device, then each rank materialises only its shards.

`build_model` runs the recipe's build_model under a dispatch mode that makes every CPU allocation on
the meta device instead and records every tensor operation the constructor performs (allocations,
`reset_parameters`' random draws, a `deepcopy` of a layer, a copy from pretrained weights...), keyed
by the storage each operation reads and writes. No memory is allocated for the model. There is no
`torch.device("meta")` context: a constructor that asks for the default device (transformers skips
its weight init under a meta context) sees the CPU, as in an eager build. After the backend has sharded the meta model
(FSDP2's fully_shard), `Deferred.materialise` allocates this rank's shards (`to_empty`) and replays
the record on CPU in its order from the random state the eager build would have started from: the
same operations on the same random stream give bitwise the eager build's values. Each storage is
freed after its last use in the record; a parameter's or buffer's is first copied, only this rank's
slice, into the live tensor. Peak memory is the record's largest set of storages alive together
(typically one module's), not the model: a storage that an operation later overwrites whole (a
module's own init, then a model-wide re-init) is freed before the overwrite and allocated anew.

A constructor the record cannot replay exactly falls back to the eager build, with the reason in the
plan: random numbers drawn on a real device during construction (their order against the replayed
draws would change), a tensor the record never saw created, a meta tensor kept outside the module's
parameters and buffers, or an operation that fails on meta (one that reads values, e.g. `.item()`).
What the record cannot see is Python control flow on a tensor's device: a constructor that branches
on `p.is_meta` must not be built this way (parallel.fsdp_meta_init=false).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from distrain.errors import DistrainError, LaunchError

META = torch.device("meta")


@dataclasses.dataclass(frozen=True)
class _View:
    """A tensor of the record: which storage, and how it views it."""

    key: int  # the meta storage's address, unique while the record keeps one tensor of it alive
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    nbytes: int  # the storage's size when the operation ran

    def whole(self) -> bool:
        """Whether the view covers its storage exactly, contiguously (an overwrite through it leaves nothing)."""
        if self.offset or math.prod(self.size) * self.dtype.itemsize != self.nbytes:
            return False
        expected = 1
        for size, stride in zip(reversed(self.size), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclasses.dataclass(frozen=True)
class _Op:
    func: Any  # the aten OpOverload
    inputs: list[Any]  # flattened (args, kwargs): _View, real tensors (constants) or plain values
    spec: Any  # tree_unflatten's spec of the inputs
    outputs: list[Any]  # flattened results: _View or other values


class _Recorder(TorchDispatchMode):
    """Runs each operation on meta and writes it down, with its tensors as storage views."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []
        self.alive: dict[int, torch.Tensor] = {}  # one meta tensor per storage: addresses are not reused
        self.problem: str | None = None

    def view(self, t: torch.Tensor, created: bool) -> _View:
        key = t.untyped_storage()._cdata
        if key not in self.alive:
            if not created and self.problem is None:
                self.problem = f"a meta tensor of shape {list(t.shape)} was not created under the record"
            self.alive[key] = t
        return _View(key, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, t.untyped_storage().nbytes())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _READING:  # real_reads(): real tensors read from a file, constants to the record
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        run = kwargs
        tensors_in = [x for x in flat if isinstance(x, torch.Tensor)]
        if (not tensors_in or any(t.is_meta for t in tensors_in)) and _makes_cpu_tensor(func, kwargs):
            # A tensor asked on CPU (an allocation, a `.to("cpu")`), where the eager build makes it: made on meta.
            run = {**kwargs, "device": META}
        out = func(*args, **run)
        flat_out, _ = tree_flatten(out)
        tensors = [x for x in (*flat, *flat_out) if isinstance(x, torch.Tensor)]
        if not any(t.is_meta for t in tensors):
            # A real operation (a constant, reading pretrained weights): it ran; random draws on a real
            # device would be out of order against the replayed ones.
            if torch.Tag.nondeterministic_seeded in func.tags and self.problem is None:
                self.problem = f"{func.__name__} drew random numbers on a real device during construction"
            return out
        inputs = [self.view(x, created=False) if isinstance(x, torch.Tensor) and x.is_meta else x for x in flat]
        outputs = [self.view(x, created=True) if isinstance(x, torch.Tensor) and x.is_meta else None
                   for x in flat_out]  # fmt: skip
        self.ops.append(_Op(func, inputs, spec, outputs))
        return out


_READING: list[bool] = []  # non-empty inside real_reads()


@contextlib.contextmanager
def real_reads() -> Iterator[None]:
    """Around reading tensors from a file (pretrained weights) inside build_model: the reader's own
    allocations stay real CPU tensors, which the record then holds as constants."""
    _READING.append(True)
    try:
        yield
    finally:
        _READING.pop()


def _makes_cpu_tensor(func: Any, kwargs: dict[str, Any]) -> bool:
    """A factory operation (one with a device argument) asked for the default device or the CPU."""
    if not any(a.name == "device" for a in func._schema.arguments):
        return False
    device = kwargs.get("device")
    return device is None or torch.device(device).type == "cpu"


def _unregistered_meta(model: torch.nn.Module) -> str | None:
    """A meta tensor a module holds outside its parameters and buffers: to_empty would leave it on meta."""
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                return f"{name or type(module).__name__}.{attr} is a tensor that is neither a parameter nor a buffer"
    return None


@dataclasses.dataclass
class Construction:
    """What build_model gave: the model, on meta when `deferred` is set, and why not where it was asked."""

    model: torch.nn.Module
    deferred: Deferred | None
    fallback: str  # the reason for an eager build where meta construction was asked; "" otherwise

    def note(self) -> str:
        """The plan line: how the model was built ("" where meta construction was not asked for)."""
        if self.deferred is not None:
            return self.deferred.describe()
        return f"eager (every rank builds the whole model): {self.fallback}" if self.fallback else ""


class Deferred:
    """The record of a meta construction, replayed once by `materialise`."""

    def __init__(self, recorder: _Recorder, model: torch.nn.Module, cpu_rng: torch.Tensor):
        self.ops = recorder.ops
        self.keep = recorder.alive
        self.cpu_rng = cpu_rng
        self.finals: dict[str, _View] = {}  # parameter or buffer name -> the storage view it ends as
        self.constants: dict[str, torch.Tensor] = {}  # the parameters and buffers built on a real device
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if t.is_meta:
                self.finals[name] = recorder.view(t, created=False)
            else:  # made by real operations only (torch.tensor(2.0), from_numpy): the value is already there
                self.constants[name] = t.detach()  # an alias: to_empty swaps the parameter's own storage
        self.peak_bytes = 0  # the most bytes of replayed storages alive at once, known after materialise
        self.total_bytes = sum(math.prod(v.size) * v.dtype.itemsize for v in self.finals.values())

    def materialise(self, model: torch.nn.Module, device: torch.device,
                    param_device: torch.device | None = None) -> None:  # fmt: skip
        """Allocate `model`'s tensors (this rank's shards of sharded parameters) on `device` (parameters on
        `param_device` when given: FSDP2's CPU offload) and fill them with the eager build's values."""
        param_device = param_device or device
        model.to_empty(device=param_device)
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update(model.named_buffers(remove_duplicate=False))
        missing = sorted({*self.finals, *self.constants} - set(targets))
        if missing:
            raise LaunchError(f"meta construction: the sharded model lacks {missing[0]}, which the record built")
        by_key: dict[int, list[str]] = {}
        for name, v in self.finals.items():
            by_key.setdefault(v.key, []).append(name)
        ending, fresh, last = _schedule(self.ops)
        never = [name for key, names in by_key.items() if key not in last for name in names]
        if never:
            raise LaunchError(f"meta construction: no recorded operation created {never[0]}")

        state = torch.get_rng_state()
        torch.set_rng_state(self.cpu_rng)  # the eager build's starting point; its end state is left behind
        real: dict[int, torch.UntypedStorage] = {}
        live = 0
        try:
            with torch.no_grad():
                for i, op in enumerate(self.ops):
                    for key, nbytes in fresh.get(i, ()):  # overwritten whole: a new storage, the old one is gone
                        real[key] = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
                        live += nbytes
                    args, kwargs = tree_unflatten([_real(x, real) for x in op.inputs], op.spec)
                    out = op.func(*args, **kwargs)
                    for view, got in zip(op.outputs, tree_flatten(out)[0], strict=True):
                        if view is not None and view.key not in real:
                            real[view.key] = got.untyped_storage()
                            live += real[view.key].nbytes()
                    self.peak_bytes = max(self.peak_bytes, live)
                    for key in ending.get(i, ()):
                        storage = real.pop(key, None)
                        if storage is None:
                            continue
                        if last[key] == i:  # its final value: this rank's part goes into the model
                            for name in by_key.get(key, ()):
                                _fill(targets[name], _real(self.finals[name], {key: storage}), name)
                        live -= storage.nbytes()
                for name, value in self.constants.items():
                    _fill(targets[name], value, name)
        except Exception:
            torch.set_rng_state(state)
            raise
        self.ops, self.keep, self.constants = [], {}, {}  # the record's constants are freed with it
        if param_device != device:  # buffers live where the computation runs, as with an eager build
            for name, buffer in list(model.named_buffers()):
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, buffer.to(device))

    def describe(self) -> str:
        peak = f"; replaying its construction held at most {_size(self.peak_bytes)} at once" if self.peak_bytes else ""
        return f"meta: each rank materialised only its shards of the {_size(self.total_bytes)} model{peak}"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


# In-place operations that write every element of their first argument without reading it.
_OVERWRITES = {"uniform_", "normal_", "fill_", "zero_", "copy_", "bernoulli_", "random_", "exponential_",
               "geometric_", "cauchy_", "log_normal_"}  # fmt: skip


def _schedule(ops: list[_Op]) -> tuple[dict[int, list[int]], dict[int, list[tuple[int, int]]], dict[int, int]]:
    """When each storage is freed and allocated again during the replay: (op index -> keys to free after it,
    op index -> (key, bytes) to allocate before it, key -> its last op).

    A storage lives from its creation to its last use, except where an operation overwrites it whole
    (a module's own init, then a model-wide re-init; random init, then pretrained weights copied in):
    the values before that are never read again, so the storage is freed after its last use before
    the overwrite and allocated anew for it. The overwritten values are still computed (their random
    draws keep the stream in step), into a storage that is freed right away.
    """
    refs: dict[int, list[int]] = {}
    whole_writes: dict[int, set[int]] = {}
    for i, op in enumerate(ops):
        views = [x for x in (*op.inputs, *op.outputs) if isinstance(x, _View)]
        for v in views:
            if not refs.setdefault(v.key, []) or refs[v.key][-1] != i:
                refs[v.key].append(i)
        first = op.inputs[0] if op.inputs else None
        name = op.func.overloadpacket.__name__
        if (name in _OVERWRITES and isinstance(first, _View) and first.whole()
                and sum(isinstance(x, _View) and x.key == first.key for x in op.inputs) == 1):  # copy_(x, x) reads x
            whole_writes.setdefault(i, set()).add(first.key)
    ending: dict[int, list[int]] = {}
    fresh: dict[int, list[tuple[int, int]]] = {}
    for key, uses in refs.items():
        for i, j in zip(uses, [*uses[1:], None]):
            if j is None or key in whole_writes.get(j, ()):
                ending.setdefault(i, []).append(key)
            if j is not None and key in whole_writes.get(j, ()):
                nbytes = next(x.nbytes for x in ops[j].inputs if isinstance(x, _View) and x.key == key)
                fresh.setdefault(j, []).append((key, nbytes))
    return ending, fresh, {key: uses[-1] for key, uses in refs.items()}


def _real(x: Any, real: dict[int, torch.UntypedStorage]) -> Any:
    """A recorded input as a real CPU value: a view of its replayed storage, a device on CPU."""
    if isinstance(x, _View):
        return torch.empty(0, dtype=x.dtype).set_(real[x.key], x.offset, x.size, x.stride)
    if isinstance(x, torch.device) and x.type == "meta":
        return torch.device("cpu")
    return x


def _fill(target: torch.Tensor, full: torch.Tensor, name: str) -> None:
    """Copy this rank's part of `full` into `target` (a DTensor shard, or a whole tensor)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(target, DTensor):
        mesh, local = target.device_mesh, full
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise LaunchError(f"meta construction: this rank is not in the mesh of {name}")
        for dim, placement in enumerate(target.placements):
            if isinstance(placement, Shard):  # torch.chunk's split, as DTensor and FSDP2 shard (empty at the end)
                chunks = torch.chunk(local, mesh.size(dim), dim=placement.dim)
                c = coordinate[dim]
                local = chunks[c] if c < len(chunks) else local.narrow(placement.dim, 0, 0)
            elif not isinstance(placement, Replicate):
                raise LaunchError(f"meta construction: {name} is placed as {placement}, which it cannot fill")
        dest = target.to_local()
    else:
        local, dest = full, target
    if dest.shape != local.shape:
        raise LaunchError(f"meta construction: {name}'s local part is {list(dest.shape)}, the record gives "
                          f"{list(local.shape)}")  # fmt: skip
    with torch.no_grad():
        dest.copy_(local)


def build_model(build: Callable[[], torch.nn.Module], on_meta: bool) -> Construction:
    """build() eagerly, or on meta with a record to materialise it from (`on_meta`), falling back to the
    eager build, with the reason in the note, where the record could not replay the constructor exactly."""
    if not on_meta:
        return Construction(build(), None, "")
    cpu_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    recorder = _Recorder()
    try:
        # No torch.device("meta") context: a constructor that asks for the default device sees the CPU.
        with recorder, warnings.catch_warnings():
            # load_state_dict's copy into a meta parameter does nothing now, but the record replays it
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            model = build()
        deferred = Deferred(recorder, model, cpu_rng)  # names each parameter's storage: an unknown one is a problem
        problem = recorder.problem or _unregistered_meta(model)
        real = {t.device.type for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
        if problem is None and real - {"cpu"}:  # where the eager build would have put them too
            problem = f"build_model put tensors on {', '.join(sorted(real - {'cpu'}))}"
        if problem is None and any(isinstance(x, torch.Generator) for op in recorder.ops for x in op.inputs):
            problem = "build_model draws from its own torch.Generator"  # its state at replay is not the build's
    except DistrainError:
        raise  # the recipe's own error (a model.* setting that does not fit): the eager build says the same
    except Exception as e:  # an operation meta cannot run (one that reads values): build eagerly
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        problem = f"build_model fails on the meta device ({type(e).__name__}{': ' + message if message else ''})"
    if problem is not None:
        torch.set_rng_state(cpu_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        return Construction(build(), None, problem)
    return Construction(model, deferred, "")
