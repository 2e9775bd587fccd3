"""Exact resume under the recipes' defaults (dropout on), through real processes killed at random.

Each plan runs one configuration as chains of segments in one run dir (tests/crash_harness.py):
a segment is `distrain/run.py ... resume=auto` ended by a kill point, and the next segment
resumes it. 20 random kill points in all (SIGKILL at a random moment, of the whole run or of one
rank, or of rank 0 inside a save through DISTRAIN_CRASH_AT), plus SIGTERM and SIGUSR1 (exit
143/138 with a checkpoint at the stop step) and a run finished by train.max_steps=12 continued
with a larger max_steps, on one process, DDP and FSDP2 (2 processes). Every segment's per-step losses,
gradient norms, lrs and evaluation rows must equal one uninterrupted run's bitwise, no segment
may start before the newest checkpoint logged as saved, and each finished run dir must hold the
reference's rows once each, test metrics and best step (summary.json), model.safetensors and
best_model.safetensors.

The max_steps plans use a constant schedule: a cosine's lr at a step depends on max_steps, so a
run whose max_steps grew cannot equal a straight run under it. The one-process plan keeps har's
cosine schedule with 17 kill points, run as two chains side by side (one core each).

Two deterministic one-process tests at the end repeat, through DISTRAIN_CRASH_AT, records
problems the random points found (an evaluation row kept twice; a start from scratch over a
killed run's rows).

The kill points come from fixed seeds and are printed (pytest shows them on a failure, or with
-s); a timed kill lands at another moment on another machine, a crash point at the same save.
`python benchmarks/crash_resume.py` runs the same with 100 or more kill points.
"""

from __future__ import annotations

import random

import pytest
from crash_harness import (
    CRASH_ENV,
    ENV,
    SETUPS,
    Kill,
    constant_lr,
    random_kills,
    reference,
    run_kills,
    run_kills_in_lanes,
)

from helpers import metrics_rows, run_distrain

SEED = 1301  # the kill points' seed: change it to draw others

SIGNALS_THEN_KILLS = [Kill("sigterm", rows=2), Kill("sigusr1", rows=3)]

PLANS = {
    # (setup, first segment's max_steps or None, kill points)
    "single": (SETUPS["single"], None, [Kill("sigusr1", rows=4), *random_kills(random.Random(SEED), 16, False)]),
    # 20 steps: the best evaluation after 12 is step 8's (best_model.safetensors written), the
    # final best is the last step's (no best_model.safetensors in the straight run)
    "single-max_steps": (constant_lr(SETUPS["single"], steps=20), 12, [Kill("sigterm", rows=3)]),
    "ddp-max_steps": (constant_lr(SETUPS["ddp"]), 12,
                      [*SIGNALS_THEN_KILLS, *random_kills(random.Random(SEED + 1), 2, True)]),
    "fsdp2-max_steps": (constant_lr(SETUPS["fsdp2"]), 12,
                        [*SIGNALS_THEN_KILLS[::-1], *random_kills(random.Random(SEED + 2), 2, True)]),
}  # fmt: skip


def test_at_least_20_random_kill_points():
    random_points = [k for _, _, kills in PLANS.values() for k in kills if k.kind in ("sigkill", "crash")]
    assert len(random_points) >= 20
    assert {k.kind for k in random_points} == {"sigkill", "crash"}


@pytest.mark.parametrize("plan", [pytest.param(p, marks=pytest.mark.multiproc) if PLANS[p][0].launch else p
                                  for p in PLANS])  # fmt: skip
def test_killed_runs_resume_exactly(plan, tmp_path):
    setup, stop, kills = PLANS[plan]
    print(f"{plan} (seed {SEED}): " + "; ".join(map(str, kills)))
    ref = reference(setup, tmp_path / "reference")
    if setup.launch is None and stop is None:  # one process a run: two chains side by side
        result = run_kills_in_lanes(setup, tmp_path, ref, kills, lanes=2)
    else:
        result = run_kills(setup, tmp_path, ref, kills, first_stop=stop)
    print(f"{plan}: {len(result.verdicts)} kill points in {result.chains} chains, {result.wall:.0f} s")
    failed = [v.line(plan, i) for i, v in enumerate(result.verdicts, 1) if not v.exact]
    assert not failed and not result.problems, "\n".join([*failed, *result.problems])
    assert len(result.verdicts) == len(kills)


# Deterministic repros of what the random kill points found (one process, a few seconds each).
TINY = ["recipe=har", "model.width=16", "model.depth=1", "model.heads=2", "log.progress=false", "log.every=1"]


def lineage_keys(run_dir) -> list[tuple[str, int]]:
    return [("train" if "loss" in r else "eval", r["step"]) for r in metrics_rows(run_dir) if "event" not in r]


def test_a_second_resume_from_a_checkpoint_taken_before_its_evaluation_keeps_one_eval_row(tmp_path):
    """ckpt.every_steps=19 saves at the epoch's last step before the epoch-end evaluation; the
    run evaluates at 19 and is killed at step 24's save; the resume from 19 evaluates at 19 again
    and metrics.jsonl must keep one of the two rows (the interrupted segment's goes aside)."""
    args = [*TINY, "data.batch_size=128", "train.max_steps=24", "train.eval_every=4", "ckpt.every_steps=19",
            f"output_dir={tmp_path}"]  # fmt: skip
    proc = run_distrain(args, env={**ENV, CRASH_ENV: "before_shards:24"}, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    run_distrain([*args, "resume=auto"], env=ENV)
    keys = lineage_keys(tmp_path)
    assert sorted(set(keys)) == sorted(keys), f"repeated rows: {sorted({k for k in keys if keys.count(k) > 1})}"


def test_a_start_from_scratch_over_a_killed_run_moves_its_rows_aside(tmp_path):
    """Killed inside its first save, the run has rows but no checkpoint; resume=auto starts from
    scratch and metrics.jsonl must not hold steps 1-3 twice."""
    args = [*TINY, "train.max_steps=6", "ckpt.every_steps=3", f"output_dir={tmp_path}"]
    proc = run_distrain(args, env={**ENV, CRASH_ENV: "before_complete:3"}, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [k for k in lineage_keys(tmp_path) if k[0] == "train"] == [("train", s) for s in (1, 2, 3)]
    run_distrain([*args, "resume=auto"], env=ENV)
    assert [k for k in lineage_keys(tmp_path) if k[0] == "train"] == [("train", s) for s in range(1, 7)]
