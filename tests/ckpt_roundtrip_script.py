"""Save then load in the same processes (accelerate issue 3896); launched by test_checkpoint_multiproc.py.

Builds a Trainer from the command line, saves a checkpoint, perturbs weights and optimizer
state, loads the checkpoint back in the same processes and prints ROUNDTRIP ok/MISMATCH.
"""

from __future__ import annotations

import sys

import torch

from distrain import checkpoint as ck
from distrain.checkpoint import load as checkpoint_load
from distrain.checkpoint.layout import flatten_optim
from distrain.recipe import resolve_config
from distrain.train.trainer import Trainer


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    model_state, optim_state = trainer.backend.checkpoint_state(trainer.model, trainer.optimizer)
    tensors, _ = flatten_optim(optim_state)
    out = {f"model.{k}": full(v) for k, v in model_state.items()}
    return out | {f"optim.{k}": full(v) for k, v in tensors.items()}


def main() -> None:
    cfg, recipe = resolve_config(sys.argv[1:])
    trainer = Trainer(cfg, recipe)
    path = trainer.checkpoints.save(ck.step_name(0))
    saved = snapshot(trainer)
    model_state, optim_state = trainer.backend.checkpoint_state(trainer.model, trainer.optimizer)
    with torch.no_grad():  # perturb everything the checkpoint holds
        for t in [*model_state.values(), *flatten_optim(optim_state)[0].values()]:
            (t.to_local() if hasattr(t, "to_local") else t).add_(1.0)
    trainer.backend.load_checkpoint_state(trainer.model, trainer.optimizer, model_state, optim_state)
    assert any(not torch.equal(v, saved[k]) for k, v in snapshot(trainer).items()), "perturbation had no effect"
    model_state, optim_state = trainer.backend.checkpoint_state(trainer.model, trainer.optimizer)
    values = checkpoint_load.load_states(path, model_state, optim_state)
    trainer.backend.load_checkpoint_state(trainer.model, trainer.optimizer, *values)
    after = snapshot(trainer)
    ok = after.keys() == saved.keys() and all(torch.equal(after[k], saved[k]) for k in saved)
    print(f"ROUNDTRIP rank {trainer.rank} {'ok' if ok else 'MISMATCH'}", flush=True)


if __name__ == "__main__":
    main()
