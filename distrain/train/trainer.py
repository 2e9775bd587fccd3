"""The training loop shared by every recipe: build (__init__), train, train_step, evaluate, and the
trainer's checkpointed state (state_dict / load_state_dict).

The run's life around the loop (run dir, config.yaml, final weights, test split, summary) is
distrain.train.lifecycle's; saving and resuming is the CheckpointManager's (distrain.checkpoint.
manager). Nothing here depends on the backend: the Backend object owns wrapping, sync, backward,
clipping and the optimizer step. The loss of an optimizer step is the sum of its counted loss
terms (per sample, or per token) over all its micro-batches and ranks divided by their global
count, so the gradient equals the big-batch gradient whatever the accumulation, world size or
batch sizes (distrain.recipe's docstring says where the count comes from).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distrain.checkpoint import resume_check
from distrain.checkpoint.format import step_name, versions
from distrain.checkpoint.manager import CheckpointManager
from distrain.checkpoint.resume_check import Decision
from distrain.config import Config
from distrain.errors import ConfigError, Interrupted, TrainingError
from distrain.fault_points import EVAL_STAGE, fault_point
from distrain.observe.log import held_records, setup_logging
from distrain.observe.metrics import MetricsLogger, peak_memory_mb, slurm_info
from distrain.observe.throughput import count_flops, mfu, peak_flops
from distrain.observe.trackers import init_trackers, requested_trackers
from distrain.parallel import meta_init
from distrain.parallel.base import Backend, count_params
from distrain.parallel.launch import build_accelerator, configure_torch, resolve_plan
from distrain.parallel.select import select_backend
from distrain.recipe import INFO_KEY, BoundRecipe, Recipe, StepOutput
from distrain.train import lifecycle, memory, preflight
from distrain.train.data import (
    BatchPlan,
    EpochBatches,
    EvalBatchSampler,
    RankStream,
    StreamBatches,
    TrainBatchSampler,
    as_dataset,
    batch_size_of,
    build_loader,
    is_stream,
    loader_kwargs,
    move_to,
)
from distrain.train.gather import gather_outputs
from distrain.train.optim import build_optimizer, build_scheduler, effective_lr
from distrain.train.rng import seed_step
from distrain.train.signals import InterruptFlag
from distrain.train.state import TrainState
from distrain.train.step import EvalResult, StepResult, Window

log = logging.getLogger("distrain")


class Trainer:
    def __init__(self, cfg: Config, recipe: Recipe):
        self.cfg = cfg
        self.parallel = resolve_plan(cfg)  # the backend and its options, once; written into cfg.parallel
        self.tracker_names = requested_trackers(cfg.log)  # unknown or uninstalled: stops before any write
        self.accelerator = build_accelerator(cfg, self.parallel)
        # accelerate's autocast() builds a context every call; fp32 needs none
        self._autocast = self.accelerator.autocast if cfg.precision != "no" else contextlib.nullcontext
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        configure_torch(cfg)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)

        splits = recipe.load_datasets(cfg)  # may raise ConfigError: nothing written yet
        # What build_datasets learned (splits.info) reaches build_model, step, metrics and report.
        self.recipe: BoundRecipe = recipe.bind(cfg, splits.info)
        self.datasets = {"train": as_dataset(splits.train), "val": as_dataset(splits.val, "val")}
        if splits.test is not None:
            self.datasets["test"] = as_dataset(splits.test, "test")
        self.stream = is_stream(self.datasets["train"])  # read in order per rank, no len(): see data.RankStream
        micro_batch, grad_accum, self.auto_batch_note = cfg.data.batch_size, cfg.train.grad_accum, ""
        if micro_batch == "auto" and self.stream:
            raise ConfigError("data.batch_size=auto needs a map-style training set; the recipe's train split is a "
                              "stream: set data.batch_size=<int>")  # fmt: skip
        if micro_batch == "auto":
            from distrain.train.batch_size import find_batch

            train_set, autocast = self.datasets["train"], self.accelerator.autocast
            found = find_batch(cfg, self.recipe, train_set, self.device, self.world_size, autocast)
            micro_batch, grad_accum, self.auto_batch_note = found.micro_batch, found.grad_accum, found.note
            torch.manual_seed(cfg.train.seed)  # the probe model consumed random numbers
        self.plan = BatchPlan(
            num_samples=0 if self.stream else len(self.datasets["train"]),
            micro_batch=int(micro_batch),
            grad_accum=grad_accum,
            world_size=self.world_size,
            rank=self.rank,
            seed=cfg.train.seed,
            drop_last=cfg.data.drop_last,
        )
        if self.plan.steps_per_epoch == 0 and not self.stream:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} x train.grad_accum={cfg.train.grad_accum} x "
                f"{self.world_size} processes = {self.plan.global_batch} exceeds the "
                f"{self.plan.num_samples} training samples; use a smaller batch"
            )
        t = cfg.train
        self.total_steps = t.max_steps if t.max_steps > 0 else t.max_epochs * self.plan.steps_per_epoch
        if self.stream and t.max_steps <= 0:
            self.total_steps = self._stream_steps()

        # Under FSDP2 the model is built on meta and each rank materialises only its shards (parallel.fsdp_meta_init).
        self.construction = meta_init.build_model(self.recipe.build_model, on_meta=self.parallel.meta_init)
        model = self.construction.model
        memory.keep_resident_set_small(model)  # a large model's freed tensors go back to the system
        self.backend: Backend = select_backend(self.accelerator, cfg, self.recipe.shard_blocks(model),
                                               plan=self.parallel, micro_batch=self.plan.micro_batch,
                                               grad_accum=self.plan.grad_accum)  # fmt: skip
        model = self.backend.shard(model, self.construction.deferred)
        memory.check_fits(model, cfg, self.parallel, self.world_size, self.device)  # before the optimizer exists
        self.lr = effective_lr(cfg.optim, self.plan.global_batch)
        optimizer = build_optimizer(model, cfg.optim, self.lr)
        self.model, self.optimizer = self.backend.prepare(model, optimizer)
        self.backend.verify(self.model)
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, self.total_steps, self.lr)
        # This config's lr, weight decay, betas and base lrs, which load_state_dict puts back over a checkpoint's.
        self._config_groups = resume_check.config_hyperparameters(self.scheduler)

        on_cuda = self.device.type == "cuda"
        self.train_sampler = TrainBatchSampler(self.plan)
        if self.stream:
            self.train_stream = RankStream(self.datasets["train"], self.rank, self.world_size)
            # This rank's place in the stream after the last step taken (None: the epoch's start); checkpointed.
            self.stream_position: dict[str, Any] | None = None
        else:
            self.train_loader = build_loader(
                self.datasets["train"],
                self.train_sampler,
                loader_kwargs(cfg.data, self.datasets["train"], self.world_size, on_cuda),
                seed=cfg.train.seed,
                collate=self.recipe.collate,
            )
        self.non_blocking = on_cuda
        count = cfg.log.flops if cfg.log.flops is not None else on_cuda
        self.flops_per_sample: float | None = None if count else 0.0  # None: count on the first step
        self.peak_flops = peak_flops(self.device, cfg.precision)
        self.state = TrainState()
        # This rank's share of the best weights, kept only without ckpt.save_best (else best/ holds them).
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.interrupt = InterruptFlag()
        self.on_eval: list[Any] = []  # callables (step, val_metrics) run after every evaluation
        preflight.dry_run(self)  # one tiny forward of step and metrics: a misfit recipe fails before any write
        self.run_dir, self._run_lock = lifecycle.claim_run_dir(cfg, self.accelerator, self.rank, self.world_size)
        self.checkpoints = CheckpointManager(self)
        # Resume before anything is written to the run dir: a checkpoint that does not fit raises here.
        try:
            with held_records() as resume_log:
                resumed = self.checkpoints.resume() if cfg.resume else None
        except ConfigError:
            self.release_run_dir()  # removes the lock file, and the run dir if this run created it and it is empty
            if self.rank == 0 and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # created just above: a refused resume leaves nothing behind
            raise
        self.resumed_from = resumed.path if resumed is not None else None
        self.resume_notes: list[Decision] = []  # each setting that differs from the checkpoint's, and its verdict
        if resumed is not None:
            self.resume_notes, self.best_weights = resumed.notes, resumed.best_weights
        lifecycle.write_config(cfg, self.run_dir, self.rank, self.accelerator)
        setup_logging(self.rank, self.run_dir, resume_log)
        if self.resumed_from is not None:
            self.state.segments += 1
        lifecycle.continue_rows(self.state, self.resumed_from, self.run_dir, self.rank)
        if self.resumed_from is not None:
            log.info("resumed from %s at step %d (epoch %d, %d samples in); segment %d of this run",
                     self.resumed_from, self.state.step, self.state.epoch, self.state.consumed,
                     self.state.segments)  # fmt: skip
            if self.rank == 0:  # one copy: the other ranks' consoles show warnings too
                for note in self.resume_notes:
                    log.log(note.level, "%s", note)

    # ------------------------------------------------------------------ setup

    def _stream_steps(self) -> int:
        """A stream without train.max_steps runs train.max_epochs epochs, each as long as the stream
        lasts, so the total is unknown: only a schedule that does not need it can run."""
        sched = self.cfg.sched
        if sched.name in ("cosine", "linear") or (sched.warmup_ratio and not sched.warmup_steps):
            what = f"sched.name={sched.name}" if sched.name in ("cosine", "linear") else (
                f"sched.warmup_ratio={sched.warmup_ratio:g}")
            raise ConfigError(f"train.max_steps is unset but the training set is a stream (no length) and {what} "
                              "needs the total steps: set train.max_steps=<steps>")  # fmt: skip
        return sys.maxsize

    def release_run_dir(self) -> None:
        """Let another run use the run dir (also done at process exit)."""
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

    def plan_text(self) -> str:
        total, trainable = count_params(self.backend.unwrap(self.model))
        p = self.plan
        rows = [
            ("recipe", f"{self.recipe.name} ({self.recipe.path})"),
            ("devices", f"{self.world_size} x {self.device.type}"
             + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "")),
            ("backend", self.backend.name),
            *self.parallel.rows(),
            ("precision", self.cfg.precision),
            ("batch", f"{p.micro_batch} micro x {p.grad_accum} accum x {p.world_size} ranks = {p.global_batch} global"),
            *([("auto batch", self.auto_batch_note)] if self.auto_batch_note else []),
            ("steps", f"{'unknown (a stream)' if self.stream else p.steps_per_epoch} per epoch, "
             + (f"{self.total_steps} total" if self.total_steps < sys.maxsize else
                f"{self.cfg.train.max_epochs} epochs")),
            ("data", ", ".join(f"{k} {'stream' if k == 'train' and self.stream else len(v)}"
                               for k, v in self.datasets.items())),
            ("params", f"{total:,} total, {trainable:,} trainable"),
            *([("construction", self.construction.note())] if self.construction.note() else []),
            ("lr", f"{self.lr:g} ({self.cfg.optim.name}, {self.cfg.sched.name} schedule)"),
            *self.backend.plan(self.model),
            ("run dir", str(self.run_dir)),
            *([("slurm", "job {job_id}, SLURM_RESTART_COUNT={restart_count}".format(**slurm_info()))]
              if slurm_info() else []),
        ]
        width = max(len(k) for k, _ in rows)
        return "plan\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """What trainer_state.json holds at a step boundary (torchtitan's Stateful): the position and
        counters, the schedule, the grad scaler, and what a resume checks it against. The model
        and optimizer state are the backend's (CheckpointManager saves both)."""
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        scaler = getattr(self.accelerator, "scaler", None)
        s = self.state
        return {
            "step": s.step,
            "epoch": s.epoch,
            "consumed": s.consumed,
            "train_state": dataclasses.asdict(s),
            "scheduler": sched,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "world_size": self.world_size,
            "backend": self.backend.name,
            "global_batch": self.plan.global_batch,
            "recipe": self.recipe.name,
            INFO_KEY: self.recipe.info,  # what build_model takes from the data: export and load_model read it
            "versions": versions(),
            **({"stream_positions": self._gather_stream_positions()} if self.stream else {}),
        }

    def _gather_stream_positions(self) -> list[Any]:
        """Every rank's position in its share of the training stream, in rank order (JSON values;
        one all-gather, of JSON text)."""
        mine = json.dumps(self.stream_position)  # a stream state that is not JSON fails here, not in the writer
        if self.world_size == 1:
            return [json.loads(mine)]
        texts: list[Any] = [None] * self.world_size
        dist.all_gather_object(texts, mine)
        return [json.loads(t) for t in texts]

    def _load_stream_position(self, state: dict[str, Any]) -> None:
        positions = state.get("stream_positions")
        if positions is None:
            if state.get("consumed"):
                raise ConfigError("resume: the checkpoint was saved mid-epoch with a map-style training set and "
                                  "this run's is a stream; resume with the same data")  # fmt: skip
            return
        if len(positions) == self.world_size:
            self.stream_position = positions[self.rank]
            return
        # Positions of an epoch that ended are not needed: the next epoch starts every rank afresh.
        last = positions[-1]
        if last is None or last.get("epoch") != state.get("epoch") or not last.get("consumed"):
            self.stream_position = None
        elif self.train_stream.resplits:  # split sample by sample: the last rank's position is a global one
            self.stream_position = last
        else:
            raise ConfigError(f"resume: the checkpoint holds the training stream's position for {len(positions)} "
                              f"processes and this run has {self.world_size}; a Hugging Face stream is split "
                              f"by shards per process, so resume it on {len(positions)} processes (or from an "
                              "epoch's end)")  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned: position and counters, the schedule (with this config's
        hyper-parameters, the lr recomputed for the step), the grad scaler. No RNG state: every
        random stream is a function of (seed, rank, step) (distrain.train.rng)."""
        fields = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in state["train_state"].items() if k in fields})
        sched = self.scheduler
        sched.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(sched.lr_lambdas)})
        resume_check.reapply_hyperparameters(sched, self._config_groups)
        # The schedule is a pure function of the step: recompute the lr from the (maybe longer) new
        # schedule, the same expression LambdaLR uses, so an unchanged config gives identical values.
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)
        # torch's own attribute (what get_last_lr returns): LRScheduler has no public way to set it.
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if self.stream:
            self._load_stream_position(state)

    def restore_best(self) -> bool:
        """Put the best weights back into the live model: from this rank's copy, or from the best/
        checkpoint on disk (ckpt.save_best), each rank reading its own part. False if neither holds them."""
        if self.best_weights is not None:
            self.backend.load_local_state_dict(self.model, self.best_weights)
            return True
        return self.checkpoints.load_best(self.state.best_step)

    def _save_step(self) -> None:
        """Checkpoint the current step unless it is already saved (every_steps and epoch end can coincide)."""
        if self.checkpoints.last_saved_step != self.state.step:
            self._save(step_name(self.state.step))

    def _save(self, name: str) -> None:
        self.state.elapsed = self._elapsed()  # rank 0's clock is the one summary.json reports
        self.state.rows_logged = self._logger.rows
        self.checkpoints.save(name)

    # ------------------------------------------------------------------ steps

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def _all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def forward(self, batch: Any) -> StepOutput:
        with self._autocast():  # the bound recipe's step checks what it returns (recipe.check_step_output)
            return self.recipe.step(self.model, batch)

    def train_step(self, micro_batches: list[Any], global_count: int) -> StepResult:
        """One optimizer step over this rank's micro-batches, numbered self.state.step; `global_count`
        is the step's sample count over all ranks. The loss is the counted terms' sum over the
        global count of counted terms (distrain.recipe's docstring: loss normalisation)."""
        # Dropout and any randomness of the recipe's step: a pure function of (seed, rank, step).
        seed_step(self.cfg.train.seed, self.rank, self.state.step, self.device)
        # The denominator: the global sample count (a per-sample loss), or a device tensor holding the
        # global count of loss terms, from loss_terms before the first forward or, without it, from
        # the first micro-batch's terms per sample.
        denominator: int | torch.Tensor = global_count
        terms_local: torch.Tensor | None = None  # this rank's count by loss_terms
        counted: torch.Tensor | None = None  # ... and by the step's outputs, checked against it
        agreed_check: torch.Tensor | None = None  # nonzero: the ranks' terms per sample differ
        per_sample, shape_mismatch = 1, 0
        if self.recipe.loss_terms is not None:
            terms_local = self._count_loss_terms(micro_batches)
            # one all-reduce before any backward; a step without counted terms has loss and gradient 0
            denominator = self._all_reduce_sum(terms_local.clone()).clamp(min=1)
        factor = self.backend.loss_factor(denominator)
        loss_sum: torch.Tensor | None = None
        tokens = 0
        for i, batch in enumerate(micro_batches):
            counting = self.flops_per_sample is None and i == 0  # once per run, on the first micro-batch
            with (
                self.backend.sync_context(self.model, sync=i == len(micro_batches) - 1),
                count_flops() if counting else contextlib.nullcontext() as flops,
            ):
                out = self.forward(batch)
                loss = out.loss.float()
                if out.mask is not None:  # where, not a product: a masked-out inf or nan stays out
                    loss = torch.where(out.mask, loss, 0.0)
                if terms_local is not None:
                    n = out.mask.sum() if out.mask is not None else torch.tensor(loss.numel(), device=loss.device)
                    counted = n if counted is None else counted + n
                else:
                    terms = loss[0].numel() if loss.ndim > 1 else 1
                    if i == 0 and loss.ndim > 1:
                        per_sample = terms
                        denominator, agreed_check = self._agreed_terms(global_count, terms)
                        factor = self.backend.loss_factor(denominator)
                    shape_mismatch += terms != per_sample
                batch_sum = loss.sum()  # one reduction for the backward and the logged loss alike
                self.backend.backward(batch_sum * factor)
            if counting:
                self.flops_per_sample = flops() / batch_size_of(batch)
            batch_sum = batch_sum.detach()
            loss_sum = batch_sum if loss_sum is None else loss_sum + batch_sum
            if self.recipe.tokens is not None:
                tokens += int(self.recipe.tokens(batch))
        assert loss_sum is not None
        flag = float(self.interrupt.poll() > 0)
        check: torch.Tensor | None = None  # nonzero: the outputs contradict the count the step was divided by
        if terms_local is not None and counted is not None:
            check = (terms_local - counted).abs().float()
        elif agreed_check is not None:
            check = agreed_check
        if self.world_size > 1:
            # One small all-reduce per step: the global loss, the interrupt flag, the token count and
            # the loss-term checks, so all ranks agree on skipping a non-finite step, on stopping and
            # on a recipe whose outputs contradict the count.
            parts = [loss_sum[None], torch.tensor([flag, float(tokens), float(shape_mismatch)], device=self.device)]
            packed = self._all_reduce_sum(torch.cat(parts + ([check[None]] if check is not None else [])))
            loss_sum, flag, tokens = packed[0], float(packed[1]), int(packed[2])
            shape_mismatch = int(packed[3])
            check = packed[4] if check is not None else None
        if shape_mismatch or (check is not None and float(check) != 0):
            raise ConfigError(self._terms_contradiction(terms_local is not None, check))
        # The loss's one host read (a sync: it waits for the backward on CUDA, so the time split is
        # real), made before the optimizer's kernels are queued: a read after them would wait for them too.
        loss = (loss_sum / denominator).cpu()
        loss_finite = math.isfinite(float(loss))
        backward_done = time.perf_counter()
        grad_norm, applied = self.backend.step(self.model, self.optimizer, self.cfg.train.clip_norm, loss_finite)
        interrupt = self._agreed_exit_code() if flag > 0 else 0  # every rank sees the same summed flag
        return StepResult(loss=loss, grad_norm=float(grad_norm), applied=applied, loss_finite=loss_finite,
                          interrupt=interrupt, tokens=tokens if self.recipe.tokens is not None else 0,
                          backward_done=backward_done)  # fmt: skip

    def _count_loss_terms(self, micro_batches: list[Any]) -> torch.Tensor:
        """This rank's count of counted loss terms over its micro-batches, by the recipe's loss_terms."""
        assert self.recipe.loss_terms is not None
        counts = []
        for batch in micro_batches:
            n = self.recipe.loss_terms(batch)
            integral = torch.is_tensor(n) and n.numel() == 1 and not (n.is_floating_point() or n.is_complex())
            if not (integral or (isinstance(n, int) and not isinstance(n, bool))):
                what = f"a tensor of shape {list(n.shape)} and dtype {n.dtype}" if torch.is_tensor(n) else repr(n)
                raise ConfigError(f"recipe={self.cfg.recipe}: loss_terms(cfg, info, batch) returned {what}; it "
                                  "must be the micro-batch's count of counted loss terms, an int or a 0-dim "
                                  "integer tensor")  # fmt: skip
            counts.append(torch.as_tensor(n, device=self.device).reshape(()).to(torch.int64))
        return torch.stack(counts).sum()

    def _agreed_terms(self, global_count: int, terms: int) -> tuple[int | torch.Tensor, torch.Tensor | None]:
        """Without loss_terms, the step's count of terms: samples x terms per sample, the most any rank's
        first micro-batch has (one all-reduce, no host read), and a tensor that is nonzero when the
        ranks' terms per sample differ (checked at the step's end)."""
        if self.world_size == 1:
            return global_count * terms, None
        both = self._all_reduce_max(torch.tensor([terms, -terms], device=self.device, dtype=torch.int64))
        return global_count * both[0], (both[0] + both[1]).float()

    def _terms_contradiction(self, by_hook: bool, check: torch.Tensor | None) -> str:
        where = f"recipe={self.cfg.recipe}"
        if by_hook:
            return (f"{where}: at step {self.state.step} the step's outputs (StepOutput.mask.sum(), or loss.numel() "
                    f"without a mask) differ from loss_terms(cfg, info, batch) by {int(float(check or 0))} terms over "
                    "the micro-batches and ranks; loss_terms must count exactly the terms the mask keeps")  # fmt: skip
        return (f"{where}: at step {self.state.step} the loss's terms per sample (its shape [B, ...]) differ between "
                "micro-batches or ranks; without loss_terms(cfg, info, batch) every micro-batch of a step needs the "
                "same number, or define loss_terms to count them from the batch")  # fmt: skip

    def _agreed_exit_code(self) -> int:
        """The highest of the ranks' own exit codes (0: no rank was interrupted), so a signal to one
        worker stops all of them with its code: one all-reduce."""
        code = self.interrupt.exit_code if self.interrupt.poll() else 0
        if self.world_size > 1:
            code = int(self._all_reduce_max(torch.tensor([float(code)], device=self.device))[0])
        if code and self.interrupt.launcher_gone:
            log.warning("%s: saving a checkpoint and exiting", self.interrupt.describe())
        return code

    def _stop_if_interrupted(self) -> None:
        """After an evaluation or a save, which can take long: a signal that came meanwhile stops the
        run at this step (as rare as evaluations and saves), not a step later."""
        code = self._agreed_exit_code()
        if code:
            raise Interrupted(code)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, split: str) -> EvalResult:
        """Loss (the counted terms' mean) and the recipe's metrics on a split, each sample counted exactly
        once across ranks; preds and targets as distrain.train.gather gives them."""
        dataset = self.datasets[split]
        bs = self.cfg.data.eval_batch_size or 2 * self.plan.micro_batch
        sampler = EvalBatchSampler(len(dataset), bs, self.world_size, self.rank)
        kwargs = loader_kwargs(self.cfg.data, dataset, self.world_size, False)
        loader = build_loader(dataset, sampler, kwargs, collate=self.recipe.collate)
        self.model.eval()
        sums, counts, preds, targets = [], [], [], []
        for batch in loader:
            out = self.forward(move_to(batch, self.device, self.non_blocking))
            loss = out.loss.float()
            if out.mask is not None:
                loss = torch.where(out.mask, loss, 0.0)
            per_sample = loss.reshape(len(loss), -1)
            sums.append(per_sample.sum(1))  # a per-sample loss [B]: the loss itself, so the mean is as it was
            kept = out.mask.reshape(len(loss), -1).sum(1) if out.mask is not None else None
            counts.append(kept.float() if kept is not None else loss.new_full((len(loss),), per_sample.shape[1]))
            if out.preds is not None:
                preds.append(out.preds)
            if out.targets is not None:
                targets.append(out.targets)
        self.model.train()
        self.backend.after_forward_only(self.model)
        mask, where = sampler.gathered_mask(), f"recipe={self.cfg.recipe}"

        def gather(parts: list[Any], what: str) -> Any:
            return gather_outputs(parts, mask, self.world_size, f"{where}: {what}") if parts else None

        total, n = gather(sums, "loss"), gather(counts, "mask")
        p, y = gather(preds, "preds"), gather(targets, "targets")
        metrics: dict[str, Any] = {"loss": float("nan")}
        if total is not None:  # a per-sample loss: its float32 mean, as always; terms: summed in float64
            per_sample = bool((n == 1).all())
            metrics["loss"] = float(total.sum() / n.sum() if per_sample else total.double().sum() / n.double().sum())
        if p is not None and y is not None:
            metrics.update(self.recipe.metrics(p, y))
        return EvalResult(metrics, p, y)

    def _on_eval(self, metrics: dict[str, Any]) -> None:
        """Track the best metric, keep the best weights, count evaluations without improvement."""
        t, s = self.cfg.train, self.state
        if t.metric not in metrics:
            raise ConfigError(
                f"train.metric={t.metric!r} is not a validation metric; available: {', '.join(sorted(metrics))}"
            )
        value = float(metrics[t.metric])
        sign = 1.0 if t.mode == "min" else -1.0
        # NaN compares false with everything: it would become a best that nothing beats
        improved = math.isfinite(value) and (s.best_metric is None or sign * (value - s.best_metric) < -t.min_delta)
        if not math.isfinite(value):
            log.warning("step %d: validation %s is %s; counted as an evaluation without improvement",
                        s.step, t.metric, value)  # fmt: skip
        if improved:
            s.best_metric, s.best_step, s.best_epoch, s.bad_evals = value, s.step, s.epoch, 0
            if self.cfg.ckpt.save_best:  # best/ holds them: restore_best reads them back, no copy in memory
                self.best_weights = None
                self._save("best")
            else:  # this rank's share (a shard under FSDP2 and ZeRO; the whole model under single and DDP)
                self.best_weights = self.backend.local_state_dict(self.model)
        else:
            s.bad_evals += 1
            if t.patience and s.bad_evals >= t.patience:
                s.stopped_early = True

    # ------------------------------------------------------------------ loop

    def _run_eval(self, logger: MetricsLogger, elapsed: float) -> None:
        fault_point(EVAL_STAGE, self.rank, self.state.step)
        metrics = self.evaluate("val").metrics
        row = {"step": self.state.step, "epoch": self.state.epoch, "time": round(elapsed, 3)}
        row.update({f"val/{k}": v for k, v in metrics.items()})
        logger.log(row, self.state.step)
        scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        log.info("eval step %d: %s", self.state.step, ", ".join(f"{k}={v:.4f}" for k, v in scalar.items()))
        self.state.last_eval_step = self.state.step
        self._on_eval(metrics)
        for callback in self.on_eval:  # e.g. a sweep's pruner: an exception it raises ends train()
            callback(self.state.step, metrics)

    def train(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        if self.rank == 0:
            log.info(self.plan_text())
        init_trackers(self.accelerator, cfg, self.run_dir, self.tracker_names)
        logger = MetricsLogger(self.accelerator, self.run_dir, self.total_steps, s.step, cfg.log.progress,
                               s.rows_logged)  # fmt: skip
        self._logger = logger
        self.interrupt.install()
        self._start = time.perf_counter() - s.elapsed  # the lineage's clock: earlier segments count
        exit_code = 0
        try:
            if self._eval_due():  # the interrupted run stopped at an eval_every step before evaluating
                self._run_eval(logger, self._elapsed())
                self._stop_if_interrupted()
            while s.step < self.total_steps and not s.stopped_early and not self._epochs_done():
                if self._train_epoch(logger):
                    s.epoch, s.consumed = s.epoch + 1, 0
                    if s.last_eval_step != s.step:
                        self._run_eval(logger, self._elapsed())
                    if cfg.ckpt.every_epoch:
                        self._save_step()
                    self._stop_if_interrupted()
            if s.last_eval_step != s.step:
                self._run_eval(logger, self._elapsed())
            if cfg.ckpt.save_final:
                self._save_step()
        except Interrupted as e:
            exit_code = e.exit_code
            log.warning("interrupted at step %d: saving a checkpoint and exiting with %d", s.step, exit_code)
            self._save_step()
        except BaseException:
            self.checkpoints.settle()  # a background save of a finished step still lands (ckpt.async_save)
            raise
        finally:
            self.interrupt.restore()
            logger.close()
        return lifecycle.finish(self, exit_code, self._elapsed())

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start

    def _epochs_done(self) -> bool:
        """A stream without train.max_steps stops after train.max_epochs epochs (map-style data: by total_steps)."""
        return self.total_steps == sys.maxsize and self.state.epoch >= self.cfg.train.max_epochs

    def _eval_due(self) -> bool:
        every, s = self.cfg.train.eval_every, self.state
        return bool(every) and s.step > 0 and s.step % every == 0 and s.last_eval_step != s.step

    def epoch_batches(self) -> EpochBatches | StreamBatches:
        """This rank's training batches from the state's position (epoch, samples consumed) to the end of its epoch."""
        s = self.state
        if self.stream:
            return StreamBatches(self.plan, self.train_stream, s.epoch, self.stream_position, self.device,
                                 self._all_agree, self.recipe.collate, self.non_blocking)  # fmt: skip
        return EpochBatches(self.plan, self.train_sampler, self.train_loader, s.epoch, s.consumed, self.device,
                            self.non_blocking)  # fmt: skip

    def _all_agree(self, ok: bool) -> bool:
        """True when `ok` on every rank (one all-reduce): a stream's ranks end an epoch together."""
        if self.world_size == 1:
            return ok
        return float(self._all_reduce_max(torch.tensor([0.0 if ok else 1.0], device=self.device))[0]) == 0.0

    def _train_epoch(self, logger: MetricsLogger) -> bool:
        """Train from the current position; True when the epoch ran out of samples."""
        cfg, s = self.cfg, self.state
        batches = self.epoch_batches()
        window = Window()
        while True:
            t0 = time.perf_counter()  # a stream reads the step's samples for `count`
            count = batches.count
            if count == 0 and isinstance(batches, StreamBatches) and batches.consumed == 0:
                p = self.plan
                raise ConfigError(f"the training stream has too few samples for one step in epoch {s.epoch}: a "
                                  f"step takes data.batch_size={p.micro_batch} x train.grad_accum={p.grad_accum} "
                                  f"samples on each of the {p.world_size} processes")  # fmt: skip
            if count == 0:
                return True
            if s.step >= self.total_steps or s.stopped_early:
                return False
            micro = batches.take()
            t1 = time.perf_counter()
            result = self.train_step(micro, count)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            s.step += 1
            s.consumed = batches.consumed
            if isinstance(batches, StreamBatches):
                self.stream_position = batches.position
            loss_value = float(result.loss)
            self._check_finite(result, loss_value)
            tb = result.backward_done
            window.add(loss_value, count, t1 - t0, tb - t1, time.perf_counter() - tb, result.tokens)
            if s.step % cfg.log.every == 0 or s.step == self.total_steps:
                self._log_train(logger, window, lr, result.grad_norm)
                window = Window()
            else:
                logger.advance(1)
            if result.interrupt:  # the evaluation due at this step runs first thing after the resume
                raise Interrupted(result.interrupt)
            evaluate = bool(cfg.train.eval_every) and s.step % cfg.train.eval_every == 0
            save = bool(cfg.ckpt.every_steps) and s.step % cfg.ckpt.every_steps == 0
            if evaluate:
                self._run_eval(logger, self._elapsed())
            if save:
                self._save_step()
            if evaluate or save:
                self._stop_if_interrupted()

    def _check_finite(self, result: StepResult, loss_value: float) -> None:
        """Count skipped steps; consecutive bad ones (non-finite loss or gradient) stop the run."""
        s = self.state
        if result.applied:
            s.bad_steps = 0
            return
        s.skipped_steps += 1
        scaler = self.accelerator.scaler
        if result.loss_finite and scaler is not None and scaler.get_scale() >= 1.0:
            return  # an fp16 overflow: the grad scaler has backed the loss scale off, the routine case
        s.bad_steps += 1
        what = f"non-finite loss {loss_value}" if not result.loss_finite else (
            f"finite loss {loss_value:.4g} but non-finite gradient norm {result.grad_norm}")
        log.warning("step %d: %s, step skipped (%d in a row)", s.step, what, s.bad_steps)
        if s.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{s.bad_steps} consecutive steps with a non-finite loss or gradient (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); lower optim.lr, check the data, or use precision=bf16"
            )

    def _log_train(self, logger: MetricsLogger, w: Window, lr: float, grad_norm: float) -> None:
        s = self.state
        elapsed = time.perf_counter() - w.start
        n = max(w.steps, 1)
        row = {
            "step": s.step,
            "epoch": s.epoch,
            "loss": w.loss / w.finite if w.finite else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": w.samples / elapsed if elapsed > 0 else 0.0,
            "step_time": elapsed / n,
            "data_time": w.data / n,
            "compute_time": w.compute / n,
            "optim_time": w.optim / n,
            "peak_mem_mb": peak_memory_mb(self.device),
            **self._throughput_fields(w, elapsed),
            "skipped_steps": s.skipped_steps,
            "time": round(time.perf_counter() - self._start, 3),
        }
        logger.log(row, s.step)
        postfix = {"loss": f"{row['loss']:.4f}", "lr": f"{lr:.2e}", "samples/s": f"{row['samples_per_s']:.0f}"}
        logger.advance(w.steps, postfix)

    def _throughput_fields(self, w: Window, elapsed: float) -> dict[str, float]:
        """tokens/s when the recipe counts tokens; achieved TFLOP/s per device and MFU once FLOPs are counted."""
        out: dict[str, float] = {}
        if self.recipe.tokens is not None and elapsed > 0:
            out["tokens_per_s"] = w.tokens / elapsed
        if self.flops_per_sample and elapsed > 0:
            samples_per_s = w.samples / elapsed
            out["flops_per_sample"] = self.flops_per_sample
            out["tflops"] = self.flops_per_sample * samples_per_s / self.world_size / 1e12
            util = mfu(self.flops_per_sample, samples_per_s, self.world_size, self.peak_flops)
            if util is not None:
                out["mfu"] = util
        return out
