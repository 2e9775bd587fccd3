"""`distrain <command>`: run, recipes, and the tools the other modules provide.

Subcommands are imported lazily so that `distrain run` pays only for what training needs.
Exit codes: 0 done, 1 training failed, 2 bad input (one line on stderr), 3 launch mismatch,
130/143/138/129 interrupted by SIGINT/SIGTERM/SIGUSR1/SIGHUP (or a dead launcher) after saving.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import sys
from collections.abc import Callable

from distrain.errors import ConfigError, DistrainError, LaunchError, TrainingError

# command -> (module under distrain., function, one-line help); each function takes argv and returns an exit code
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("cli", "run_main", "train a recipe: distrain run recipe=har [key=value ...]"),
    "recipes": ("cli", "recipes_main", "list the available recipes"),
    "report": ("tools.report", "main", "report.md + self-contained report.html: distrain report <run dir>"),
    "profile": ("tools.profiling", "main", "profile a few steps with torch.profiler: distrain profile recipe=har"),
    "bench": ("tools.bench", "main", "throughput/memory per setting: distrain bench recipe=har --batch-sizes 32,64"),
    "slurm": ("tools.slurm", "main", "submit a recipe to Slurm: distrain slurm submit recipe=har --time 01:00:00"),
    "export": ("checkpoint.export", "main", "weights for inference: distrain export <run dir> --out <dir>"),
    "sweep": ("tools.sweep", "main", "Optuna hyperparameter search (each trial a run): distrain sweep --help"),
    "launch": ("tools.launch", "main", "checked accelerate launch: distrain launch --config_file <yaml> recipe=har"),
}

USAGE = "usage: distrain <command> [args]\n\ncommands:\n"


def report(e: DistrainError) -> int:
    """The one place an error becomes what the user sees: one line on stderr, and its exit code."""
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code


def command(main: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """Decorates a command's main(argv): a DistrainError raised inside becomes report's line and code."""

    @functools.wraps(main)
    def checked(argv: list[str]) -> int:
        try:
            return main(argv)
        except DistrainError as e:
            return report(e)

    return checked


def error(message: str) -> int:
    """A usage error of the command line itself (exit code 2)."""
    return report(ConfigError(message))


def run_main(argv: list[str]) -> int:
    """Train one recipe. `--help` or print_config=true prints the resolved config instead.

    Under `distrain launch`, rank 0 also writes its exit code to the file DISTRAIN_LAUNCH_STATUS
    names, on every way out, so the launch command can return distrain's code, not the agent's.
    """
    code = 1  # an exception escaping below is a traceback, exit 1
    try:
        code = _run(argv)
    except KeyboardInterrupt:
        code = 130
        raise
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        write_launch_status(code)
    from distrain.parallel.launch import leave_process_group

    return leave_process_group(code)


def _rank() -> int:
    """This process's rank as the launcher set it (before accelerate starts: errors come first);
    0 without a WORLD_SIZE above 1, so a RANK left in the shell never silences a lone process."""
    world, rank = os.environ.get("WORLD_SIZE", ""), os.environ.get("RANK", "")
    return int(rank) if world.isdigit() and int(world) > 1 and rank.isdigit() else 0


def write_launch_status(code: int) -> None:
    """Rank 0's exit code into DISTRAIN_LAUNCH_STATUS (set by `distrain launch`), atomically."""
    path = os.environ.get("DISTRAIN_LAUNCH_STATUS")
    if not path or _rank() != 0:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"exit_code": int(code)}, f)
        os.replace(tmp, path)
    except OSError:  # the launcher then falls back to the ranks' own exit codes
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _refuse(e: DistrainError) -> int:
    """A bad-input or launch error raised on every rank at once: one line (rank 0's), every rank exits."""
    return report(e) if _rank() == 0 else e.exit_code


def _fail_alone(e: Exception) -> int:
    """An out-of-memory error, maybe on this rank only: its one line, then leave without the barrier
    (the launcher stops the other ranks); any other exception keeps its traceback."""
    from distrain.parallel.launch import exit_alone
    from distrain.train.memory import out_of_memory

    oom = out_of_memory(e, _rank())
    if oom is None:
        raise e
    write_launch_status(report(oom))
    exit_alone(oom.exit_code)
    return oom.exit_code


def _run(argv: list[str]) -> int:
    from distrain.config import describe
    from distrain.recipe import available_recipes, resolve_config

    wants_help = any(a in ("-h", "--help") for a in argv)
    argv = [a for a in argv if a not in ("-h", "--help")]
    if wants_help and not any(a.startswith(("recipe=", "config=")) for a in argv):
        print("usage: distrain run recipe=<name|path.py> [config=<file>] [section.key=value ...]")
        print("recipes: " + ", ".join(available_recipes()))
        return 0
    try:
        cfg, recipe = resolve_config(argv)
    except ConfigError as e:
        return _refuse(e)
    if wants_help or cfg.print_config:
        print(f"# recipe {recipe.name}: {recipe.description}")
        print(describe(cfg))
        return 0
    from distrain.train.trainer import Trainer

    # Trainer() raises its ConfigErrors and LaunchErrors on every rank (rank 0's refusals are
    # broadcast), so each rank may go on to leave_process_group's barrier.
    try:
        trainer = Trainer(cfg, recipe)
    except (ConfigError, LaunchError) as e:
        return _refuse(e)
    except Exception as e:  # a real out-of-memory error is one line naming the estimate; anything else a bug
        return _fail_alone(e)
    try:
        summary = trainer.train()
    except TrainingError as e:
        return report(e)
    except ConfigError as e:  # found while training (a failed checkpoint write), maybe on one rank only
        from distrain.parallel.launch import exit_alone

        write_launch_status(report(e))
        exit_alone(e.exit_code)
        return e.exit_code
    except Exception as e:
        return _fail_alone(e)
    return int(summary.get("exit_code", 0))


def recipes_main(argv: list[str]) -> int:
    from distrain.recipe import available_recipes

    recipes = available_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, description in recipes.items():
        print(f"{name.ljust(width)}  {description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n".join(f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return error(f"unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}")
    module, function, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(f"distrain.{module}"), function)(rest))


if __name__ == "__main__":
    sys.exit(main())
