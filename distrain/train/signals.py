"""Interrupts: the handler only records the signal; the trainer acts at the next step boundary.

Saving inside a signal handler can deadlock (a collective or a lock held by the interrupted
frame), so handlers never do work. Ranks agree on the flag through an all-reduce in the step.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

# Exit codes, documented in the README: 130 after SIGINT (shell convention), 143 after SIGTERM,
# 138 after SIGUSR1, 129 after SIGHUP or a dead launcher (128 + signal number) -- all ranks saved
# a checkpoint at the step boundary (distrain.checkpoint) and `resume=auto` with the same
# output_dir continues exactly.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138, signal.SIGHUP: 129}

# A launcher that receives the terminal's Ctrl-C passes SIGINT on to its workers, so a worker that
# shares the terminal's process group gets two within milliseconds: that pair is one Ctrl-C.
ECHO_WINDOW_S = 1.0

# Variables torchrun's and accelerate's elastic agent set in every worker: the parent is the agent.
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


class InterruptFlag:
    """The first interrupt signal a process got (0: none), and whether its launcher has died."""

    def __init__(self) -> None:
        self.signum: int = 0
        self.received_at = 0.0
        self.launcher_pid: int | None = None
        self.launcher_gone = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            if time.monotonic() - self.received_at > ECHO_WINDOW_S:
                raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
            return
        if not self.signum:
            self.signum, self.received_at = signum, time.monotonic()

    def install(self) -> InterruptFlag:
        for sig in EXIT_CODES:
            if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # started under `nohup`: closing the terminal must not stop the run
            self._previous[sig] = signal.signal(sig, self._handle)
        if any(os.environ.get(v) for v in LAUNCHER_VARS):
            self.launcher_pid = os.getppid()
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def poll(self) -> int:
        """The signal to stop for, noticing a launcher that died (SIGKILL, or a signal it does not
        handle such as SIGUSR1 under torchrun): its workers were re-parented, and stop as on SIGHUP."""
        if not self.signum and self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            self.launcher_gone = True
            self.signum, self.received_at = signal.SIGHUP, time.monotonic()
        return self.signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 130) if self.signum else 0

    def describe(self) -> str:
        if self.launcher_gone:
            return f"the launcher (pid {self.launcher_pid}) is gone"
        return signal.Signals(self.signum).name if self.signum else "no signal"
