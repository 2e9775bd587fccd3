"""The installed user's path: the wheel holds the recipes, the Slurm templates and the launch configs, and
the README's commands work from a folder outside the checkout.

The wheel is built from a copy of the checkout's sources and installed (no dependencies, no index) into a
fresh virtualenv that sees this environment's packages (torch, accelerate, ...) through a .pth line: a
folder named in a .pth file is not itself scanned for .pth files, so this environment's editable distrain
(an `__editable__` finder started from a .pth) stays out and the wheel's copy is the one imported.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import distrain.templates
from distrain.recipe import RECIPES_DIR

from helpers import REPO, TINY_HAR


def test_one_source_of_truth_for_templates_and_recipes():
    """The top-level slurm/ and launch_configs/ are links to the package's copies; the package's recipes/
    is a link to the repository's recipes/, which is where the loader finds the built-in recipes."""
    for name, target in (("slurm", distrain.templates.SLURM), ("launch_configs", distrain.templates.LAUNCH_CONFIGS)):
        assert (REPO / name).is_symlink() and (REPO / name).resolve() == target, name
        assert target.is_dir() and not target.is_symlink()
    assert (REPO / "distrain" / "recipes").resolve() == (REPO / "recipes").resolve() == RECIPES_DIR
    assert (distrain.templates.SLURM / "common.sh").is_file() and (distrain.templates.LAUNCH_CONFIGS / "cpu_ddp.yaml")


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"  # fmt: skip
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(virtualenv, the wheel, environment for commands in it): the wheel built here, installed there."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Nothing from this process's import path: PYTHONPATH would bring the checkout back in.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # A copy of what the wheel is built from: a build in the checkout would leave build/ there, and a
    # stale build/lib from an earlier build would go into the wheel.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("distrain", "recipes"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], env, tmp)  # fmt: skip
    (wheel,) = dist.glob("distrain-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env, tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], env, tmp)  # fmt: skip
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, tmp)
    (Path(purelib.stdout.strip()) / "outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # What pip writes for accelerate's console script, so that `accelerate` here is this venv's.
    shim = venv / "bin" / "accelerate"
    shim.write_text(f"#!{python}\nimport sys\nfrom accelerate.commands.accelerate_cli import main\nsys.exit(main())\n")
    shim.chmod(0o755)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HOME"] = str(tmp / "hf")  # accelerate launch without a config: no default config of this machine
    env["PYTHONNOUSERSITE"] = "1"
    return venv, wheel, env


@pytest.mark.slow
def test_installed_wheel_runs_the_readme_commands_outside_the_checkout(installed, tmp_path):
    venv, wheel, env = installed
    names = zipfile.ZipFile(wheel).namelist()
    # One top-level name: no generic `recipes` package beside distrain.
    assert {n.split("/")[0] for n in names} == {"distrain", wheel.name.split("-py")[0] + ".dist-info"}, names
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "distrain").glob("**/*.py") if "__pycache__" not in
               p.parts} | {f"distrain/recipes/{p.name}" for p in (REPO / "recipes").glob("*")
                           if p.suffix in (".py", ".yaml")}  # fmt: skip
    for folder in (distrain.templates.SLURM, distrain.templates.LAUNCH_CONFIGS):
        sources |= {f"distrain/templates/{folder.name}/{p.name}" for p in folder.iterdir()}
    assert sources - set(names) == set(), "files missing from the wheel"

    python = str(venv / "bin" / "python")
    where = _run([python, "-c", "import importlib.util, distrain, distrain.recipe as r; print(distrain.__file__); "
                  "print(importlib.util.find_spec('recipes')); [r.load_recipe(n) for n in r.available_recipes()]; "
                  "print(sorted(r.available_recipes()))"], env, tmp_path).stdout.splitlines()  # fmt: skip
    package = Path(where[0]).parent
    assert package.is_relative_to(venv) and where[1] == "None", where
    assert where[2] == str(sorted(p.stem for p in (REPO / "recipes").glob("[!_]*.py"))), where
    for path in (package / "templates" / "slurm" / "common.sh", package / "recipes" / "har.py"):
        assert path.is_file() and not path.is_symlink() and not path.parent.is_symlink(), path

    work = tmp_path / "work"  # outside the checkout; every command starts here
    work.mkdir()
    proc = _run(["distrain", "slurm", "submit", "recipe=har", "--nodes", "2", "--gpus-per-node", "8",
                 "--time", "01:00:00", "--dry-run"], env, work)  # fmt: skip
    script = proc.stdout
    for want in ("--nodes=2", "--gpus-per-node=8", "--time=01:00:00"):
        assert f"#SBATCH {want}" in script, want
    assert f"--config_file {package / 'templates' / 'launch_configs' / 'multi_gpu.yaml'}" in script
    assert "-m distrain.run recipe=har" in script and str(REPO) not in script
    assert not list(work.iterdir()), "--dry-run wrote files"

    _run(["distrain", "run", *TINY_HAR, "train.max_steps=3"], env, work)
    (run,) = (work / "runs" / "har").iterdir()  # the default run dir, under the working directory
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and (run / "model.safetensors").is_file()

    out = work / "launched"
    _run(["accelerate", "launch", "-m", "distrain.run", *TINY_HAR, "train.max_steps=3", f"output_dir={out}"], env, work)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 1
