"""Checkpoints saved without their optimizer state (``rl.save_optimizer_every``), and the plan
that rebuilds one: the last checkpoint before it that holds its optimizer state (or the start of
RL, which has none to hold), then every update since, each from its recorded sequences.

An update stage saved without the state marks its manifest ``optimizer_state: not_saved`` and
records its parent checkpoint's folder (``parent_path``) and its training sequences' file
(``sequences``); the plan follows those links back. Knows nothing of engines or stages beyond
the manifest file.
"""
from __future__ import annotations

from pathlib import Path

from ibtpo_core.artifacts import load_manifest

NOT_SAVED = "not_saved"


def _manifest(checkpoint: str) -> dict:
    return load_manifest(Path(checkpoint)) or {}


def optimizer_not_saved(checkpoint: str) -> bool:
    """Whether ``checkpoint`` was written without the optimizer state it was trained with."""
    return _manifest(checkpoint).get("optimizer_state") == NOT_SAVED


def plan(checkpoint: str) -> tuple[str, list[tuple[str, str]]]:
    """``(base, steps)``: the nearest checkpoint at or before ``checkpoint`` that is not marked
    ``not_saved``, and, oldest first, each later checkpoint with the sequences its update
    trained on."""
    steps = []
    cur = checkpoint
    while optimizer_not_saved(cur):
        m = _manifest(cur)
        if "parent_path" not in m or "sequences" not in m:
            raise ValueError(f"{cur} was saved without its optimizer state and does not record "
                             f"its parent and sequences, so it cannot be replayed; rerun with "
                             f"rl.save_optimizer_every: 1 and a new stage_cache_dir")
        steps.append((cur, m["sequences"]))
        cur = m["parent_path"]
        if len(steps) > 100_000:
            raise ValueError(f"the parent links from {checkpoint} form a loop")
    return cur, steps[::-1]
