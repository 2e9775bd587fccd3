"""The training loop shared by every recipe: train_step, evaluate, train.

Nothing here depends on the backend: the Backend object owns wrapping, sync, backward,
clipping and the optimizer step. The loss of an optimizer step is the sum of per-sample
losses over all its micro-batches and ranks divided by the global sample count, so the
gradient equals the big-batch gradient whatever the accumulation, world size or batch sizes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from distrain import checkpoint
from distrain.checkpoint import manager as trainer_checkpoint
from distrain.checkpoint.resume_check import Decision
from distrain.checkpoint.weights import save_weights
from distrain.config import Config, to_plain
from distrain.errors import ConfigError, Interrupted, TrainingError
from distrain.fault_points import EVAL_STAGE, fault_point
from distrain.observe.log import held_records, setup_logging
from distrain.observe.metrics import SUPERSEDED, MetricsLogger, peak_memory_mb, slurm_info, supersede_rows, write_json
from distrain.observe.throughput import count_flops, mfu, peak_flops
from distrain.observe.trackers import init_trackers
from distrain.parallel.base import Backend, count_params
from distrain.parallel.launch import build_accelerator, configure_torch
from distrain.parallel.select import select_backend
from distrain.recipe import Recipe, StepOutput
from distrain.train import preflight, run_lock
from distrain.train.data import (
    BatchPlan,
    EpochBatches,
    EvalBatchSampler,
    TrainBatchSampler,
    as_dataset,
    batch_size_of,
    build_loader,
    loader_kwargs,
    move_to,
)
from distrain.train.optim import build_optimizer, build_scheduler, effective_lr
from distrain.train.rng import seed_step
from distrain.train.signals import InterruptFlag

log = logging.getLogger("distrain")


@dataclass
class TrainState:
    """Everything that changes as training runs; what a checkpoint has to restore."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # samples of the current epoch's order already trained on
    best_metric: float | None = None
    best_step: int = -1
    best_epoch: int = -1
    bad_evals: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    stopped_early: bool = False
    last_eval_step: int = -1  # so a resume neither repeats an evaluation nor loses one
    rows_logged: int = 0  # metrics.jsonl lines written up to this state (rank 0's count)
    elapsed: float = 0.0  # seconds of training in this lineage up to this state, over all resumed segments
    segments: int = 1  # processes this lineage ran in (1 + resumes)


@dataclass
class StepResult:
    """What one optimizer step did, as train_step returns it."""

    loss: torch.Tensor  # the step's global mean loss
    grad_norm: float  # global gradient norm before clipping
    applied: bool  # False: skipped (non-finite loss or gradient, or an fp16 overflow)
    loss_finite: bool
    interrupt: int  # exit code of the signal some rank received (0: none): all ranks stop after this step
    tokens: int  # tokens of the step over all ranks (0 when the recipe does not count them)
    backward_done: float  # perf_counter when the forward/backward pass finished (after a host sync)


@dataclass
class Window:
    """Sums over the steps since the last training log row."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    finite: int = 0
    loss: float = 0.0
    samples: int = 0
    data: float = 0.0
    compute: float = 0.0
    optim: float = 0.0
    tokens: int = 0

    def add(self, loss: float, samples: int, data: float, compute: float, optim: float, tokens: int = 0) -> None:
        self.steps += 1
        self.tokens += tokens
        if math.isfinite(loss):
            self.finite += 1
            self.loss += loss
        self.samples += samples
        self.data += data
        self.compute += compute
        self.optim += optim


def new_run_dir(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / Path(cfg.recipe).stem / stamp
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{stamp}-{n}"), n + 1
    return path


class Trainer:
    def __init__(self, cfg: Config, recipe: Recipe):
        self.cfg, self.recipe = cfg, recipe
        self.accelerator = build_accelerator(cfg)
        # accelerate's autocast() builds a context every call; fp32 needs none
        self._autocast = self.accelerator.autocast if cfg.precision != "no" else contextlib.nullcontext
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        configure_torch(cfg)
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)

        splits = recipe.build_datasets(cfg)  # may raise ConfigError: nothing written yet
        self.datasets = {"train": as_dataset(splits.train), "val": as_dataset(splits.val)}
        if splits.test is not None:
            self.datasets["test"] = as_dataset(splits.test)
        micro_batch, grad_accum, self.auto_batch_note = cfg.data.batch_size, cfg.train.grad_accum, ""
        if micro_batch == "auto":
            from distrain.train.batch_size import find_batch

            train_set, autocast = self.datasets["train"], self.accelerator.autocast
            found = find_batch(cfg, recipe, train_set, self.device, self.world_size, autocast)
            micro_batch, grad_accum, self.auto_batch_note = found.micro_batch, found.grad_accum, found.note
            torch.manual_seed(cfg.train.seed)  # the probe model consumed random numbers
        self.plan = BatchPlan(
            num_samples=len(self.datasets["train"]),
            micro_batch=int(micro_batch),
            grad_accum=grad_accum,
            world_size=self.world_size,
            rank=self.rank,
            seed=cfg.train.seed,
            drop_last=cfg.data.drop_last,
        )
        if self.plan.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} x train.grad_accum={cfg.train.grad_accum} x "
                f"{self.world_size} processes = {self.plan.global_batch} exceeds the "
                f"{self.plan.num_samples} training samples; use a smaller batch"
            )
        t = cfg.train
        self.total_steps = t.max_steps if t.max_steps > 0 else t.max_epochs * self.plan.steps_per_epoch

        model = recipe.build_model(cfg)
        self.backend: Backend = select_backend(self.accelerator, cfg, recipe.shard_blocks,
                                               micro_batch=self.plan.micro_batch, grad_accum=self.plan.grad_accum)
        model = self.backend.shard(model)
        self.lr = effective_lr(cfg.optim, self.plan.global_batch)
        optimizer = build_optimizer(model, cfg.optim, self.lr)
        self.model, self.optimizer = self.backend.prepare(model, optimizer)
        self.backend.verify(self.model)
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, self.total_steps, self.lr)

        on_cuda = self.device.type == "cuda"
        self.train_sampler = TrainBatchSampler(self.plan)
        self.train_loader = build_loader(
            self.datasets["train"],
            self.train_sampler,
            loader_kwargs(cfg.data, self.datasets["train"], self.world_size, on_cuda),
            seed=cfg.train.seed,
        )
        self.non_blocking = on_cuda
        count = cfg.log.flops if cfg.log.flops is not None else on_cuda
        self.flops_per_sample: float | None = None if count else 0.0  # None: count on the first step
        self.peak_flops = peak_flops(self.device, cfg.precision)
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.interrupt = InterruptFlag()
        self.on_eval: list[Any] = []  # callables (step, val_metrics) run after every evaluation
        preflight.dry_run(self)  # one tiny forward of step and metrics: a misfit recipe fails before any write
        self.run_dir = self._make_run_dir()
        self._last_saved_step = -1
        self.resume_notes: list[Decision] = []  # each setting that differs from the checkpoint's, and its verdict
        # Resume before anything is written to the run dir: a checkpoint that does not fit raises here.
        try:
            with held_records() as resume_log:
                self.resumed_from = trainer_checkpoint.resume(self) if cfg.resume else None
        except ConfigError:
            self.release_run_dir()  # removes the lock file, and the run dir if this run created it and it is empty
            if self.rank == 0 and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # created just above: a refused resume leaves nothing behind
            raise
        self._write_config()
        setup_logging(self.rank, self.run_dir, resume_log)
        if self.resumed_from is not None:
            self.state.segments += 1
        self._own_rows()
        if self.resumed_from is not None:
            log.info("resumed from %s at step %d (epoch %d, %d samples in); segment %d of this run",
                     self.resumed_from, self.state.step, self.state.epoch, self.state.consumed,
                     self.state.segments)  # fmt: skip
            if self.rank == 0:  # one copy: the other ranks' consoles show warnings too
                for note in self.resume_notes:
                    log.log(note.level, "%s", note)

    # ------------------------------------------------------------------ setup

    def _make_run_dir(self) -> Path:
        """Rank 0 picks the directory (a timestamp could differ between ranks) and creates it."""
        from accelerate.utils import broadcast_object_list

        chosen: list[str | None] = [None, None]  # the run dir, and rank 0's refusal to use it
        self._run_lock: run_lock.RunLock | None = None
        if self.rank == 0:
            chosen[0] = str(new_run_dir(self.cfg))
            try:  # one training per folder, and no fresh run over a finished one: before anything is written
                self._run_lock = run_lock.take(chosen[0], self.cfg.resume)
            except ConfigError as e:
                chosen[1] = str(e)
        if self.world_size > 1:
            broadcast_object_list(chosen, from_process=0)
        if chosen[1]:
            raise ConfigError(chosen[1])  # on every rank, so none waits for the others
        self.accelerator.wait_for_everyone()
        return Path(chosen[0])  # type: ignore[arg-type]

    def release_run_dir(self) -> None:
        """Let another run use the run dir (also done at process exit)."""
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

    def _own_rows(self) -> None:
        """metrics.jsonl keeps the rows of the state this run continues (those its checkpoint counted
        when it came from this run dir; none for a start from scratch) and marks a resume; rows a
        killed segment wrote later go to metrics.superseded.jsonl, so each step appears once."""
        s, came_from = self.state, self.resumed_from
        own = came_from is not None and came_from.parent.parent.resolve() == self.run_dir.resolve()
        marker = None if came_from is None else {"event": "resume", "step": s.step, "from": str(came_from),
                                                  "segment": s.segments}  # fmt: skip
        if self.rank == 0:
            s.rows_logged, moved = supersede_rows(self.run_dir, s.rows_logged if own else 0, marker)
            if moved:
                log.info("%d metrics.jsonl rows of an interrupted segment (after the state continued here) moved "
                         "to %s", moved, SUPERSEDED)  # fmt: skip

    def _write_config(self) -> None:
        if self.rank == 0:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_plain(self.cfg), sort_keys=False))
        self.accelerator.wait_for_everyone()

    def _save_step(self) -> None:
        """Checkpoint the current step unless it is already saved (every_steps and epoch end can coincide)."""
        if self._last_saved_step != self.state.step:
            self._save(checkpoint.step_name(self.state.step))
            self._last_saved_step = self.state.step

    def _save(self, name: str) -> None:
        self.state.elapsed = self._elapsed()  # rank 0's clock is the one summary.json reports
        self.state.rows_logged = self._logger.rows
        trainer_checkpoint.save(self, name)

    def plan_text(self) -> str:
        total, trainable = count_params(self.backend.unwrap(self.model))
        p = self.plan
        rows = [
            ("recipe", f"{self.recipe.name} ({self.recipe.path})"),
            ("devices", f"{self.world_size} x {self.device.type}"
             + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else "")),
            ("backend", self.backend.name),
            ("precision", self.cfg.precision),
            ("batch", f"{p.micro_batch} micro x {p.grad_accum} accum x {p.world_size} ranks = {p.global_batch} global"),
            *([("auto batch", self.auto_batch_note)] if self.auto_batch_note else []),
            ("steps", f"{p.steps_per_epoch} per epoch, {self.total_steps} total"),
            ("data", ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items())),
            ("params", f"{total:,} total, {trainable:,} trainable"),
            ("lr", f"{self.lr:g} ({self.cfg.optim.name}, {self.cfg.sched.name} schedule)"),
            *self.backend.plan(self.model),
            ("run dir", str(self.run_dir)),
            *([("slurm", "job {job_id}, SLURM_RESTART_COUNT={restart_count}".format(**slurm_info()))]
              if slurm_info() else []),
        ]
        width = max(len(k) for k, _ in rows)
        return "plan\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)

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
        """One optimizer step over this rank's micro-batches, numbered self.state.step."""
        # Dropout and any randomness of the recipe's step: a pure function of (seed, rank, step).
        seed_step(self.cfg.train.seed, self.rank, self.state.step, self.device)
        factor = self.backend.loss_factor(global_count)
        loss_sum: torch.Tensor | None = None
        tokens = 0
        for i, batch in enumerate(micro_batches):
            counting = self.flops_per_sample is None and i == 0  # once per run, on the first micro-batch
            with (
                self.backend.sync_context(self.model, sync=i == len(micro_batches) - 1),
                count_flops() if counting else contextlib.nullcontext() as flops,
            ):
                out = self.forward(batch)
                batch_sum = out.loss.float().sum()  # one reduction for the backward and the logged loss alike
                self.backend.backward(batch_sum * factor)
            if counting:
                self.flops_per_sample = flops() / batch_size_of(batch)
            batch_sum = batch_sum.detach()
            loss_sum = batch_sum if loss_sum is None else loss_sum + batch_sum
            if self.recipe.tokens is not None:
                tokens += int(self.recipe.tokens(batch))
        assert loss_sum is not None
        flag = float(self.interrupt.poll() > 0)
        if self.world_size > 1:
            # One small all-reduce per step: the global loss, the interrupt flag and the token count,
            # so all ranks agree on skipping a non-finite step and on stopping.
            packed = torch.cat([loss_sum[None], torch.tensor([flag, float(tokens)], device=self.device)])
            packed = self._all_reduce_sum(packed)
            loss_sum, flag, tokens = packed[0], float(packed[1]), int(packed[2])
        # The loss's one host read (a sync: it waits for the backward on CUDA, so the time split is
        # real), made before the optimizer's kernels are queued: a read after them would wait for them too.
        loss = (loss_sum / global_count).cpu()
        loss_finite = math.isfinite(float(loss))
        backward_done = time.perf_counter()
        grad_norm, applied = self.backend.step(self.model, self.optimizer, self.cfg.train.clip_norm, loss_finite)
        interrupt = self._agreed_exit_code() if flag > 0 else 0  # every rank sees the same summed flag
        return StepResult(loss=loss, grad_norm=float(grad_norm), applied=applied, loss_finite=loss_finite,
                          interrupt=interrupt, tokens=tokens if self.recipe.tokens is not None else 0,
                          backward_done=backward_done)  # fmt: skip

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
    def evaluate(self, split: str) -> dict[str, Any]:
        """Loss and the recipe's metrics on a split, each sample counted exactly once across ranks."""
        dataset = self.datasets[split]
        bs = self.cfg.data.eval_batch_size or 2 * self.plan.micro_batch
        sampler = EvalBatchSampler(len(dataset), bs, self.world_size, self.rank)
        loader = build_loader(dataset, sampler, loader_kwargs(self.cfg.data, dataset, self.world_size, False))
        self.model.eval()
        losses, preds, targets = [], [], []
        for batch in loader:
            out = self.forward(move_to(batch, self.device, self.non_blocking))
            losses.append(out.loss.float())
            if out.preds is not None:
                preds.append(out.preds)
            if out.targets is not None:
                targets.append(out.targets)
        self.model.train()
        self.backend.after_forward_only(self.model)
        mask = sampler.gathered_mask()

        def gather(parts: list[torch.Tensor]) -> torch.Tensor | None:
            if not parts:
                return None
            local = torch.cat(parts)
            full = self.accelerator.gather(local.contiguous()) if self.world_size > 1 else local
            return full.cpu()[mask[: len(full)]]

        loss = gather(losses)
        p, y = gather(preds), gather(targets)
        result: dict[str, Any] = {"loss": float(loss.mean()) if loss is not None else float("nan")}
        if p is not None and y is not None:
            result.update(self.recipe.metrics(p, y))
        self._last_eval_outputs = (p, y)
        return result

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
            self.best_weights = self.backend.local_state_dict(self.model)
            if self.cfg.ckpt.save_best:
                self._save("best")
        else:
            s.bad_evals += 1
            if t.patience and s.bad_evals >= t.patience:
                s.stopped_early = True

    # ------------------------------------------------------------------ loop

    def _run_eval(self, logger: MetricsLogger, elapsed: float) -> None:
        fault_point(EVAL_STAGE, self.rank, self.state.step)
        metrics = self.evaluate("val")
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
        init_trackers(self.accelerator, cfg, self.run_dir)
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
            while s.step < self.total_steps and not s.stopped_early:
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
        finally:
            self.interrupt.restore()
            logger.close()
        return self._finish(exit_code, self._elapsed())

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start

    def _eval_due(self) -> bool:
        every, s = self.cfg.train.eval_every, self.state
        return bool(every) and s.step > 0 and s.step % every == 0 and s.last_eval_step != s.step

    def epoch_batches(self) -> EpochBatches:
        """This rank's training batches from the state's position (epoch, samples consumed) to the end of its epoch."""
        s = self.state
        return EpochBatches(self.plan, self.train_sampler, self.train_loader, s.epoch, s.consumed, self.device,
                            self.non_blocking)  # fmt: skip

    def _train_epoch(self, logger: MetricsLogger) -> bool:
        """Train from the current position; True when the epoch ran out of samples."""
        cfg, s = self.cfg, self.state
        batches = self.epoch_batches()
        window = Window()
        while True:
            count = batches.count
            if count == 0:
                return True
            if s.step >= self.total_steps or s.stopped_early:
                return False
            t0 = time.perf_counter()
            micro = batches.take()
            t1 = time.perf_counter()
            result = self.train_step(micro, count)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            s.step += 1
            s.consumed = batches.consumed
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

    # ------------------------------------------------------------------ end

    def _finish(self, exit_code: int, wall: float) -> dict[str, Any]:
        s = self.state
        checkpoint.flush_pending()  # `latest` and retention of the last saves, done in the background
        final = self.backend.full_state_dict(self.model)
        if self.rank == 0:
            save_weights(final, self.run_dir / "model.safetensors", metadata={"step": str(s.step)})
        if self.cfg.log.save_rank_weights:
            local = self.backend.local_state_dict(self.model)
            save_weights({k: _local(v) for k, v in local.items()}, self.run_dir / f"rank_{self.rank}.safetensors")
        if exit_code:
            self._close_trackers()
            self.accelerator.wait_for_everyone()
            self.release_run_dir()
            return {"exit_code": exit_code, "step": s.step}
        test_metrics: dict[str, Any] = {}
        if self.best_weights is not None and s.best_step != s.step:
            self.backend.load_local_state_dict(self.model, self.best_weights)
            best = self.backend.full_state_dict(self.model)
            if self.rank == 0:
                save_weights(best, self.run_dir / "best_model.safetensors", metadata={"step": str(s.best_step)})
        else:
            if s.best_step not in (-1, s.step):
                log.warning("the best weights (step %d) were not restorable; the test split uses the final ones",
                            s.best_step)  # fmt: skip
            if self.rank == 0:  # an earlier segment's (a finished run continued with a larger max_steps)
                (self.run_dir / "best_model.safetensors").unlink(missing_ok=True)
        if "test" in self.datasets:
            test_metrics = self.evaluate("test")
            log.info("test: %s", ", ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if isinstance(v, float)))
            if self.rank == 0 and self.recipe.report is not None:
                preds, targets = self._last_eval_outputs
                self.recipe.report(self.run_dir, "test", preds, targets, self.cfg)
        summary = {
            "recipe": self.recipe.name,
            "steps": s.step,
            "epochs_completed": s.epoch,
            "best_step": s.best_step,
            "best_epoch": s.best_epoch,
            "best_metric": {self.cfg.train.metric: s.best_metric},
            "test": test_metrics,
            "stopped_early": s.stopped_early,
            "skipped_steps": s.skipped_steps,
            "wall_time_s": round(wall, 3),  # all segments of a resumed run, up to each one's last checkpoint
            "samples_per_s": round(s.step * self.plan.global_batch / wall, 2) if wall > 0 else 0.0,
            "segments": s.segments,
            "world_size": self.world_size,
            "backend": self.backend.name,
            "run_dir": str(self.run_dir),
            **({"slurm": slurm_info()} if slurm_info() else {}),
        }
        if self.rank == 0:
            write_json(self.run_dir / "summary.json", summary)
            log.info("done in %.1f s; summary in %s", wall, self.run_dir / "summary.json")
        self._close_trackers()
        self.release_run_dir()
        return summary

    def _close_trackers(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group while other ranks may
        # still be writing, which aborts gloo ranks; parallel.launch.leave_process_group ends multi-process runs.
        for tracker in self.accelerator.trackers:
            tracker.finish()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
