"""The package's shape, read from the source: no import cycle, a folder per concept, no private reach.

The import graph counts every `import distrain...` / `from distrain... import` at any depth,
inside functions too (a function-level import hides a cycle from Python, not from a reader).
An edge goes to the module imported; `from distrain.pkg import name` goes to the submodule
`pkg/name.py` when there is one, else to `pkg/__init__.py`.
"""

from __future__ import annotations

import ast
import importlib
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distrain"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path) -> dict[str, int]:
    """distrain modules `path` imports -> the line of the first such import."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for t in targets:
            if t in MODULES and t != me:
                out.setdefault(t, node.lineno)
    return out


GRAPH = {m: imported(p) for m, p in MODULES.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_walker_finds_a_cycle():
    """The check below can fail: a hand-made cycle is found, with its path."""
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None
    # and it reads function-level imports: parallel.select imports the backends inside a function
    assert "distrain.parallel.fsdp" in GRAPH["distrain.parallel.select"]


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(f"{m} (line {GRAPH[m][n]})" for m, n in itertools.pairwise(cycle))


def test_a_folder_per_concept():
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert not {n for n in top if n.startswith("checkpoint")}, "checkpoint code lives in distrain/checkpoint/"
    assert {"backends.py", "fsdp.py", "zero.py"}.isdisjoint(top), "backends live in distrain/parallel/"
    assert "profile.py" not in {p.name for p in PACKAGE.rglob("*.py")}, "no module shadows the standard library"
    for folder in ("checkpoint", "parallel", "train", "observe", "tools"):
        assert (PACKAGE / folder / "__init__.py").is_file()


def test_only_select_imports_the_backend_implementations():
    for impl in ("distrain.parallel.fsdp", "distrain.parallel.zero"):
        importers = {m for m, deps in GRAPH.items() if impl in deps}
        assert importers <= {"distrain.parallel.select"}, f"{impl} imported by {sorted(importers)}"


def test_no_private_name_imported_from_another_module():
    found = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distrain"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found += [f"{m}:{node.lineno} {name}" for name in private]
    assert not found


def test_errors_own_their_exit_codes():
    from distrain import errors

    codes = {name: cls.exit_code for name, cls in vars(errors).items()
             if isinstance(cls, type) and issubclass(cls, errors.DistrainError) and name != "Interrupted"}  # fmt: skip
    assert codes == {"DistrainError": 1, "ConfigError": 2, "CheckpointError": 2, "ChecksumError": 2, "RunDirBusy": 2,
                     "LaunchError": 3, "TrainingError": 1, "MemoryBudgetError": 2, "OutOfMemory": 1}  # fmt: skip
    assert errors.Interrupted(143).exit_code == 143


@pytest.mark.parametrize("command", ["report", "profile", "bench", "slurm", "export", "sweep", "launch"])
def test_every_command_module_imports(command):
    from distrain.cli import COMMANDS

    module, function, _ = COMMANDS[command]
    assert callable(getattr(importlib.import_module(f"distrain.{module}"), function))


def test_no_package_name_shadows_its_submodule():
    """`from distrain.checkpoint import verify` must not mean a function in one place and a module in another."""
    import inspect

    for m, path in MODULES.items():
        if path.name != "__init__.py" or m == "distrain":
            continue
        package = importlib.import_module(m)
        for sub in (p for p in path.parent.glob("*.py") if p.name != "__init__.py"):
            value = getattr(package, sub.stem, None)
            assert value is None or inspect.ismodule(value), f"{m}.{sub.stem} is a {type(value).__name__}"
