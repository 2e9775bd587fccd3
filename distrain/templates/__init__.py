"""Files distrain ships as package data: the Slurm batch templates (slurm/) and the accelerate launch configs
(launch_configs/). The repository's top-level slurm/ and launch_configs/ are links to these folders, so a
checkout and an installed wheel read the same files."""

from pathlib import Path

SLURM = Path(__file__).resolve().parent / "slurm"
LAUNCH_CONFIGS = Path(__file__).resolve().parent / "launch_configs"
