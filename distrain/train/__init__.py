"""The training loop: the Trainer and the parts of a step (data, optimizer, signals, seeds, run dir)."""
