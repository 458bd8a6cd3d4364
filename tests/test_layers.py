"""The project's imports point one way: each package sits on a floor and imports only its own
floor and those below, and no module imports itself back through others (no circle), counting
imports inside functions too. The floors, bottom to top:

    ibtpo_core  the library (the algorithm, engines, trainer, data); knows no Prefect or MLflow
    configs     the typed configs, built on the library's specs
    pipeline    the stage (key, folder, claim, publish), code digests, MLflow tracking, reports
    tasks       the stages' bodies and their Prefect faces
    flows       the Prefect flows: train, sweep, evaluate
    ibtpo       the command line
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("ibtpo_core", "configs", "pipeline", "tasks", "flows", "ibtpo")


def module_names(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in FLOORS:
        for path in (root / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (``from a import b``: the
    module ``a.b`` if there is one, else ``a``)."""
    mods = module_names(root)
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                found |= subs or ({node.module} & mods.keys())
        out[name] = found - {name}
    return out


def upward(graph: dict[str, set[str]]) -> list[str]:
    floor = {pkg: i for i, pkg in enumerate(FLOORS)}
    return sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs
                  if floor[b.split(".")[0]] > floor[a.split(".")[0]])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_a_floor_above_its_own():
    assert not upward(imports(ROOT))


def test_no_modules_import_each_other_in_a_circle():
    assert not circles(imports(ROOT))


def test_the_library_imports_no_orchestration_or_tracking():
    bad = []
    for path in (ROOT / "ibtpo_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names
                    if n.split(".")[0] in ("prefect", "mlflow", "ray", "prefect_ray")]
    assert not bad, bad


@pytest.fixture()
def toy(tmp_path) -> Path:
    for pkg in FLOORS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    return tmp_path


def test_the_checks_see_an_upward_import_and_a_circle_inside_functions(toy):
    (toy / "pipeline" / "a.py").write_text("def f():\n    from flows.b import g\n")
    (toy / "flows" / "b.py").write_text("import pipeline.a\n\ndef g():\n    from flows import c\n")
    (toy / "flows" / "c.py").write_text("def h():\n    from flows.b import g\n")
    graph = imports(toy)
    assert upward(graph) == ["pipeline.a -> flows.b"]
    assert circles(graph) == [["flows.b", "flows.c", "pipeline.a"]]
