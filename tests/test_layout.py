"""The code's layering, read from its imports: no import cycles inside a package, and app/ and
workers/ apart, both over streams/ (docs/architecture.md). Imports under TYPE_CHECKING count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "workers", "streams", "jobcast")


def module_name(path: Path) -> str:
    """The dotted name of a source file under ROOT (a package's __init__ is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports anywhere in its text (function bodies, TYPE_CHECKING
    blocks and all), as dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import mod` imports the module, not pkg's names
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in known else source)
    return {target for target in targets if target in known and target != name}


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports."""
    found = modules()
    known = set(found)
    return {name: imported(name, path, known) for name, path in found.items()}


def top(name: str) -> str:
    """The package a module belongs to."""
    return name.partition(".")[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles among modules of the same package (each as a path that returns to its
    start), found by depth-first search."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if top(target) != top(name):
                continue
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return found


def test_the_import_graph_is_read() -> None:
    graph = import_graph()
    assert {"app._live", "app._follow", "streams", "workers", "jobcast.cli"} <= set(graph)
    assert "app._follow" in graph["app._live"]
    assert "app._hub" in graph["app._follow"]  # TYPE_CHECKING and plain imports alike
    assert "app._db" in graph["app._follow"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package: str) -> None:
    graph = import_graph()
    found = [cycle for cycle in cycles(graph) if top(cycle[0]) == package]
    assert found == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_app_and_workers_stand_apart_over_streams() -> None:
    graph = import_graph()
    crossing = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in targets
        if (top(name), top(target)) in {("app", "workers"), ("workers", "app")}
        or (top(name) == "streams" and top(target) in {"app", "workers", "jobcast"})
    )
    assert crossing == []


def test_a_cycle_is_found() -> None:
    """The search itself: a cycle through a TYPE_CHECKING import, as app/_jobs.py and app/_sse.py had."""
    graph = {"app._a": {"app._b"}, "app._b": {"app._a", "streams"}, "streams": set()}
    assert cycles(graph) == [["app._a", "app._b", "app._a"]]


MAX_MODULE_LINES = 450


def test_no_module_is_over_450_lines() -> None:
    """A module past that has more than one concept in it: split it by role."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert sizes, "no module was read"
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
