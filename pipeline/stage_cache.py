"""What every pipeline task shares: the cache policy and the stage-folder convention.

Tasks are cached on their inputs and their own source (``INPUTS + TASK_SOURCE``) with persisted
results, so a rerun of a finished run is cache lookups only. Inputs are config sections, paths
and digests (never models or tensors); ``code`` is a digest of the library code a stage runs
(``code_version(stage)``: the modules its entry function imports, followed through the library),
so editing the advantage function redoes the RL iterations but not the data, the warm-up or the
evaluation of the warm-up checkpoint. Each task writes one folder whose name
is a digest of its inputs, atomically, with a manifest; a folder already complete is reused.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
from functools import lru_cache
from pathlib import Path

from prefect.cache_policies import INPUTS, TASK_SOURCE

from ibtpo_core.artifacts import digest_json

CACHE = INPUTS + TASK_SOURCE


LIBRARY = Path(__file__).resolve().parents[1] / "ibtpo_core"

# The library entry points of each stage kind; a stage's code digest covers these and every
# library module they import, so code outside them (the CLI, preflight, reports) keys nothing.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "rl": ("rl", "training.deepspeed_trainer", "training.update_main", "engines.held",
           "data.tokenizer"),
    "prepare_data": ("stages.prepare_data", "stages._splits_from_datasets"),
    "create_model": ("stages.create_model",),
    "warm_up": ("stages.warm_up",),
    "evaluate_policy": ("stages.evaluate_checkpoint",),
    "benchmark": ("lm_eval_runner", "stages.publish", "data.problems"),  # + the lm-eval task hooks
}


def _module_file(name: str) -> Path | None:
    base = LIBRARY.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _library_imports(node: ast.AST) -> set[str]:
    """Library modules (dotted, relative to ``ibtpo_core``) imported anywhere under ``node``."""
    out = set()
    for n in ast.walk(node):
        names = [a.name for a in n.names] if isinstance(n, ast.Import) else []
        if isinstance(n, ast.ImportFrom) and n.module:
            names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        for name in names:
            if name.startswith("ibtpo_core.") and _module_file(name[len("ibtpo_core."):]):
                out.add(name[len("ibtpo_core."):])
    return out


def _closure(entries: tuple[str, ...]) -> list[Path]:
    """Files of the entry points (``module`` or ``module.function``: the module's top-level
    imports plus the function's own) and of every library module they import, transitively."""
    files: set[Path] = set()
    todo: list[str] = []
    for entry in entries:
        path = _module_file(entry)
        if path is None:  # module.function
            mod, func = entry.rsplit(".", 1)
            path = _module_file(mod)
            if path is None:
                raise ValueError(f"stage code entry {entry!r}: no module ibtpo_core.{mod}")
            tree = ast.parse(path.read_text())
            fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func]
            if not fn:
                raise ValueError(f"stage code entry {entry!r}: no function {func} in {path.name}")
            top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            files.add(path)
            todo += [m for n in top + fn for m in _library_imports(n)]
        else:
            todo.append(entry)
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _module_file(mod)
        files.add(path)
        todo += sorted(_library_imports(ast.parse(path.read_text())))
    return sorted(files)


@lru_cache(maxsize=None)
def code_version(stage: str | None = None) -> str:
    """Digest of the library code ``stage`` runs (see STAGE_CODE); without a stage, of the code
    of every stage (what a whole training run depends on)."""
    if stage is not None and stage not in STAGE_CODE:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_CODE)}")
    entries = STAGE_CODE[stage] if stage else tuple(e for v in STAGE_CODE.values() for e in v)
    files = _closure(entries)
    if stage in ("benchmark", None):
        files += sorted((LIBRARY.parent / "configs" / "lm_eval").rglob("*.py"))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(LIBRARY.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def plain(part):
    """A stage key part as plain JSON data: a typed config section as its ``model_dump()``, a
    spec dataclass as its fields (what the flow passed as dict slices before: same digests)."""
    if hasattr(part, "model_dump"):
        return part.model_dump()
    if dataclasses.is_dataclass(part) and not isinstance(part, type):
        return dataclasses.asdict(part)
    return part


def stage_dir(run_dir: str, stage: str, *key_parts) -> Path:
    """The folder of a stage output: its name is a digest of what the stage is keyed on."""
    return Path(run_dir) / f"{stage}-{digest_json([plain(p) for p in key_parts])[:12]}"


def inject_fault(stage: str, iteration: int = -1) -> None:
    """Testing hook: ``IBTPO_FAULT=stage[:iteration]`` makes that stage raise (or, with
    ``IBTPO_FAULT_MODE=kill``, SIGKILL its own process) just before it writes its output."""
    import os

    spec = os.environ.get("IBTPO_FAULT", "")
    if not spec:
        return
    name, _, it = spec.partition(":")
    if name == stage and (not it or int(it) == iteration):
        if os.environ.get("IBTPO_FAULT_MODE") == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault in {stage} (iteration {iteration})")
