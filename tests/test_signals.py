"""Signals under every launcher: each stops every rank at a step boundary with one checkpoint,
the resumed run continues bitwise, and no process is left behind.

One chain of segments per setup (tests/crash_harness.py): each segment is ended by one signal,
the next resumes it, and every segment's rows must equal one uninterrupted run's bitwise. The
signals: SIGINT to the launcher's process group (what a terminal's Ctrl-C reaches: the launcher,
which passes it on, since torch's agent starts its workers in sessions of their own); SIGINT to
the launcher and every worker at once (a Ctrl-C the launcher echoes: one interrupt, not two);
SIGTERM, SIGUSR1 and SIGKILL to the launcher (SIGUSR1 and SIGKILL kill accelerate's and
torchrun's agent: the workers notice their launcher is gone); SIGTERM to the workers; SIGUSR1
to one rank; and a signal to the launcher from inside an evaluation and inside a save
(DISTRAIN_CRASH_AT), which must stop the run at that step rather than a step later.

Exit codes (crash_harness.expected_codes): `python distrain/run.py` and `distrain launch` exit
130/143/138/129 themselves; under accelerate launch or torchrun the ranks exit with those codes
and the agent decides its own (1, or killed by SIGUSR1), as the README's "Stopping" says.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from crash_harness import SETUPS, Kill, reference, run_kills, under

STEPS = ("train.max_steps=36",)  # room for nine stops of two or three steps each

ALL_TARGETS = [
    Kill("signal", sig="SIGINT", target="group", rows=2),
    Kill("signal", sig="SIGINT", target="all", rows=2),
    Kill("signal", sig="SIGTERM", target="launcher", rows=2),
    Kill("signal", sig="SIGUSR1", target="launcher", rows=2),
    Kill("signal", sig="SIGTERM", target="workers", rows=2),
    Kill("signal", sig="SIGUSR1", target="rank1", rows=2),
    Kill("signal", sig="SIGKILL", target="launcher", rows=2),
    Kill("signal", sig="SIGTERM", target="launcher", stage="eval"),
    Kill("signal", sig="SIGINT", target="group", stage="before_complete"),
]
# FSDP2 under accelerate launch: the save path of the signals that reach the launcher.
LAUNCHER_FACING = [ALL_TARGETS[i] for i in (2, 3, 7)]
# What the launcher passes on or dies of, for the other launchers: the worker-facing signals
# (SIGTERM to the workers, SIGUSR1 to one rank) take the same path in distrain under any launcher,
# so ddp-accelerate covers them once.
THROUGH_LAUNCHER = [ALL_TARGETS[i] for i in (0, 1, 2, 3, 6, 7, 8)]
ONE_PROCESS = [
    Kill("signal", sig="SIGINT", target="group", rows=2),
    Kill("signal", sig="SIGTERM", target="launcher", rows=2),
    Kill("signal", sig="SIGUSR1", target="launcher", rows=2),
    Kill("signal", sig="SIGHUP", target="launcher", rows=2),
    Kill("signal", sig="SIGTERM", target="launcher", stage="eval"),
    Kill("signal", sig="SIGINT", target="launcher", stage="before_complete"),
]

PLANS = {
    "single": (SETUPS["single"], ONE_PROCESS),
    "ddp-accelerate": (SETUPS["ddp"], ALL_TARGETS),
    "fsdp2-torchrun": (under("torchrun", SETUPS["fsdp2"]), THROUGH_LAUNCHER),
    "ddp-distrain-launch": (under("distrain", SETUPS["ddp"]), THROUGH_LAUNCHER),
    "fsdp2-accelerate": (SETUPS["fsdp2"], LAUNCHER_FACING),
}


@pytest.mark.parametrize("plan", [pytest.param(p, marks=pytest.mark.multiproc) if PLANS[p][0].launch else p
                                  for p in PLANS])  # fmt: skip
def test_every_signal_saves_once_and_resumes_exactly(plan, tmp_path):
    setup, kills = PLANS[plan]
    setup = replace(setup, args=(*setup.args, *STEPS))
    ref = reference(setup, tmp_path / "reference")
    result = run_kills(setup, tmp_path, ref, kills)
    print(f"{plan}: {len(result.verdicts)} signals in {result.chains} chains, {result.wall:.0f} s")
    failed = [v.line(plan, i) for i, v in enumerate(result.verdicts, 1) if not v.exact]
    assert not failed and not result.problems, "\n".join([*failed, *result.problems])
    assert len(result.verdicts) == len(kills)


def test_an_ignored_sighup_stays_ignored_and_a_dead_launcher_is_noticed(monkeypatch):
    """Under `nohup` (SIGHUP ignored) closing the terminal must not stop a run; a worker whose
    launcher died (re-parented: another parent pid) stops as on SIGHUP, with exit code 129."""
    import os
    import signal

    from distrain.train.signals import InterruptFlag

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    flag = InterruptFlag().install()
    try:
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert flag.poll() == 0 and flag.launcher_pid == os.getppid()
        flag.launcher_pid = os.getppid() + 100_000  # as if the parent had changed
        assert flag.poll() == signal.SIGHUP and flag.exit_code == 129 and flag.launcher_gone
    finally:
        flag.restore()
        signal.signal(signal.SIGHUP, previous)
