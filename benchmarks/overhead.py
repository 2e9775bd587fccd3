"""Framework overhead: distrain vs a minimal hand-written PyTorch loop (and HF Trainer, Lightning).

Same har model (same init), same batches in the same order, the same dropout draws (every loop
re-seeds the global RNGs before each step as distrain does, rng.seed_step), same AdamW with the
same parameter groups, cosine schedule and clipping, fp32, one process, CPU. The others get
torch's default AdamW, on CPU its per-parameter loop; distrain's own runs torch's multi-tensor
implementation there, bitwise the same updates (--foreach gives it to the others too, which
leaves the frameworks' own overhead). Runs are interleaved (A B C D, A B C D, ...) so
machine noise hits every framework alike; the figure is the median time of blocks of
BLOCK steps (step end to step end, the first block of every run dropped as warm-up), and the
ratio of each framework's median to the hand loop's, measured in the same run. Both wall time
and process CPU time are reported: on a shared machine other processes inflate wall time at
random, while CPU time (one torch thread, no loader workers) counts only this process's work.

    python benchmarks/overhead.py [--reps 3] [--steps 60] [--batch 32] [--foreach]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distrain.recipe import resolve_config  # noqa: E402
from distrain.train.data import ArrayDataset, BatchPlan  # noqa: E402
from distrain.train.rng import seed_step  # noqa: E402

BLOCK = 10
SEED = 0
FOREACH: list[bool | None] = [None]  # the others' AdamW implementation: torch's default, or --foreach


def setup(batch: int, steps: int):
    cfg, recipe = resolve_config(["recipe=har", f"data.batch_size={batch}", f"train.max_steps={steps}"])
    splits = recipe.load_datasets(cfg)
    recipe = recipe.bind(cfg, splits.info)
    train = ArrayDataset(splits.train)
    plan = BatchPlan(num_samples=len(train), micro_batch=batch, grad_accum=1, world_size=1, rank=0, seed=SEED)
    if steps > plan.steps_per_epoch:  # later batches would be short or empty: the loops would not compare
        print(f"error: --steps={steps} exceeds the {plan.steps_per_epoch} full batches of epoch 0 at --batch={batch}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    order = plan.order(0)
    batches = [order[i * batch : (i + 1) * batch].tolist() for i in range(steps)]  # epoch 0, as distrain takes it
    return cfg, recipe, train, batches


def make_model(cfg, recipe) -> torch.nn.Module:
    torch.manual_seed(SEED)  # the trainer seeds, builds the datasets (no torch RNG), then the model
    return recipe.build_model()


def seed(step: int) -> None:
    """The global RNGs for 0-based `step`, as distrain seeds them on rank 0 (its dropout stream)."""
    seed_step(SEED, 0, step)


def make_optimizer(model: torch.nn.Module, cfg, steps: int):
    """AdamW without decay on 1-D parameters, linear warmup then cosine: written out by hand."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, foreach=FOREACH[0])
    warm = round(cfg.sched.warmup_ratio * steps)

    def factor(s: int) -> float:
        return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * min((s - warm) / max(1, steps - warm), 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def loader(train: ArrayDataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(train, batch_sampler=batches, collate_fn=lambda b: b)


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def blocks(ends: list[tuple[float, float]], start: tuple[float, float], every: int = 1) -> list[tuple[float, float]]:
    """(wall, cpu) durations of consecutive BLOCK-step blocks, from stamps taken every `every` steps;
    the first block is dropped as warm-up."""
    k = BLOCK // every
    stamps = [start, *ends[k - 1 :: k]]
    return [(b[0] - a[0], b[1] - a[1]) for a, b in itertools.pairwise(stamps)][1:]


def run_hand(cfg, recipe, train, batches) -> tuple[list[float], list[float]]:
    model = make_model(cfg, recipe)
    opt, sched = make_optimizer(model, cfg, len(batches))
    model.train()
    ends, losses = [], []
    start = now()
    for step, batch in enumerate(loader(train, batches)):
        seed(step)
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        ends.append(now())
    return blocks(ends, start), window_means(losses)


def window_means(losses: list[float]) -> list[float]:
    return [float(np.mean(losses[i : i + BLOCK])) for i in range(0, len(losses), BLOCK)]


def run_distrain(cfg, recipe, train, batches) -> tuple[list[tuple[float, float]], list[float]]:
    from distrain.train.trainer import Trainer

    ends: list[tuple[float, float]] = []

    class Stamped(Trainer):
        def _log_train(self, *args, **kwargs):  # called right after every BLOCK-th step (log.every)
            super()._log_train(*args, **kwargs)
            ends.append(now())

    with tempfile.TemporaryDirectory() as tmp:
        args = ["recipe=har", f"data.batch_size={len(batches[0])}", f"train.max_steps={len(batches)}",
                f"log.every={BLOCK}", "log.progress=false", f"output_dir={tmp}", "ckpt.save_best=false"]  # fmt: skip
        cfg_d, recipe_d = resolve_config(args)
        trainer = Stamped(cfg_d, recipe_d)
        start = now()
        trainer.train()
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "step_time" in r]
    return blocks(ends, start, every=BLOCK), losses


def run_hf(cfg, recipe, train, batches) -> tuple[list[float], list[float]] | str:
    try:
        from transformers import Trainer as HFTrainer
        from transformers import TrainerCallback, TrainingArguments
    except ImportError as e:
        return f"not installed ({e})"

    class Wrapped(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, y):
            logits = self.model(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

    ends: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seed(state.global_step)

        def on_step_end(self, *args, **kwargs):
            ends.append(now())

    model = Wrapped(make_model(cfg, recipe))
    opt, sched = make_optimizer(model.model, cfg, len(batches))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=len(batches), per_device_train_batch_size=len(batches[0]),
            max_grad_norm=cfg.train.clip_norm, logging_steps=BLOCK, save_strategy="no", report_to=[],
            use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
        )  # fmt: skip

        class SameBatches(HFTrainer):
            def get_train_dataloader(self):
                return loader(train, batches)

        trainer = SameBatches(model=model, args=args, train_dataset=train, optimizers=(opt, sched), callbacks=[Stamp()])
        start = now()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return blocks(ends, start), losses


def run_lightning(cfg, recipe, train, batches) -> tuple[list[float], list[float]] | str:
    try:
        import lightning as L
    except ImportError as e:
        return f"not installed ({e})"
    ends: list[tuple[float, float]] = []
    losses: list[float] = []

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def on_train_batch_start(self, batch, batch_idx):
            seed(self.global_step)

        def training_step(self, batch, _):
            return F.cross_entropy(self.model(batch["x"]), batch["y"])

        def on_train_batch_end(self, outputs, *args):
            losses.append(float(outputs["loss"]))
            ends.append(now())

        def configure_optimizers(self):
            opt, sched = make_optimizer(self.model, cfg, len(batches))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = Module(make_model(cfg, recipe))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=len(batches), gradient_clip_val=cfg.train.clip_norm,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tempfile.gettempdir(),
    )  # fmt: skip
    start = now()
    trainer.fit(module, loader(train, batches))
    return blocks(ends, start), window_means(losses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="steps per run (within epoch 0)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", default="hand,distrain,hf,lightning")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least hurt by other load)")
    parser.add_argument("--foreach", action="store_true", help="the others' AdamW multi-tensor, like distrain's")
    args = parser.parse_args()
    FOREACH[0] = True if args.foreach else None
    torch.set_num_threads(args.threads)
    cfg, recipe, train, batches = setup(args.batch, args.steps)
    runners = {"hand": run_hand, "distrain": run_distrain, "hf": run_hf, "lightning": run_lightning}
    names = [n for n in args.only.split(",") if n in runners]
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for rep in range(args.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order too
            if name in skipped:
                continue
            result = runners[name](cfg, recipe, train, batches)
            if isinstance(result, str):
                skipped[name] = result
                continue
            times[name].extend(result[0])
            losses[name] = result[1]
    print(f"har, batch {args.batch}, {args.steps} steps x {args.reps} interleaved reps, fp32, 1 process, "
          f"{torch.get_num_threads()} CPU thread(s); blocks of {BLOCK} steps, medians"
          + ("; every loop's AdamW multi-tensor" if args.foreach else ""))  # fmt: skip
    print(f"{'framework':<10} {'wall ms/step':>13} {'wall ratio':>11} {'CPU ms/step':>12} {'CPU ratio':>10} "
          f"{'blocks':>7} {'max |dloss|':>12}")  # fmt: skip
    hand_wall = statistics.median(b[0] for b in times["hand"])
    hand_cpu = statistics.median(b[1] for b in times["hand"])
    for name in names:
        if name in skipped:
            print(f"{name:<10} skipped: {skipped[name]}")
            continue
        wall = statistics.median(b[0] for b in times[name])
        cpu = statistics.median(b[1] for b in times[name])
        n = min(len(losses[name]), len(losses["hand"]))
        dloss = max(abs(a - b) for a, b in zip(losses[name][:n], losses["hand"][:n], strict=True))
        print(f"{name:<10} {wall / BLOCK * 1e3:>13.2f} {wall / hand_wall:>11.3f} {cpu / BLOCK * 1e3:>12.2f} "
              f"{cpu / hand_cpu:>10.3f} {len(times[name]):>7} {dloss:>12.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
