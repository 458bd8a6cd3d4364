"""The stage: the pipeline's unit of work and its only cache.

``@stage(folder, code)`` turns ``body(out, *inputs) -> metrics`` into a function of the inputs and
a ``store`` folder that returns a ``StageRecord``. It owns, for every stage alike:

- the key: every input (a record by its digest, a config section by its ``stage_key()`` or its
  fields) and the digest of the code the stage runs (``code_digest.code_version(code)``);
- the folder: ``<store>/<folder>-<key digest>``, ``folder`` formatted with the inputs;
- the claim: an intact output there is returned at once; otherwise this process holds the folder
  (other workers of a shared store wait, then reuse what it wrote) and runs ``body``;
- the publish: ``body`` fills a temporary folder, the manifest goes in last, one rename puts it
  in place, so a killed stage never leaves an output a rerun would trust;
- the fault hook: ``IBTPO_FAULT=<stage>[:iteration]`` kills the stage with its output written but
  not in place, ``after_<stage>`` just after its record exists (``tests/test_faults.py``).

An output altered or deleted on disk fails the manifest check and is computed again. Prefect
tasks (``tasks/``) are the stages' faces in the UI and cache nothing themselves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, TypedDict

from ibtpo_core.artifacts import (
    atomic_dir,
    clear_dead_writes,
    digest_files_remembered,
    digest_json,
    exclusive,
    folder_digest,
    read_manifest,
    write_manifest,
)
from pipeline.code_digest import code_version


class StageRecord(TypedDict):
    """What a stage returns and the next one takes (a plain dict, so task runners carry it as
    is): the stage's output folder, the digest of its files (what later stages are keyed on)
    and its metrics."""

    path: str
    digest: str
    metrics: dict[str, float]


@dataclasses.dataclass
class Output:
    """What a body returns when its manifest records more than metrics (lineage fields)."""

    metrics: dict
    manifest: dict = dataclasses.field(default_factory=dict)


def key_part(value):
    """An input as plain JSON data for the key: a record by its digest, a section by its
    ``stage_key()`` (the fields that change results), a typed section or spec by its fields."""
    if isinstance(value, dict) and {"path", "digest"} <= value.keys():
        return value["digest"]
    if hasattr(value, "stage_key"):
        return value.stage_key()
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def key_digest(parts, code: str) -> str:
    """The digest that names a stage's folder: its inputs as key parts, and the digest of the
    code of stage kind ``code``."""
    return digest_json([key_part(v) for v in parts] + [code_version(code)])


def _record(folder: Path, manifest: dict) -> StageRecord:
    return {"path": str(folder), "digest": manifest["digest"],
            "metrics": manifest.get("metrics", {})}


def cached(folder: Path) -> StageRecord | None:
    """The record of a finished, intact output in ``folder``; None if it must be (re)made."""
    manifest = read_manifest(folder)
    return None if manifest is None else _record(Path(folder), manifest)


def external_record(path: str, store: str) -> StageRecord:
    """The record of a checkpoint no stage wrote (``model.path``: a folder, or a hub id resolved
    to its local snapshot; checked by preflight): its path and content digest. Its files are
    hashed once and remembered in ``store`` by size and modification time, so a rerun reads none
    of an unchanged checkpoint."""
    from ibtpo_core.models.hub import resolve_model_path

    path = resolve_model_path(path)
    memo = Path(store) / ".external" / f"{digest_json(str(Path(path).resolve()))[:16]}.json"
    files = digest_files_remembered(Path(path), memo)
    return {"path": path, "digest": folder_digest(files), "metrics": {}}


def publish(folder: Path, write: Callable[[Path], dict | Output | None]) -> StageRecord:
    """``write(tmp)`` fills a temporary folder and returns its metrics (or an ``Output``); the
    manifest (file digests, metrics, lineage fields) is written last, then the folder is renamed
    into place."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        got = write(tmp)
        got = got if isinstance(got, Output) else Output(dict(got or {}))
        written = write_manifest(tmp, {"metrics": got.metrics, **got.manifest})
    return _record(folder, written)


@contextlib.contextmanager
def claim(folder: Path):
    """``with claim(folder) as hit``: ``hit`` is the finished output's record, or None, and then
    this process holds the folder until the block ends and must compute it."""
    hit = cached(folder)
    if hit is not None:
        yield hit
        return
    with exclusive(folder):
        hit = cached(folder)  # a worker that held the folder before us may have finished it
        if hit is None:
            clear_dead_writes(folder)
        yield hit


def inject_fault(point: str, iteration: int = -1) -> None:
    """Testing hook: ``IBTPO_FAULT=point[:iteration]`` makes that point raise (or, with
    ``IBTPO_FAULT_MODE=kill``, SIGKILL its own process)."""
    spec = os.environ.get("IBTPO_FAULT", "")
    if not spec:
        return
    name, _, it = spec.partition(":")
    if name == point and (not it or int(it) == iteration):
        if os.environ.get("IBTPO_FAULT_MODE") == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault in {point} (iteration {iteration})")


def stage(folder: str, code: str):
    """Make ``body(out, *inputs)`` a stage called as ``name(*inputs, store=...)`` (see the
    module's docstring); ``code`` is the stage kind whose code digest keys it."""

    def wrap(body: Callable) -> Callable[..., StageRecord]:
        sig = inspect.signature(body)
        params = list(sig.parameters.values())[1:]  # all but ``out``
        store = inspect.Parameter("store", inspect.Parameter.KEYWORD_ONLY, annotation=str)
        public = sig.replace(parameters=[*params, store], return_annotation=StageRecord)

        @functools.wraps(body)
        def run(*args, store: str, **kwargs) -> StageRecord:
            inputs = public.bind(*args, store=store, **kwargs).arguments
            del inputs["store"]
            iteration = inputs.get("iteration", -1)
            key = key_digest(inputs.values(), code)
            out = Path(store) / f"{folder.format(**inputs)}-{key[:12]}"
            with claim(out) as hit:  # one worker computes; others wait, then reuse
                if hit is None and out.exists():
                    print(f"{body.__name__}: the output {out} is incomplete or was altered; "
                          f"computing it again", file=sys.stderr, flush=True)
                record = hit or _compute(body, out, inputs, iteration)
            inject_fault(f"after_{body.__name__}", iteration)
            return record

        run.__signature__ = public
        return run

    return wrap


def _compute(body: Callable, out: Path, inputs: dict, iteration: int) -> StageRecord:
    def write(tmp: Path):
        got = body(tmp, **inputs)
        inject_fault(body.__name__, iteration)  # written, not yet in place
        return got

    return publish(out, write)
