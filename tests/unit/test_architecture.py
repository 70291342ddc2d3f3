"""The package's layers (docs/architecture.md), read from the source with ``ast``.

commands → run / analysis → train / data / models / optim / tracking → base. A module imports
only from its own layer's allowed neighbours or below; no import circles; no command imports
another; project imports inside a function carry a comment saying why they are deferred.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"

BASE = {"pipeline", "pipeline.config", "pipeline.retry", "pipeline.seeds", "pipeline.logs"}
LIBRARY = ("train", "data", "models", "optim", "tracking")
ORCHESTRATION = ("run", "analysis")
COMMANDS = {"pretrain", "finetune", "schedule", "compare", "experiments", "shards", "demo"}
COMMAND_HELPERS = {"pipeline.cli"}
# Within the library, train sits on top of the other four.
LIBRARY_MAY_IMPORT = {
    "train": {"data", "models", "optim", "tracking"},
    "data": set(),
    "models": set(),
    "optim": set(),
    "tracking": set(),
}
MAX_LINES, MAX_COMMAND_LINES = 400, 150


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_command(name: str) -> bool:
    parts = name.split(".")
    return (
        (len(parts) == 2 and parts[1] in COMMANDS)
        or name == "pipeline.models.__main__"
        or (len(parts) >= 2 and parts[1] == "bench")
    )


def layer(name: str) -> tuple[int, str]:
    """(rank, group): a higher rank may import a lower one."""
    if name in BASE:
        return 0, "base"
    if is_command(name) or name in COMMAND_HELPERS:
        return 3, "commands"
    group = name.split(".")[1]
    if group in LIBRARY:
        return 1, group
    if group in ORCHESTRATION:
        return 2, group
    raise AssertionError(f"{name} belongs to no layer; add it to docs/architecture.md and here")


def imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("pipeline"):
                        found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module.startswith("pipeline"):
                    for alias in child.names:
                        target = f"{child.module}.{alias.name}"
                        target = target if target in MODULES else child.module
                        found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


def allowed(importer: str, imported: str) -> bool:
    if imported == "pipeline" or imported == importer:
        return True
    rank, group = layer(importer)
    other_rank, other_group = layer(imported)
    if group == "commands":
        # A command never imports another command; the bench package is one command.
        if is_command(imported):
            return importer.split(".")[:2] == imported.split(".")[:2]
        return True
    if group == other_group:
        return True
    if rank == 1 and other_rank == 1:
        return other_group in LIBRARY_MAY_IMPORT[group]
    if group == "analysis" and other_group == "run":
        return False
    return other_rank < rank


def test_imports_follow_the_layer_rule():
    wrong = [
        f"{name}:{line} imports {target} ({layer(name)[1]} -> {layer(target)[1]})"
        for name in MODULES
        for target, line, _ in imports(name)
        if not allowed(name, target)
    ]
    assert wrong == []


def test_no_import_circles():
    graph = {name: {target for target, _, _ in imports(name) if target != name} for name in MODULES}
    circles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if target not in MODULES:
                continue
            # A package's __init__ re-exporting its own submodules is not a circle.
            if (
                name == "pipeline"
                or target.startswith(name + ".")
                and MODULES[name].stem == "__init__"
            ):
                continue
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                walk(target, [*path, target])
        state[name] = 2

    for name in MODULES:
        if name not in state:
            walk(name, [name])
    assert circles == []


def test_deferred_project_imports_say_why():
    silent = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for _, line, in_function in imports(name):
            if not in_function:
                continue
            here, above = lines[line - 1], lines[line - 2] if line >= 2 else ""
            if "#" not in here and not above.strip().startswith("#"):
                silent.append(f"{name}:{line}")
    assert silent == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    lines = len(MODULES[name].read_text().splitlines())
    thin = is_command(name) and (name.count(".") == 1 or name.endswith("__main__"))
    limit = MAX_COMMAND_LINES if thin else MAX_LINES
    assert lines <= limit, f"{MODULES[name]} has {lines} lines (limit {limit})"
