"""DeepSpeed ZeRO-1/2/3 through accelerate, with its config filled from distrain's own."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from accelerate import Accelerator

from distrain.config import Config
from distrain.errors import ConfigError, LaunchError
from distrain.parallel.base import LOW_PRECISION, Backend, dtype_name
from distrain.parallel.launch import ParallelPlan
from distrain.train.memory import trim_heap


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO 1/2/3 through accelerate, with distrain's own optimizer and LR schedule.

    distrain fills the DeepSpeed config's "auto" fields (micro batch, accumulation, train
    batch, clipping, precision) from its config; a value a user JSON sets that contradicts
    distrain's is an error naming both. The optimizer is distrain's torch optimizer (DeepSpeed's
    client optimizer, also when the optimizer state is offloaded), and the LR
    schedule is distrain's, stepped once per optimizer step. The engine reduces, clips and
    steps in one call, made at `step`; a step distrain skips still makes that call, with the
    update withheld (see UpdateGate), so the engine's bookkeeping stays its own.
    """

    def __init__(self, accelerator: Accelerator, cfg: Config, shard_blocks: tuple[str, ...] = (),
                 plan: ParallelPlan | None = None, micro_batch: int | None = None,
                 grad_accum: int | None = None):  # fmt: skip
        super().__init__(accelerator, cfg, shard_blocks, plan)
        plugin = accelerator.state.deepspeed_plugin
        self.ds_config: dict[str, Any] = plugin.deepspeed_config
        fill_deepspeed_config(self.ds_config, cfg, self.world_size, self.parallel.deepspeed_config,
                              micro_batch=micro_batch, grad_accum=grad_accum)  # fmt: skip
        self.micro_batch = int(self.ds_config["train_micro_batch_size_per_gpu"])
        self.grad_accum = int(self.ds_config["gradient_accumulation_steps"])
        self.stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.name = f"deepspeed_zero{self.stage}"
        zero = self.ds_config.get("zero_optimization", {})
        self.offload_optimizer = str(zero.get("offload_optimizer", {}).get("device", "none")).lower()
        self.offload_param = str(zero.get("offload_param", {}).get("device", "none")).lower()
        self.engine: Any = None  # the DeepSpeedEngine, for checkpointing
        self.gate: UpdateGate | None = None
        self._spans: tuple[tuple[int, ...], dict[int, tuple[tuple[int, int, int], ...]]] | None = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        if self.offload_optimizer in ("cpu", "nvme"):
            # distrain's torch optimizer steps the offloaded fp32 copy. DeepSpeedCPUAdam would be
            # faster on large models, but with the same hyper-parameters it gave 2% different
            # losses after one step here, and "the numbers do not change" comes first.
            self.ds_config["zero_force_ds_cpu_optimizer"] = False
        low = LOW_PRECISION.get(self.cfg.precision)
        if low is not None:  # the engine holds low-precision weights and does not autocast: cast inputs
            model.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=low), with_kwargs=True)
        size_buckets(self.ds_config.setdefault("zero_optimization", {}), model)
        engine, optimizer = self.accelerator.prepare(model, optimizer)
        self.engine = engine
        if self.stage == 3:
            self._share_master_partitions()
        if self.accelerator.device.type == "cpu":
            trim_heap()  # the whole parameters the engine replaced by its partitions
        self.gate = UpdateGate(getattr(engine.optimizer, "optimizer", engine.optimizer), self.accelerator.device)
        return engine, optimizer

    def _share_master_partitions(self) -> None:
        """ZeRO-3 whose working partitions are already fp32 on the optimizer's device: let them be the
        master partitions, as DeepSpeed means to (stage3 `_create_fp32_partitions`: "we don't need another
        copy of the weights"), instead of the clone it makes because it compares a torch.device with the
        string "cpu" (never equal). The values are the same; only the second copy (4 B per parameter /
        processes) goes. Before the first step only: no optimizer state is keyed by the clones yet."""
        zero = self.engine.optimizer
        working = getattr(zero, "fp16_partitioned_groups_flat", None)
        master = getattr(zero, "fp32_partitioned_groups_flat", None)
        if self.offload_optimizer not in ("none", "") or not working or not master or zero.optimizer.state:
            return
        for i, (w, m) in enumerate(zip(working, master, strict=True)):
            if w is None or w is m or w.dtype != m.dtype or w.device != m.device or w.shape != m.shape:
                continue
            if m.grad is not None or not torch.equal(w, m):
                continue
            w.ds_id, w.requires_grad = m.ds_id, m.requires_grad
            master[i] = w

    def verify(self, model: torch.nn.Module) -> None:
        from deepspeed import DeepSpeedEngine

        if not isinstance(model, DeepSpeedEngine):
            raise LaunchError(f"DeepSpeed was asked for but the model is a {type(model).__name__}, not an engine")
        stage = model.zero_optimization_stage()
        if stage != self.stage:
            raise LaunchError(f"DeepSpeed ZeRO stage {self.stage} was asked for but the engine runs stage {stage}")
        if model.dp_world_size != self.world_size:
            raise LaunchError(f"DeepSpeed data-parallel size {model.dp_world_size} != {self.world_size} processes")
        engine_batch = (model.train_micro_batch_size_per_gpu(), model.gradient_accumulation_steps())
        if engine_batch != (self.micro_batch, self.grad_accum):
            raise LaunchError(
                f"DeepSpeed runs micro-batch {engine_batch[0]} x accumulation {engine_batch[1]} but distrain "
                f"planned {self.micro_batch} x {self.grad_accum}"
            )

    def sync_context(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        # The engine reduces gradients only at the boundary; distrain marks it itself and steps once.
        model.set_gradient_accumulation_boundary(sync)  # type: ignore[operator]
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # distrain's loss factor already divides by the step's global sample count.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, model: torch.nn.Module, optimizer: Any, clip_norm: float,
             loss_finite: bool) -> tuple[torch.Tensor, bool]:  # fmt: skip
        """The engine reduces, clips (gradient_clipping = train.clip_norm) and steps in one call; the
        update is withheld when the loss is non-finite or the gradients DeepSpeed hands the optimizer
        are. DeepSpeed skips a non-finite gradient norm itself (its overflow path); both leave weights
        and optimizer state untouched and the engine's gradient buffers cleared. The engine clips to
        the gradient_clipping it was built with, train.clip_norm at start (clip_norm is that value)."""
        assert self.gate is not None, "prepare() first"
        self.gate.arm(loss_finite)
        try:
            self.engine.step()
        finally:
            withheld = self.gate.disarm()
        optimizer.step()  # accelerate's wrapper: a no-op that tells the LR schedule a step happened
        norm = self.engine.get_global_grad_norm()
        applied = not withheld and bool(self.engine.was_step_applied())
        return torch.as_tensor(float("nan") if norm is None else float(norm)), applied

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """fp32 master weights gathered from the ZeRO partitions tensor by tensor onto rank 0 (every rank
        must call it; the others get {} and hold one gathered tensor at a time)."""
        import torch.distributed as dist
        from deepspeed.utils import safe_get_full_fp32_param

        keep = not dist.is_initialized() or dist.get_rank() == 0
        out = {}
        for name, t in self.unwrap(model).state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(t) if isinstance(t, torch.nn.Parameter) else None
            if keep:
                out[name] = (full if full is not None else t).detach().to("cpu", copy=True)
            del full  # before the next tensor is gathered
        return out

    def local_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Copies of this rank's fp32 master partitions (flat) and the buffers: its share of the model."""
        from distrain.checkpoint.layout import FlatShard

        parts = self._model_parts(self.unwrap(model))
        return {k: (v.local if isinstance(v, FlatShard) else v).detach().clone() for k, v in parts.items()}

    def load_local_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from distrain.checkpoint.layout import FlatShard

        module = self.unwrap(model)
        with torch.no_grad():
            for name, live in self._model_parts(module).items():
                (live.local if isinstance(live, FlatShard) else live).copy_(state[name])
        self._refresh_working_weights(module)

    # -- checkpoints: each rank saves and loads only its own partition of the fp32 master weights and
    # the optimizer state (FlatShards, views of the live partitions); the index maps every rank's part
    # onto the full tensors, so ZeRO checkpoints load under any backend and world size, and back.
    def _named_groups(self, module: torch.nn.Module) -> list[list[str]]:
        names = {id(p): n for n, p in module.named_parameters()}
        zero = self.engine.optimizer
        groups = getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", None)
        if groups is None:
            raise ConfigError(f"checkpoints under DeepSpeed ZeRO-{self.stage} with this optimizer are not supported")
        if self.stage != 3:
            return [[names[id(p)] for p in g] for g in groups]
        # ZeRO-3 splits each optimizer group into sub-groups (sub_group_size), in the group's order
        out: list[list[str]] = [[] for _ in zero.optimizer.param_groups]
        for i, g in enumerate(groups):
            out[zero.sub_group_to_group_id[i]] += [names[id(p)] for p in g]
        return out

    def _linked_optimizer_state(self) -> torch.optim.Optimizer:
        """The torch optimizer stepping the fp32 partitions, with its state created and linked to the
        parameters (ZeRO-1/2 link lazily and can miss state that torch creates at the first step)."""
        base = self.engine.optimizer.optimizer
        zero = self.engine.optimizer
        if self.stage == 3:  # groups hold their fp32 partition only while ZeRO-3 steps; same zero step per group
            for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
                if base.state.get(flat):
                    continue
                group = base.param_groups[zero.sub_group_to_group_id[i]]
                params, lr = group["params"], group["lr"]
                group["params"], group["lr"], flat.grad = [flat], 0.0, torch.zeros_like(flat)
                base.step()
                group["params"], group["lr"], flat.grad = params, lr, None
        elif not base.state:  # not stepped yet: create the state with a zero-lr, zero-grad step (as DCP does)
            lrs = [g["lr"] for g in base.param_groups]
            for g in base.param_groups:
                g["lr"] = 0.0
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            base.step()
            for g, lr in zip(base.param_groups, lrs, strict=True):
                g["lr"] = lr
                for p in g["params"]:
                    p.grad = None
        if hasattr(self.engine.optimizer, "_hp_optimizer_states_linked"):
            self.engine.optimizer._hp_optimizer_states_linked = False
            self.engine.optimizer._lazy_init_hp_params_optimizer_state()
        return base

    def _partitioned(self, p: torch.Tensor) -> bool:
        """Whether ZeRO keeps an fp32 partition of p (ZeRO-1/2 leave parameters without a gradient whole)."""
        return (getattr(p, "requires_grad", False) and hasattr(p, "ds_tensor")) if self.stage == 3 else (
            hasattr(p, "_hp_mapping"))  # fmt: skip

    def _flat_part(self, p: torch.nn.Parameter, key: str | None = None) -> tuple[torch.Tensor, int]:
        """This rank's part of p's fp32 master weights (key None) or optimizer state `key`: a flat view of
        the live partition without padding, and where it starts in p flattened."""
        zero = self.engine.optimizer
        if self.stage == 3:  # rank r holds elements [r n, (r + 1) n) of p flattened and padded to a multiple of n
            if not self._partitioned(p):  # no fp32 copy: the working partition itself
                part = p.ds_tensor.data.view(-1)  # type: ignore[attr-defined]
            else:
                part, _ = zero._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
                part = part.view(-1)
            n = part.numel()
            start = n * zero._get_param_partition_rank(p)
            return part[: max(0, min(n, p.ds_numel - start))], min(start, p.ds_numel)  # type: ignore[attr-defined]
        mapping = p._hp_mapping  # type: ignore[attr-defined]  # DeepSpeed's link of p to its fp32 fragment
        if mapping is None:  # none of p lies in this rank's partition
            return torch.empty(0, dtype=torch.float32, device=self.accelerator.device), 0
        return mapping.get_hp_fragment(key).view(-1), int(mapping.lp_fragment_address.start)

    def _param_spans(self, params: list[torch.nn.Parameter]) -> dict[int, tuple[tuple[int, int, int], ...]]:
        """id(p) -> (rank, start, numel) of every rank's part of p, for the partitioned parameters: one
        all-gather of every rank's starts and sizes, once (ZeRO's partitioning is fixed at prepare)."""
        import torch.distributed as dist

        from distrain.checkpoint.collective import collective_device

        params = [p for p in params if self._partitioned(p)]
        key = tuple(id(p) for p in params)
        if self._spans is not None and self._spans[0] == key:
            return self._spans[1]
        words = [0]  # never empty: gloo gathers no empty tensors
        for p in params:
            local, start = self._flat_part(p)
            words += [start, local.numel()]
        mine = torch.tensor(words, dtype=torch.int64)
        rows = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            mine = mine.to(collective_device())
            rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, mine)
        table = [row.tolist() for row in rows]
        spans = {id(p): tuple((r, row[1 + 2 * i], row[2 + 2 * i]) for r, row in enumerate(table) if row[2 + 2 * i])
                 for i, p in enumerate(params)}  # fmt: skip
        self._spans = (key, spans)
        return spans

    def _model_parts(self, module: torch.nn.Module) -> dict[str, Any]:
        """The model state as this rank holds it for checkpoints: a FlatShard of the fp32 master weights
        per partitioned parameter, the live tensor for anything else (buffers, whole parameters)."""
        from distrain.checkpoint.layout import FlatShard

        state = module.state_dict(keep_vars=True)
        spans = self._param_spans(list(dict(module.named_parameters()).values()))
        out: dict[str, Any] = {}
        for name, t in state.items():
            if id(t) in spans:
                local, start = self._flat_part(t)
                out[name] = FlatShard(local, tuple(getattr(t, "ds_shape", t.shape)), start, spans[id(t)])
            else:
                out[name] = t
        return out

    def _refresh_working_weights(self, module: torch.nn.Module) -> None:
        """After the fp32 master partitions changed: the weights the forward uses from them (ZeRO-1/2:
        every rank's partition all-gathered into the whole working copy; ZeRO-3: this rank's partition)."""
        zero = self.engine.optimizer
        if self.stage != 3:
            zero.update_lp_params()
            return
        # As DeepSpeed's own checkpoint loading does: release every gathered parameter first (the
        # persistent ones stay gathered after a forward and would keep their old values), write the
        # partitions, then gather the persistent ones again from them.
        zero.checkpoint_event_prologue()
        with torch.no_grad():
            for p in dict(module.named_parameters()).values():
                if self._partitioned(p):
                    local, _ = self._flat_part(p)
                    p.ds_tensor.data.view(-1)[: local.numel()].copy_(local)  # type: ignore[attr-defined]
        zero.checkpoint_event_epilogue()

    def checkpoint_state(self, model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        from distrain.checkpoint.layout import FlatShard

        module = self.unwrap(model)
        base = self._linked_optimizer_state()
        model_state = self._model_parts(module)
        spans = self._param_spans(list(dict(module.named_parameters()).values()))
        steps = [float(s["step"]) for s in base.state.values() if "step" in s]
        keys = sorted({k for s in base.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)})
        state: dict[str, dict[str, Any]] = {}
        for name, p in module.named_parameters():
            if id(p) not in spans:  # not partitioned: no optimizer state (it gets no gradient)
                continue
            shape = tuple(getattr(p, "ds_shape", p.shape))
            entries: dict[str, Any] = {}
            for k in keys:
                local, start = self._flat_part(p, k)
                entries[k] = FlatShard(local, shape, start, spans[id(p)])
            if entries and steps:
                entries["step"] = torch.tensor(max(steps))
            if entries:
                state[name] = entries
        named = self._named_groups(module)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names}
                  for g, names in zip(self.engine.optimizer.param_groups, named, strict=True)]  # fmt: skip
        return model_state, {"state": state, "param_groups": groups}

    def load_checkpoint_state(self, model: torch.nn.Module, optimizer: Any, model_state: dict[str, Any],
                              optim_state: dict[str, Any] | None) -> None:  # fmt: skip
        """Values laid out like checkpoint_state's (loading fills its FlatShards in place: nothing to copy
        then) into the fp32 partitions and optimizer state; then the working weights from them."""
        module = self.unwrap(model)
        live_model, live_optim = self.checkpoint_state(model, optimizer)
        with torch.no_grad():
            for name, live in live_model.items():
                _set_part(live, model_state[name])
            if optim_state is not None:
                for name, entries in live_optim["state"].items():
                    saved = optim_state["state"].get(name, {})
                    for key, live in entries.items():
                        if key != "step" and key in saved:
                            _set_part(live, saved[key])
        self._refresh_working_weights(module)
        if optim_state is None:
            return
        steps = [float(e["step"]) for e in optim_state["state"].values() if "step" in e]
        for s in self.engine.optimizer.optimizer.state.values():
            if "step" in s and steps:
                s["step"] = torch.full_like(s["step"], max(steps)) if torch.is_tensor(s["step"]) else int(max(steps))
        for group, saved in zip(self.engine.optimizer.param_groups, optim_state["param_groups"], strict=False):
            group.update({k: v for k, v in saved.items() if k != "params" and k in group})

    def plan(self, model: torch.nn.Module) -> list[tuple[str, str]]:
        module = self.unwrap(model)
        total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        what = {0: "nothing (DDP-like)", 1: "optimizer state", 2: "optimizer state + gradients",
                3: "optimizer state + gradients + parameters"}[self.stage]  # fmt: skip
        per_rank = (
            f"{sum(p.ds_tensor.numel() for p in module.parameters()):,} (params partitioned)"
            if self.stage == 3 else f"{total:,} params (optimizer state: ~{total // self.world_size:,})"
        )
        weights = dtype_name(LOW_PRECISION.get(self.cfg.precision, torch.float32))
        offload = [f"{w} -> {d}" for w, d in (("optimizer", self.offload_optimizer), ("params", self.offload_param))
                   if d not in ("none", "")]  # fmt: skip
        e = self.engine
        return [
            ("sharding", f"DeepSpeed ZeRO-{self.stage}: {what} partitioned over {self.world_size} ranks"),
            ("params per rank", per_rank),
            ("ds batch", f"train_micro_batch_size_per_gpu {e.train_micro_batch_size_per_gpu()}, "
             f"gradient_accumulation_steps {e.gradient_accumulation_steps()}, train_batch_size {e.train_batch_size()}"),
            ("ds precision", f"params {weights}, master weights fp32, clip {self.ds_config.get('gradient_clipping')}"
             + (f", offload {', '.join(offload)}" if offload else "")),
        ]


class UpdateGate:
    """Withholds, when told to, the update of the torch optimizer DeepSpeed steps inside engine.step().

    engine.step() reduces the gradients, computes the global norm, clips, steps the optimizer on
    the fp32 partitions, copies them to the working weights and clears its gradient buffers, all
    in one call. A skipped step still makes the call, so the engine's counters and buffers stay
    consistent; the optimizer's pre-step hook then empties its parameter groups for that step (a
    torch optimizer steps only the parameters it is given) and the post-step hook restores them:
    weights and optimizer state do not change. The gate also closes, on every rank, when any
    rank's gradients are non-finite: DeepSpeed versions and settings that do not skip those
    themselves (bf16 without check_grad_overflow) would otherwise apply them. That check runs per
    parameter group, as DeepSpeed steps them; the DeepSpeed installed here skips such steps first.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.device = device
        self.armed = False  # only inside DeepSpeedBackend.step: other optimizer.step() calls pass untouched
        self.loss_finite = True
        self.withheld = False
        self._hidden: list[list[torch.Tensor]] = []
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def arm(self, loss_finite: bool) -> None:
        self.armed, self.loss_finite, self.withheld = True, loss_finite, False

    def disarm(self) -> bool:
        """End the step; True when its update was withheld."""
        self.armed = False
        return self.withheld

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.armed or (self.loss_finite and self._grads_finite(optimizer)):
            return
        self.withheld = True
        self._hidden = [group["params"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["params"] = []

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._hidden:
            return
        for group, params in zip(optimizer.param_groups, self._hidden, strict=True):
            group["params"] = params
        self._hidden = []

    def _grads_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether the gradients about to be applied are finite on every rank (DeepSpeed calls the
        optimizer once per parameter group or sub-group, the same number of times on every rank)."""
        import torch.distributed as dist

        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        ok = torch.ones((), device=self.device)
        for g in grads:
            ok = ok * torch.isfinite(g).all().to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)


def _set_part(live: Any, value: Any) -> None:
    """Copy a saved value into a live checkpoint_state entry: a FlatShard (from a FlatShard, or its run
    of a full tensor) or a plain tensor; nothing when the value is the live tensor itself."""
    from distrain.checkpoint.layout import FlatShard

    if isinstance(live, FlatShard):
        src = value.local if isinstance(value, FlatShard) else value.flatten()[live.start :][: live.local.numel()]
        if src.data_ptr() != live.local.data_ptr() or src.numel() != live.local.numel():
            live.local.copy_(src)
    elif value is not live:
        live.copy_(value)


def size_buckets(zero: dict[str, Any], model: torch.nn.Module) -> None:
    """Size the communication buckets the DeepSpeed config leaves unset or "auto" from the model, in place.

    DeepSpeed's defaults are 5e8 elements (a 2 GB fp32 buffer per bucket) whatever the model, and
    accelerate fills "auto" only from a transformers `config.hidden_size` (hidden^2); the largest
    parameter is that size for a transformer and exists for any model. Bucketing changes only how
    the elementwise reductions are grouped, not their results; ZeRO-3's sub-groups also group the
    gradient norm's sum of squares (a model of at most 2^20 elements per rank keeps one group).
    """
    largest = max((p.numel() for p in model.parameters()), default=1)
    size = min(int(5e8), max(largest, 1 << 20))
    # ZeRO-3 steps the optimizer one sub-group at a time: DeepSpeed's default of 1e9 elements makes
    # the whole partition one group, whose optimizer temporaries (AdamW's denominator, the overflow
    # checks) are then as large as the partition itself. Its defaults of 1e9 live and 1e9 reuse
    # distance keep every parameter a forward gathers until the backward: the whole model per rank.
    wanted = {"reduce_bucket_size": size, "allgather_bucket_size": size, "stage3_prefetch_bucket_size": int(0.9 * size),
              "sub_group_size": size, "stage3_max_live_parameters": 3 * size,
              "stage3_max_reuse_distance": size}  # fmt: skip
    for key, value in wanted.items():
        if zero.get(key, "auto") in ("auto", None):
            zero[key] = value
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = 10 * math.isqrt(size)


def fill_deepspeed_config(ds: dict[str, Any], cfg: Config, world_size: int, source: str | None = None,
                          micro_batch: int | None = None, grad_accum: int | None = None) -> None:  # fmt: skip
    """Fill DeepSpeed's "auto" (or missing) fields from distrain's config, in place.

    A concrete value that contradicts distrain's is a ConfigError naming both (one source of
    truth: pitfalls item 7). `source` names the user's JSON in the message. micro_batch and
    grad_accum are the resolved plan (what data.batch_size=auto chose); None: as configured.
    """
    where = f"DeepSpeed config {source}" if source and source != "none" else "DeepSpeed config"
    for block, keys in (("optimizer", "optim.*"), ("scheduler", "sched.*")):
        if block in ds:
            raise ConfigError(
                f"{where} has an '{block}' block; distrain builds the {block} from {keys}: remove the block"
            )
    auto = cfg.data.batch_size == "auto"
    if micro_batch is None and auto:
        raise ValueError("data.batch_size=auto: pass the micro-batch and accumulation distrain chose")
    micro = int(cfg.data.batch_size) if micro_batch is None else int(micro_batch)
    accum = cfg.train.grad_accum if grad_accum is None else int(grad_accum)
    chose = " (chosen by data.batch_size=auto)" if auto else ""
    # (DeepSpeed key, value, what distrain has, the setting to change instead)
    wanted: list[tuple[str, Any, str, str]] = [
        ("train_micro_batch_size_per_gpu", micro, f"micro-batch {micro}{chose}" if auto else f"data.batch_size={micro}",
         "data.batch_size"),
        ("gradient_accumulation_steps", accum, f"train.grad_accum={accum!r}{chose}", "train.grad_accum"),
        ("train_batch_size", micro * accum * world_size,
         f"data.batch_size x train.grad_accum x processes={micro * accum * world_size}{chose}", "data.batch_size"),
        ("gradient_clipping", cfg.train.clip_norm, f"train.clip_norm={cfg.train.clip_norm!r}", "train.clip_norm"),
        ("bf16.enabled", cfg.precision == "bf16", f"precision={cfg.precision!r}", "precision"),
        ("fp16.enabled", cfg.precision == "fp16", f"precision={cfg.precision!r}", "precision"),
    ]  # fmt: skip
    for key, value, has, setting in wanted:
        node, leaf = ds, key
        if "." in key:
            head, leaf = key.split(".")
            node = ds.setdefault(head, {})
        current = node.get(leaf, "auto")
        if current == "auto" or current is None:
            node[leaf] = value
        elif _differs(current, value):
            raise ConfigError(
                f"{where} sets {key}={current!r} but distrain has {has}; "
                f'set {key} to "auto" (distrain fills it) or change {setting}'
            )
    if ds["gradient_clipping"] == 0:
        ds["gradient_clipping"] = 0.0  # DeepSpeed: 0 disables clipping, as train.clip_norm=0 does


def _differs(current: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return str(current).lower() != str(value).lower()
    try:
        return float(current) != float(value)
    except (TypeError, ValueError):
        return True


def _cast_inputs(module: torch.nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    from torch.utils._pytree import tree_map

    def cast(x: Any) -> Any:
        return x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x

    return tree_map(cast, args), tree_map(cast, kwargs)

