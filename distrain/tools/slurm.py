"""`distrain slurm submit`: render a batch template (distrain/templates/slurm/) with concrete values and sbatch it.

Every `#SBATCH` line is rendered with literal values (sbatch does not expand shell variables
there), while per-node values such as `$SLURM_NODEID` stay quoted in the script so that they
expand on each node. What the job does on USR1/TERM (forward, save, requeue, resume) lives in
templates/slurm/common.sh, inlined into every rendered script. The templates start training with
`accelerate launch -m distrain.run`, so a job runs whichever distrain its Python imports (a checkout or a wheel).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distrain.cli import command
from distrain.errors import ConfigError
from distrain.templates import LAUNCH_CONFIGS
from distrain.templates import SLURM as TEMPLATES

ENV_MASK = Path(__file__).resolve().with_name("env_mask.py")  # prints the job's environment with secrets masked

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(\d+-\d{1,2}(:[0-5]?\d){0,2}|\d+(:[0-5]?\d){0,2})$")
# What may appear unquoted in an #SBATCH line
_PLAIN = re.compile(r"^[\w.,:/%@+=-]+$")


@dataclass
class SlurmOptions:
    """Resources and job settings; one field per command-line option of `distrain slurm submit`."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: the CPU template
    procs: int = 2  # training processes on a CPU node
    cpus_per_task: int | None = None  # CPUs per node; unset: procs (CPU) or 8 per GPU
    time: str = "01:00:00"
    partition: str | None = None
    job_name: str | None = None
    grace: int = 120  # seconds between the USR1 warning and the time limit
    log_dir: str = "runs/slurm"
    max_parallel: int | None = None  # array tasks running at once
    sbatch_args: list[str] = field(default_factory=list)  # extra `--key=value` lines, e.g. --qos=high

    def check(self) -> None:
        checks = [
            (self.nodes >= 1, "--nodes", self.nodes, "an integer >= 1"),
            (self.gpus_per_node >= 0, "--gpus-per-node", self.gpus_per_node, "an integer >= 0"),
            (self.procs >= 1, "--procs", self.procs, "an integer >= 1"),
            (self.cpus_per_task is None or self.cpus_per_task >= 1, "--cpus-per-task", self.cpus_per_task,
             "an integer >= 1"),
            (self.grace >= 1, "--grace", self.grace, "seconds >= 1"),
            (self.max_parallel is None or self.max_parallel >= 1, "--max-parallel", self.max_parallel,
             "an integer >= 1"),
        ]  # fmt: skip
        for ok, key, value, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}={value} is out of range; allowed: {allowed}")
        if not _TIME.match(self.time):
            raise ConfigError(
                f"--time={self.time!r} is not a Slurm time; use minutes, HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00)"
            )
        if self.nodes > 1 and self.gpus_per_node == 0:
            raise ConfigError(f"--nodes={self.nodes} needs --gpus-per-node >= 1; the CPU template runs on one node")
        for key, value in (("--partition", self.partition), ("--job-name", self.job_name)):
            if value is not None and not _PLAIN.match(value):
                raise ConfigError(f"{key}={value!r} has characters Slurm will not take; use letters, digits, . _ -")
        for arg in self.sbatch_args:
            if not (arg.startswith("--") and _PLAIN.match(arg)):
                raise ConfigError(f"--sbatch-arg={arg!r} must look like --key=value (e.g. --sbatch-arg=--qos=high)")

    @property
    def cpus(self) -> int:
        if self.cpus_per_task is not None:
            return self.cpus_per_task
        return self.procs if self.gpus_per_node == 0 else 8 * self.gpus_per_node


# ---------------------------------------------------------------- rendering


def _plain_path(path: Path, what: str) -> str:
    text = str(path)
    if not _PLAIN.match(text):
        raise ConfigError(f"{what} {text!r} has spaces or special characters that #SBATCH lines cannot hold")
    return text


def _words(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every {{name}} in slurm/<template>; a placeholder line rendered empty is dropped."""
    text = (TEMPLATES / template).read_text().replace("{{common}}", (TEMPLATES / "common.sh").read_text().rstrip())
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("{{") and stripped.endswith("}}") and values.get(stripped[2:-2], "x") == "":
            continue
        lines.append(line)

    def sub(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"slurm/{template} uses {{{{{match.group(1)}}}}} but no value was given")
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", sub, "\n".join(lines) + "\n")


def _common_values(opts: SlurmOptions, job_name: str, n_tasks: int) -> dict[str, str]:
    log_dir = (Path.cwd() / opts.log_dir).resolve()
    extra = [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    if n_tasks:
        throttle = f"%{opts.max_parallel}" if opts.max_parallel else ""
        extra.append(f"#SBATCH --array=0-{n_tasks - 1}{throttle}")
    extra += [f"#SBATCH {arg}" for arg in opts.sbatch_args]
    # One log per job; a requeued job appends to it (--open-mode=append), array tasks get their own.
    log_name = "%x-%A_%a.out" if n_tasks else "%x-%j.out"
    return {
        "job_name": job_name,
        "nodes": str(opts.nodes),
        "nodes_minus_1": str(opts.nodes - 1),
        "gpus_per_node": str(opts.gpus_per_node),
        "procs": str(opts.procs),
        "world_size": str(opts.nodes * max(opts.gpus_per_node, 1)),
        "cpus_per_task": str(opts.cpus),
        "time": opts.time,
        "grace": str(opts.grace),
        "log": _plain_path(log_dir / log_name, "--log-dir"),
        "sbatch_extra": "\n".join(extra),
        "workdir": _plain_path(Path.cwd().resolve(), "the working directory"),
        "python": shlex.quote(sys.executable),
        "bin": shlex.quote(str(Path(sys.executable).parent)),
        "env_mask": shlex.quote(str(ENV_MASK)),
        "n_tasks": str(n_tasks),
    }


def _launch_config(name: str | None, opts: SlurmOptions) -> str:
    """accelerate's launch-config arguments: a shipped name or a path; the default follows the hardware."""
    if name is None:
        if opts.gpus_per_node == 0:
            name = "cpu_ddp"
        elif (LAUNCH_CONFIGS / "multi_gpu.yaml").is_file():
            name = "multi_gpu"
        else:
            return "--multi_gpu"
    path = Path(name)
    if not path.is_file():
        path = LAUNCH_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in LAUNCH_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"--launch-config={name} does not exist; give a path or one of: {shipped}")
    return "--config_file " + shlex.quote(str(path.resolve()))


def _task_args(array: list[list[str]]) -> str:
    """A bash function setting TASK_ARGS: each array task's own overrides (none outside arrays)."""
    if not array:
        return "task_args() { TASK_ARGS=(); }"
    cases = "\n".join(f"    {i}) TASK_ARGS=({_words(args)}) ;;" for i, args in enumerate(array))
    return f'task_args() {{\n  case "$SLURM_ARRAY_TASK_ID" in\n{cases}\n    *) TASK_ARGS=() ;;\n  esac\n}}'


def _key(arg: str) -> str:
    if "=" not in arg:
        raise ConfigError(f"argument {arg!r} is not key=value (e.g. recipe=har optim.lr=3e-4)")
    return arg.split("=", 1)[0].strip()


def render_training(
    overrides: list[str],
    opts: SlurmOptions,
    array: list[list[str]] | None = None,
    launch_config: str | None = None,
    recipe: str | None = None,
) -> str:
    """The batch script that trains `overrides` (recipe=... key=value ...), one run per array task.

    `recipe` names the recipe when the overrides do not (it came from `config=<file>`).
    """
    opts.check()
    array = array or []
    keys = {_key(a) for a in overrides}
    task_keys = [{_key(a) for a in args} for args in array]
    recipe = next((a.split("=", 1)[1] for a in overrides if _key(a) == "recipe"), recipe or "")
    if not recipe:
        raise ConfigError("recipe is required, e.g. distrain slurm submit recipe=har --time 01:00:00")
    # Shell words for the launch line. The run dir must survive a requeue: it is named after
    # the job (expanded on the node at run time), not after the submit time.
    words = [shlex.quote(a) for a in overrides if not (array and _key(a) == "output_dir")]
    if "output_dir" not in keys:
        base = (Path.cwd() / "runs" / Path(recipe).stem).resolve()
        words.append(shlex.quote(f"output_dir={base}/slurm-") + '"$DISTRAIN_RUN_ID"')
    elif array and not all("output_dir" in k for k in task_keys):
        base = Path(next(a.split("=", 1)[1] for a in overrides if _key(a) == "output_dir")).resolve()
        words.append(shlex.quote(f"output_dir={base}/") + '"$SLURM_ARRAY_TASK_ID"')
    if "resume" not in keys:
        words.append("resume=auto")  # a requeued job continues from its newest checkpoint
    if opts.gpus_per_node == 0:
        template = "cpu.sbatch"
    else:
        template = "gpu.sbatch" if opts.nodes == 1 else "multinode.sbatch"
    values = _common_values(opts, opts.job_name or f"distrain-{Path(recipe).stem}", len(array))
    values.update(
        launch_config=_launch_config(launch_config, opts),
        overrides=" ".join(words),
        task_args=_task_args(array),
    )
    return fill(template, values)


def render_command_array(command: list[str], n_tasks: int, opts: SlurmOptions) -> str:
    """An array of `n_tasks` tasks, each running `command` on one node."""
    opts.check()
    if n_tasks < 1:
        raise ConfigError(f"n_tasks={n_tasks} is out of range; allowed: an integer >= 1")
    if not command:
        raise ConfigError("the array command is empty")
    if opts.nodes != 1:
        raise ConfigError(f"--nodes={opts.nodes}: array tasks run on one node each")
    values = _common_values(opts, opts.job_name or "distrain-array", n_tasks)
    values["command"] = _words(command)
    return fill("command_array.sbatch", values)


# ---------------------------------------------------------------- submitting


def sbatch(script: str, opts: SlurmOptions) -> str:
    """Submit a rendered script; returns the job id. sbatch's refusal becomes a one-line ConfigError."""
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH; submit from a Slurm login node, or use --dry-run to see the script")
    log_dir = (Path.cwd() / opts.log_dir).resolve()
    first_new = next((p for p in [*reversed(log_dir.parents), log_dir] if not p.exists()), None)
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm writes no log at all into a missing folder
    proc = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if proc.returncode != 0:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        message = " ".join(line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip())
        raise ConfigError(f"sbatch refused the job: {message or f'exit code {proc.returncode}'}")
    job_id = proc.stdout.strip().split(";")[0]
    name = re.search(r"^#SBATCH --job-name=(\S+)", script, re.M)
    (log_dir / f"{name.group(1) if name else 'job'}-{job_id}.sbatch").write_text(script)  # what ran, for later
    return job_id


def submit_array(command: list[str], n_tasks: int, **slurm_options: object) -> str:
    """Submit an array of `n_tasks` tasks each running `command`; returns the array job id.

    `slurm_options` are SlurmOptions fields (time, partition, cpus_per_task, gpus_per_node, ...).
    """
    names = {f.name for f in dataclasses.fields(SlurmOptions)}
    unknown = sorted(set(slurm_options) - names)
    if unknown:
        raise ConfigError(f"unknown Slurm option {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
    opts = SlurmOptions(**slurm_options)  # type: ignore[arg-type]
    return sbatch(render_command_array(command, n_tasks, opts), opts)


# ---------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="distrain slurm submit",
        allow_abbrev=False,  # --gpus would silently mean --gpus-per-node (Slurm's own --gpus is a total)
        description="Render a Slurm batch script for a recipe and submit it with sbatch.",
    )
    p.add_argument("overrides", nargs="*", help="recipe=<name> and key=value overrides, as for `distrain run`")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; 0 uses the CPU template")
    p.add_argument("--procs", type=int, default=2, help="training processes on a CPU node (default 2)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per node (default: --procs on CPU, 8 per GPU)")
    p.add_argument("--time", default="01:00:00", help="time limit, e.g. 04:00:00 or 1-00:00:00")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--job-name", help="job name (default distrain-<recipe>)")
    p.add_argument("--grace", type=int, default=120, help="seconds before the time limit to save and requeue")
    p.add_argument("--log-dir", default="runs/slurm", help="where job logs go (default runs/slurm)")
    p.add_argument("--array", action="append", default=[], metavar="'k=v ...'",
                   help="one array task with these extra overrides; repeat for more tasks")
    p.add_argument("--max-parallel", type=int, help="array tasks running at once")
    p.add_argument("--launch-config", help="accelerate launch config: a name in launch_configs/ or a path")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="--key=value",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the batch script instead of submitting it")
    return p  # fmt: skip


def submit_main(argv: list[str]) -> int:
    from distrain.recipe import resolve_config

    args = _parser().parse_intermixed_args(argv)
    opts = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs=args.procs,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        job_name=args.job_name,
        grace=args.grace,
        log_dir=args.log_dir,
        max_parallel=args.max_parallel,
        sbatch_args=args.sbatch_arg,
    )
    array = [shlex.split(a) for a in args.array]
    # Bad overrides fail here, in a second, not after waiting in the queue.
    cfgs = [resolve_config([*args.overrides, *task])[0] for task in array or [[]]]
    script = render_training(args.overrides, opts, array, args.launch_config, recipe=cfgs[0].recipe)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    job_id = sbatch(script, opts)
    log_dir = Path(opts.log_dir)
    name = re.search(r"^#SBATCH --job-name=(\S+)", script, re.M).group(1)  # type: ignore[union-attr]
    log = log_dir / (f"{name}-{job_id}_<task>.out" if array else f"{name}-{job_id}.out")
    print(f"submitted job {job_id}; log {log}; follow it with: squeue -j {job_id}; tail -f {log}")
    return 0


@command
def main(argv: list[str]) -> int:
    usage = "usage: distrain slurm submit recipe=<name> [key=value ...] [--nodes N --gpus-per-node G --time T ...]"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] != "submit":
        raise ConfigError(f"unknown slurm command {argv[0]!r}; available: submit")
    if any(a in ("-h", "--help") for a in argv[1:]):
        _parser().print_help()
        return 0
    return submit_main(argv[1:])
