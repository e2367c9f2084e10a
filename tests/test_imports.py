"""The package's import graph: no circles, and nothing imports a floor above its own.

Floors, lowest first: errors/registry/config/viz (import nothing of detkd but errors) -> data -> models -> methods ->
distill -> engine -> bench, export, report, cli. Every ``import`` statement counts, at module level and inside
functions alike: a function-level import is still a dependency, only a later one, and a circle through one is
still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import detkd

SRC = Path(detkd.__file__).parent

FLOORS = {
    "detkd": 6,  # the package's __init__: the version check, and the Python API (detkd.api), imported on first use
    "detkd._check": 0,
    "detkd.errors": 0,
    "detkd.registry": 0,
    "detkd.config": 0,
    "detkd.viz": 0,
    "detkd.data": 1,
    "detkd.models": 2,
    "detkd.methods": 3,
    "detkd.calibration": 4,
    "detkd.distillation": 4,
    "detkd.engine": 5,
    "detkd.bench": 6,
    "detkd.export": 6,
    "detkd.report": 6,
    "detkd.pretrain": 6,
    "detkd.api": 6,
    "detkd.cli": 6,
    "detkd.__main__": 6,
}


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the detkd modules it imports (``from pkg import name`` counts as ``pkg.name`` when that is a
    module, else as ``pkg``)."""
    mods = modules()

    def owner(name: str) -> str:
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, (path, package) in mods.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(owner(a.name) for a in node.names if a.name.split(".")[0] == "detkd")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name if package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if base.split(".")[0] != "detkd":
                    continue
                edges.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else owner(base) for a in node.names)
        graph[name] = edges - {name}
    return graph


def floor(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 1, -1):  # "detkd" itself is no catch-all: a new top-level module needs a floor
        if ".".join(parts[:i]) in FLOORS:
            return FLOORS[".".join(parts[:i])]
    if module == "detkd":
        return FLOORS[module]
    raise AssertionError(f"{module} has no floor: add it to FLOORS in {Path(__file__).name}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "detkd.models.outputs" in graph["detkd.engine.checkpoint"]
    assert "detkd.data.coco" in graph["detkd.data.formats"]
    assert "detkd.data" in graph["detkd.engine.launch"]  # a function-level import


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_cycles_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_upwards():
    upward = [
        f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if floor(target) > floor(module)
    ]
    assert upward == []


def test_every_module_has_a_floor():
    for module in modules():
        floor(module)
