"""Fault injection for the crash and signal tests, off unless DISTRAIN_CRASH_AT is set.

DISTRAIN_CRASH_AT=<stage>[:<step>[:<signal>[:<target>]]] makes rank 0, on reaching `stage` at
optimizer step `step` (any step if empty), send `signal` (default SIGKILL) to `target`: "self"
(default) or "launcher" (its parent process). Stages: the save stages in CRASH_STAGES, and
"eval" at the start of an evaluation. A real run never sets the variable; the tests use it to
land a kill or a signal at one exact point of a save or an evaluation.
"""

from __future__ import annotations

import os
import signal
import time

CRASH_ENV = "DISTRAIN_CRASH_AT"
CRASH_STAGES = ("before_shards", "between_shards", "before_complete", "before_latest")
EVAL_STAGE = "eval"
PROPAGATION_S = 0.5  # a launcher passes a signal on within milliseconds; this leaves ample room


def fault_point(stage: str, rank: int, step: int) -> None:
    want = os.environ.get(CRASH_ENV, "")
    if not want or rank != 0:
        return
    name, at, sig_name, target = [*want.split(":"), "", "", ""][:4]
    if name != stage or (at and int(at) != step):
        return
    sig = signal.Signals[sig_name] if sig_name else signal.SIGKILL
    if (target or "self") == "self":
        os.kill(os.getpid(), sig)
    elif target == "launcher":
        os.kill(os.getppid(), sig)
        time.sleep(PROPAGATION_S)  # so the launcher's forwarded signal lands inside this stage
    else:
        raise ValueError(f"{CRASH_ENV}={want}: target must be self or launcher")
