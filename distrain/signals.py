"""Interrupts: the handler only records the signal; the trainer acts at the next step boundary.

Saving inside a signal handler can deadlock (a collective or a lock held by the interrupted
frame), so handlers never do work. Ranks agree on the flag through an all-reduce in the step.
"""

from __future__ import annotations

import signal
from types import FrameType

# Exit codes, documented in the README: 130 after SIGINT (shell convention), 143 after SIGTERM,
# 138 after SIGUSR1 (128 + signal number) -- all ranks saved a checkpoint at the step boundary
# (distrain.checkpoint) and `resume=auto` with the same output_dir continues exactly.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGUSR1: 138}


class InterruptFlag:
    def __init__(self) -> None:
        self.signum: int = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.signum = signum

    def install(self) -> InterruptFlag:
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 130) if self.signum else 0
