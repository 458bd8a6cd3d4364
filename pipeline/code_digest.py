"""The code digest of a stage: which files it can execute, and their hash.

``code_version(kind)`` covers a stage's task module and every library module its entry points
can load, by import or by name (a registry, a dotted path given to vLLM), followed through the
library; it is part of every stage's key (``pipeline/stage.py``), so editing the advantage
function redoes the RL iterations but not the data, the warm-up or the evaluation of the warm-up
checkpoint. The stage machinery itself (``pipeline/stage.py``: where an output goes, how it is
claimed and published) decides no output's content and keys nothing.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
LIBRARY = ROOT / "ibtpo_core"

# The stage kinds: each is keyed by its task module (its stage bodies run there), every library
# module that module imports, and what those can load, transitively (``stage_files``).
STAGE_TASKS: dict[str, str] = {
    "rl": "tasks/rl_iteration.py", "prepare_data": "tasks/prepare_data.py",
    "create_model": "tasks/create_model.py", "warm_up": "tasks/warm_up.py",
    "evaluate_policy": "tasks/evaluate_policy.py", "benchmark": "tasks/benchmark.py",
}
# Library entry points a stage runs besides its task module's imports (``module`` or
# ``module.function``): the manifests every stage writes (``EVERY_STAGE``), the module each update
# rank runs, the row helpers the lm-eval hooks import.
EVERY_STAGE: tuple[str, ...] = ("artifacts",)
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "rl": ("training.update_main",),
    "benchmark": ("data.problems",),
}
# Files a stage runs that are not modules of the library: the lm-eval task hooks, and the schema
# whose section methods (``engine.kwargs()``) run inside the RL and evaluation stages.
STAGE_EXTRA_GLOBS: dict[str, tuple[str, ...]] = {"benchmark": ("configs/lm_eval/**/*.py",),
                                                  "rl": ("configs/schema.py",),
                                                  "evaluate_policy": ("configs/schema.py",)}


def _module_file(library: Path, name: str) -> Path | None:
    base = library.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _library_names(library: Path, dotted: str) -> list[str]:
    """The library module a dotted name refers to (``ibtpo_core.a.b``, ``ibtpo_core.a.b.Class``:
    the longest prefix that is a module), relative to ``ibtpo_core``; none if it names none."""
    if not dotted.startswith("ibtpo_core."):
        return []
    parts = dotted[len("ibtpo_core."):].split(".")
    for n in range(len(parts), 0, -1):
        if _module_file(library, ".".join(parts[:n])):
            return [".".join(parts[:n])]
    return []


def _library_imports(library: Path, node: ast.AST) -> set[str]:
    """Library modules (dotted, relative to ``ibtpo_core``) that ``node`` can load: those it
    imports anywhere, and those it names in a string (``"ibtpo_core.engines.hf"``: a registry
    that imports a module by name, a worker class given to vLLM as a dotted path)."""
    out = set()
    for n in ast.walk(node):
        names = [a.name for a in n.names] if isinstance(n, ast.Import) else []
        if isinstance(n, ast.ImportFrom) and n.module:
            names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            names = [n.value]
        for name in names:
            out.update(_library_names(library, name))
    return out


def _reachable_defs(tree: ast.Module, func: str) -> list[ast.AST]:
    """The top-level definitions of a module that ``func`` can run: itself, what it names
    (functions, classes, module constants; transitively), and what is registered
    (``@REGISTRY.register(...)``) in a registry it names."""
    defs: dict[str, ast.AST] = {}
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[n.name] = n
        targets = n.targets if isinstance(n, ast.Assign) else (
            [n.target] if isinstance(n, ast.AnnAssign) else [])
        defs.update({t.id: n for t in targets if isinstance(t, ast.Name)})
    if func not in defs:
        return []

    def names_in(node: ast.AST) -> set[str]:
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    def registries(d: ast.AST) -> set[str]:
        return {name for deco in getattr(d, "decorator_list", ()) for name in names_in(deco)}

    seen, todo = set(), [func]
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        used = names_in(defs[name])
        todo += [n for n in used if n in defs]
        todo += [d for d, node in defs.items() if registries(node) & used]
    return [defs[n] for n in sorted(seen)]


def stage_files(stage: str, root: Path = ROOT) -> list[Path]:
    """Every file the code digest of ``stage`` covers: its task module, the library modules it
    imports, the files of its other entry points (for a ``module.function`` entry: what the
    function can run of its module, and the module's top-level imports), every library module
    those can load, transitively, and its extra files."""
    library = root / "ibtpo_core"
    task_module = root / STAGE_TASKS[stage]
    files: set[Path] = {task_module}
    todo: list[str] = sorted(_library_imports(library, ast.parse(task_module.read_text())))
    for entry in EVERY_STAGE + STAGE_CODE.get(stage, ()):
        path = _module_file(library, entry)
        if path is None:  # module.function
            mod, _, func = entry.rpartition(".")
            path = _module_file(library, mod) if mod else None
            if path is None:
                raise ValueError(f"stage code entry {entry!r}: no module ibtpo_core.{mod or entry}")
            tree = ast.parse(path.read_text())
            reach = _reachable_defs(tree, func)
            if not reach:
                raise ValueError(f"stage code entry {entry!r}: no function {func} in {path.name}")
            top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            files.add(path)
            todo += [m for n in top + reach for m in _library_imports(library, n)]
        else:
            todo.append(entry)
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _module_file(library, mod)
        files.add(path)
        todo += sorted(_library_imports(library, ast.parse(path.read_text())))
    for pattern in STAGE_EXTRA_GLOBS.get(stage, ()):
        files.update(root.glob(pattern))
    return sorted(files)


@lru_cache(maxsize=None)
def code_version(stage: str | None = None, root: Path = ROOT) -> str:
    """Digest of the code ``stage`` runs (see ``stage_files``); without a stage, of the code of
    every stage (what a whole training run depends on)."""
    if stage is not None and stage not in STAGE_TASKS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_TASKS)}")
    stages = [stage] if stage else list(STAGE_TASKS)
    files = sorted({f for s in stages for f in stage_files(s, root)})
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
