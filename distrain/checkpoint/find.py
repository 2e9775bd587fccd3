"""Which checkpoint to load: resume=auto|latest|best|<path>, passing over damaged ones with a reason."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from distrain.checkpoint.collective import agree_failed
from distrain.checkpoint.format import ABANDONED, CKPT_DIR, COMPLETE, INDEX, LATEST, STATE, log, read_json, step_dirs
from distrain.checkpoint.integrity import verify_together
from distrain.checkpoint.save import point_latest, restore_replaced
from distrain.checkpoint.weights import fsync_path
from distrain.errors import CheckpointError

SKIPPED = "skipping checkpoint: "  # how choose and the resume warn about a checkpoint they pass over



def with_skips(message: str, skipped: list[str]) -> str:
    """`message` followed by why each checkpoint was passed over, in one line."""
    return f"{message} ({'; '.join(skipped)})" if skipped else message



def warn_skips(skipped: list[str]) -> None:
    for reason in skipped:
        log.warning(SKIPPED + "%s", reason)



def find_resumable(run_dir: str | os.PathLike) -> Path | None:
    """The newest COMPLETE checkpoint that verifies; incomplete or corrupt ones are skipped with a warning."""
    chosen = choose("auto", run_dir, defer=False)
    return chosen[0] if chosen else None



def resolve(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """A verified checkpoint folder and its index, from itself, a run dir (its newest good
    checkpoint) or a checkpoints/ folder; CheckpointError if there is none."""
    skipped: list[str] = []
    try:
        chosen = choose(str(path), path, defer=False, skipped=skipped)
    except CheckpointError as e:  # one line: the reasons the damaged ones were passed over in it
        raise CheckpointError(with_skips(str(e), skipped)) from None
    warn_skips(skipped)
    assert chosen is not None  # choose raises for anything but resume=auto
    return chosen



def choose(resume: str, run_dir: str | os.PathLike, rank: int = 0, world: int = 1, skip: tuple[str, ...] = (),
           defer: bool = True, skipped: list[str] | None = None) -> tuple[Path, dict[str, Any]] | None:  # fmt: skip
    """The checkpoint to resume from and its index; all ranks call it and get the same answer.

    `resume=auto`: the newest step checkpoint in run_dir that verifies (None if none does);
    `resume=<folder>`: that checkpoint, or an error; `resume=<run dir>`: its newest good one.
    `skip`: folder names already found bad. `skipped`: where to put why each damaged one was passed
    over (the caller warns or puts the reasons in its error); without it rank 0 warns. The ranks
    share the checksum work (each hashes every world-th eighth of the files; with `defer`, a
    checkpoint that hashed_while_loading is left to checkpoint_load.load_verified, each rank hashing
    its own shard while loading it) and agree through one all-reduce per candidate (at least one, so
    ranks that see different folders, even none, stop with an error instead of waiting for each
    other). find_resumable and resolve are this with one process and nothing deferred.
    """
    p = Path(run_dir if resume == "auto" else resume)
    explicit = resume != "auto" and ((p / INDEX).is_file() or (p / COMPLETE).is_file())
    candidates = [p] if explicit else list(reversed(step_dirs((p.parent if p.name == CKPT_DIR else p) / CKPT_DIR)))
    candidates = [c for c in candidates if c.name not in skip]
    for candidate in candidates or [None]:
        index, error = verify_together(candidate, len(candidates), rank, world, defer)
        if candidate is None:
            break
        if index is not None:
            return candidate, index
        if explicit:
            raise CheckpointError(error)
        if skipped is not None:
            skipped.append(error)
        elif rank == 0:
            log.warning(SKIPPED + "%s", error)
    if resume == "auto":
        return None
    if not p.exists():
        raise CheckpointError(f"{resume} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{resume} is a file, not a checkpoint folder or a run dir")
    if candidates:  # each was passed over; resolve and the resume put the reasons in the line
        raise CheckpointError(f"no checkpoint in {resume} verifies")
    raise CheckpointError(f"{resume} holds no complete checkpoint (looked for {CKPT_DIR}/step_*/{COMPLETE})")



def _saved_step(path: Path) -> int | None:
    """The step trainer_state.json of a checkpoint folder names (not verified), None if unreadable."""
    if not path.is_dir():
        return None
    try:
        step = read_json(path / STATE).get("step")
    except (CheckpointError, AttributeError):
        return None
    return step if isinstance(step, int) else None



def find_best(ckpt: Path, state: dict[str, Any], rank: int = 0, world: int = 1) -> tuple[Path, dict[str, Any]] | None:
    """The best/ checkpoint next to `ckpt` that holds the run's best step (when that is not
    `ckpt`'s own step) and verifies on every rank, with its index; None if there is none.

    All ranks call it and get the same answer. Looks at best/ and at `.tmp-old-best`, the copy
    of the previous best/ that a crash between the two renames of its replacement leaves
    (and that exists until the replacement is flushed), so the best weights survive a crash at
    any point of a save of best/.
    """
    train = state.get("train_state") or {}
    best_step = train.get("best_step", -1)
    if ckpt.name == "best" or best_step in (-1, train.get("step")):
        return None
    return find_best_in(ckpt.parent, best_step, rank, world)


def find_best_in(root: Path, best_step: int, rank: int = 0, world: int = 1) -> tuple[Path, dict[str, Any]] | None:
    """The best/ checkpoint (or its moved-aside copy `.tmp-old-best`) in checkpoints folder `root` that
    holds step `best_step` and verifies on every rank, with its index; None if there is none. All
    ranks call it and get the same answer."""
    candidates = [p for p in (root / "best", root / ".tmp-old-best") if _saved_step(p) == best_step]
    for candidate in candidates or [None]:
        index, error = verify_together(candidate, len(candidates), rank, world, defer=False)
        if candidate is None:
            break
        if index is not None:
            return candidate, index
        if rank == 0:
            log.warning("best checkpoint not usable: %s", error)
    return None



def set_aside_future(ckpt: Path, run_dir: str | os.PathLike, rank: int = 0, world: int = 1) -> Path | None:
    """After resuming from `ckpt` (step X) into its own run dir, move the checkpoints of the
    abandoned future (step_* folders after X, a best/ of a later step) into
    `checkpoints/abandoned-<time>/`, so retention (by step number) and resume=auto continue the
    lineage that runs now; nothing is deleted. A best/ that a crash left moved aside is put back.

    Call after every rank has loaded `ckpt`, before anything new is written. Rank 0 moves; all
    ranks get its outcome (an error on every rank if it failed). Returns the folder the
    checkpoints were moved into, None if none.
    """
    root = Path(run_dir) / CKPT_DIR
    if ckpt.parent.resolve() != root.resolve():
        return None  # resumed into another run dir: this lineage has no future there
    dest, error = None, ""
    if rank == 0:
        try:
            dest = _move_future(root, ckpt)
            restore_replaced(root, "best")
        except (OSError, CheckpointError) as e:
            error = f"cannot move the checkpoints after {ckpt} aside: {e}"
    if agree_failed(bool(error), world):
        raise CheckpointError(error or f"rank 0 could not move the checkpoints after {ckpt} aside (see its error)")
    return dest



def _move_future(root: Path, ckpt: Path) -> Path | None:
    step = _saved_step(ckpt)
    if step is None:
        raise CheckpointError(f"{ckpt / STATE} names no step")
    later = [p for p in step_dirs(root) if int(p.name.removeprefix("step_")) > step]
    later += [p for p in (root / "best", root / ".tmp-old-best") if (_saved_step(p) or -1) > step]
    if not later:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = root / f"{ABANDONED}{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = root / f"{ABANDONED}{stamp}-{n}"
    dest.mkdir()
    for p in later:  # .tmp-old-best keeps a visible name there: it is a finished checkpoint
        os.replace(p, dest / ("best.previous" if p.name == ".tmp-old-best" else p.name))
    (dest / "README").write_text(f"Checkpoints of a run that had gone on past {ckpt.name}: set aside on {stamp} "
                                 f"when the run was resumed from {ckpt.name}, which discards them.\n")  # fmt: skip
    fsync_path(root)
    remaining = step_dirs(root)
    if remaining:
        point_latest(root, remaining[-1].name)
    else:
        (root / LATEST).unlink(missing_ok=True)
    log.warning("resumed from %s, an earlier checkpoint of this run: moved the %d later checkpoint(s) of the "
                "abandoned run (%s) to %s; nothing was deleted", ckpt.name, len(later),
                ", ".join(p.name for p in later), dest)  # fmt: skip
    return dest
