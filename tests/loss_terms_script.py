"""One training step and one evaluation under 2-process DDP; launched by tests/test_loss_terms.py.

Usage: loss_terms_script.py OUT_DIR key=value... Every rank writes OUT_DIR/rank<r>.json (its
micro-batches' label counts, and the error a step whose terms per sample differ between the ranks
raised); rank 0 also writes the weights before and after the step, the
step's global sample indices and the validation result, for the test's plain-PyTorch reference.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from distrain.errors import ConfigError
from distrain.recipe import StepOutput, resolve_config
from distrain.train.trainer import Trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in trainer.backend.unwrap(trainer.model).state_dict().items()}


def unequal_terms_per_sample(trainer: Trainer) -> str | None:
    """A per-token loss without mask or loss_terms whose length differs between the ranks: every
    rank must refuse the step (not only the ranks whose own length differs from the agreed one)."""
    step = trainer.recipe.step

    def unmasked(model: torch.nn.Module, batch: Any) -> StepOutput:
        return StepOutput(loss=step(model, batch).loss)

    trainer.recipe = dataclasses.replace(trainer.recipe, loss_terms=None, step=unmasked)
    data, collate = trainer.datasets["train"], trainer.recipe.collate
    assert collate is not None
    same = [i for i in range(len(data)) if len(data[i]["tokens"]) == 3 + trainer.rank][:2]
    assert len(same) == 2
    try:
        trainer.train_step([collate([data[i] for i in same])], global_count=4)
    except ConfigError as e:
        return str(e)
    return None


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    cfg, recipe = resolve_config(args)
    trainer = Trainer(cfg, recipe)
    before = weights(trainer)
    batches = trainer.epoch_batches()
    count = batches.count
    step_samples = trainer.plan.step_samples(trainer.plan.order(0), 0).tolist()
    micro = batches.take()
    assert trainer.recipe.loss_terms is not None
    terms = [int(trainer.recipe.loss_terms(b)) for b in micro]
    assert trainer.train_step(micro, count).applied
    after = weights(trainer)
    result = trainer.evaluate("val")
    error = unequal_terms_per_sample(trainer)
    (out / f"rank{trainer.rank}.json").write_text(json.dumps({"terms": terms, "error": error}))
    if trainer.rank == 0:
        save_file(before, str(out / "before.safetensors"))
        save_file(after, str(out / "after.safetensors"))
        preds, targets = result.preds, result.targets
        assert isinstance(preds, dict) and isinstance(targets, list)
        (out / "result.json").write_text(json.dumps({
            "step_samples": step_samples,
            "metrics": result.metrics,
            "ids": preds["id"].tolist(),
            "targets": [t.tolist() for t in targets],
        }))  # fmt: skip


if __name__ == "__main__":
    main()
