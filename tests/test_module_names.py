"""Module names cannot shadow a library or each other.

Prefect puts a flow file's folder on ``sys.path`` when it loads the flow, so ``flows/evaluate.py``
made ``import evaluate`` (which lm-eval and its task hooks do) return our flow module. No module
of flows/, tasks/, pipeline/, ibtpo_core/ or ibtpo/ may share a name with another of them, and
none may share a name with an installed or standard-library top-level module.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("flows", "tasks", "pipeline", "ibtpo_core", "ibtpo")


def _modules() -> dict[str, list[str]]:
    found = defaultdict(list)
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if path.stem != "__init__" and "__pycache__" not in path.parts:
                found[path.stem].append(str(path.relative_to(ROOT)))
    return found


def test_module_names_are_unique_across_flows_tasks_and_the_library():
    twice = {name: paths for name, paths in _modules().items() if len(paths) > 1}
    assert not twice, f"rename one of each: {twice}"


def test_no_module_shares_a_name_with_a_library():
    libraries = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    libraries -= set(FOLDERS) | {"configs", "bench", "tests"}  # this repository's own packages
    clash = {name: paths for name, paths in _modules().items() if name in libraries}
    assert not clash, f"these modules shadow a library once their folder is on sys.path: {clash}"


def test_import_evaluate_is_not_a_flow_once_prefect_loads_the_flows():
    """What Prefect does when it runs a deployment: load a flow from its file."""
    code = ("import sys; from prefect.flows import load_flow_from_entrypoint;"
            "load_flow_from_entrypoint('flows/evaluate_checkpoint.py:evaluate');"
            "import importlib.util as u; s = u.find_spec('evaluate');"
            "print(s.origin if s else None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip().splitlines()[-1]
    assert not origin.startswith(str(ROOT / "flows")), origin


def test_tasks_holds_prefect_tasks_only():
    import importlib

    from prefect import Task

    for path in sorted((ROOT / "tasks").glob("*.py")):
        if path.stem == "__init__":
            continue
        mod = importlib.import_module(f"tasks.{path.stem}")
        own = [
            v for v in vars(mod).values() if isinstance(v, Task) and v.fn.__module__ == mod.__name__
        ]
        assert own, f"tasks/{path.name} defines no Prefect task: move it out of tasks/ (pipeline/)"
