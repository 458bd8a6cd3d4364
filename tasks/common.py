"""What every pipeline task shares: the cache policy and the stage-folder convention.

Tasks are cached on their inputs and their own source (``INPUTS + TASK_SOURCE``) with persisted
results, so a rerun of a finished run is cache lookups only. Inputs are config sections, paths
and digests (never models or tensors); ``code`` is a digest of the library, so editing
``ibtpo_core`` invalidates the caches that depend on it. Each task writes one folder whose name
is a digest of its inputs, atomically, with a manifest; a folder already complete is reused.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from prefect.cache_policies import INPUTS, TASK_SOURCE

from ibtpo_core.artifacts import digest_json

CACHE = INPUTS + TASK_SOURCE


@lru_cache(maxsize=1)
def code_version() -> str:
    """Digest of every library source file (changes invalidate downstream caches)."""
    root = Path(__file__).resolve().parents[1] / "ibtpo_core"
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def stage_dir(run_dir: str, stage: str, *key_parts) -> Path:
    return Path(run_dir) / f"{stage}-{digest_json(list(key_parts))[:12]}"


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
