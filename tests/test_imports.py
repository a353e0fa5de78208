"""Every public module imports on its own, and the packages depend on each other in one direction.

A circular import only shows when the module inside the circle is the *first* retrain module a
process imports; in one pytest process, collection order hides it. So each module is imported in
a fresh interpreter, and the package graph is read from the source (every `import`, including the
ones inside functions) and checked against the layering in ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "retrain"

# Which retrain packages each lower package may import. `core` holds the shared types and the
# registry, so the leaves never need each other; nothing below the trainer imports the trainer.
LEAF_DEPENDENCIES = {
    "core": set(),
    "models": {"core"},
    "environment": {"core"},
    "reward": {"core"},
    "data": {"core"},
    "tasks": {"core", "reward"},
    "rollout": {"core", "environment", "reward", "models"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def public_modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        if any(part.startswith("_") and part != "__init__.py" for part in path.relative_to(SRC).parts):
            continue
        names.append(_module_name(path))
    return names


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(path: Path) -> set[str]:
    """Every retrain module `path` imports, at module level or inside a function."""
    module = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                base = ".".join(package[: len(package) - node.level + 1])
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return {name for name in found if name == "retrain" or name.startswith("retrain.")}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        source = _package_of(_module_name(path))
        if not source:  # retrain/__init__.py: the lazy top-level names
            continue
        targets = {_package_of(name) for name in imported_modules(path)} - {source, ""}
        graph.setdefault(source, set()).update(targets)
    return graph


def test_leaf_packages_import_only_what_the_layering_allows() -> None:
    graph = package_graph()
    assert set(LEAF_DEPENDENCIES) <= set(graph), "a leaf package in the table no longer exists"
    wrong = {
        package: sorted(graph[package] - allowed)
        for package, allowed in LEAF_DEPENDENCIES.items()
        if graph[package] - allowed
    }
    assert not wrong, f"packages importing above their layer (see ARCHITECTURE.md): {wrong}"


def test_no_package_below_the_cli_imports_the_trainer_in_a_circle() -> None:
    graph = package_graph()
    assert not any("trainer" in graph[p] for p in LEAF_DEPENDENCIES)

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return seen + (nxt,)
            if nxt not in seen:
                found = cycle_from(start, nxt, seen + (nxt,))
                if found:
                    return found
        return None

    cycles = [cycle_from(p, p, (p,)) for p in sorted(graph)]
    assert not any(cycles), f"package import cycles: {[' -> '.join(c) for c in cycles if c]}"


def test_the_import_reader_sees_function_level_and_relative_imports() -> None:
    # The graph is only as good as its reader: an import hidden in a function still counts.
    probe = SRC / "reward" / "builtins.py"
    assert "retrain.core.registry" in imported_modules(SRC / "reward" / "registry.py")
    assert "retrain.reward.registry" in imported_modules(probe)
    assert "retrain.trainer.module" in imported_modules(SRC / "export.py")  # imported inside a function


# One interpreter, but each module is imported with no retrain module loaded: the retrain entries of
# sys.modules are dropped before each import, so every module is the first retrain import of its
# own attempt (what a circle needs to show), while torch and friends load only once.
_IMPORT_EACH_FIRST = """
import importlib, sys, traceback
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "retrain" or m.startswith("retrain.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures.append(name + ":\\n" + traceback.format_exc(limit=-4))
print("\\n\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_public_module_imports_first_on_its_own() -> None:
    modules = public_modules()
    assert "retrain.environment.mcp" in modules and "retrain.core.episode" in modules
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH_FIRST, *modules], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, f"modules that fail to import on their own:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"


@pytest.mark.parametrize("module", ["retrain.environment", "retrain.environment.mcp", "retrain.reward", "retrain.cli"])
def test_entry_points_import_in_a_fresh_interpreter(module: str) -> None:
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("statement", [
    "import retrain.environment",
    "from retrain import Environment",
    "import retrain.reward",
    "import retrain.core",
    "from retrain.data import PromptRecord, ListSource",
])
def test_environment_reward_and_data_do_not_pull_in_torch(statement: str) -> None:
    code = f"{statement}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
