"""Entry point: `accelerate launch -m distrain.run recipe=har [key=value ...]` or `python -m distrain.run ...`
(in a checkout also `accelerate launch distrain/run.py ...` and `python distrain/run.py ...`)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    # and drop the script's own folder, whose subpackages (train, tools, ...) must not become top-level names
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from distrain.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main(sys.argv[1:]))
