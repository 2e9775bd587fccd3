"""Every error distrain raises on purpose, each owning the exit code the command line maps it to.

The command line catches `DistrainError` in one place (`cli.run_command`) and prints its message as
one line; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DistrainError(Exception):
    """An error with a one-line message for the user and the process exit code that goes with it."""

    exit_code = 1


class ConfigError(DistrainError):
    """Bad user input: a config key or value, a recipe, a path (exit code 2)."""

    exit_code = 2


class CheckpointError(ConfigError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model (exit code 2)."""


class ChecksumError(CheckpointError):
    """A checkpoint's bytes do not match its recorded checksums (found while loading it)."""


class RunDirBusy(ConfigError):
    """Another live process holds the run dir's lock."""


class MemoryBudgetError(ConfigError):
    """The chosen backend's training state cannot fit the memory a process may use (exit code 2).

    Found before the optimizer exists and before anything is written, on every rank at once: like a
    batch larger than the data, the run as configured cannot work here, and the fix is a setting
    (a sharding backend, more processes), so it is bad input rather than a failed training.
    """


class LaunchError(DistrainError, RuntimeError):
    """The processes that are running are not the ones the launcher was asked for (exit code 3)."""

    exit_code = 3


class TrainingError(DistrainError, RuntimeError):
    """Training cannot go on, e.g. too many consecutive non-finite losses (exit code 1)."""

    exit_code = 1


class OutOfMemory(TrainingError):
    """A real out-of-memory error while building or training (exit code 1: the run started and failed),
    maybe on one rank only."""


class Interrupted(DistrainError):
    """A signal stopped the run after its checkpoint; the exit code is the signal's (130, 143, ...)."""

    def __init__(self, exit_code: int):
        super().__init__(f"interrupted, exit code {exit_code}")
        self.exit_code = exit_code
