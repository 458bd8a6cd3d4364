"""Checkpoints saved without their optimizer state (``rl.save_optimizer_every``) or without
their weights too (``rl.save_every``), and the plan that rebuilds one: the last checkpoint before
it that holds its optimizer state (or the start of RL, which has none to hold), then every update
since, each from its recorded sequences.

An update stage saved without the state marks its manifest ``optimizer_state: not_saved`` and
records its parent checkpoint's folder (``parent_path``) and its training sequences' file
(``sequences``); the plan follows those links back. One saved without its weights as well marks
``weights: not_saved`` and keeps, in its ``held.json``, a checksum of every tensor: what a replay
must reach bit for bit. Knows nothing of engines or stages beyond the manifest file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ibtpo_core.artifacts import load_manifest

NOT_SAVED = "not_saved"
HELD_FILE = "held.json"
_CHUNK = 1 << 24  # bytes of a tensor checksummed at once
_MOD = 65_521  # the position weights cycle through 1 .. _MOD


def _manifest(checkpoint: str) -> dict:
    return load_manifest(Path(checkpoint)) or {}


def optimizer_not_saved(checkpoint: str) -> bool:
    """Whether ``checkpoint`` was written without the optimizer state it was trained with."""
    return _manifest(checkpoint).get("optimizer_state") == NOT_SAVED


def weights_not_saved(checkpoint: str) -> bool:
    """Whether ``checkpoint`` was written without its weights (``rl.save_every``)."""
    return _manifest(checkpoint).get("weights") == NOT_SAVED


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


def ref_path(checkpoint: str) -> str | None:
    """The reference model's folder the update that wrote ``checkpoint`` used (recorded where
    the weights were not saved: a replay builds the trainer with it)."""
    return _manifest(checkpoint).get("ref_path")


def weights_home(checkpoint: str) -> str:
    """A checkpoint of the same model whose weights lie on disk: ``checkpoint`` itself, or for
    one saved without them, the base of its replay plan (an engine is built from its files and
    then handed the held weights)."""
    return plan(checkpoint)[0] if weights_not_saved(checkpoint) else checkpoint


def checksum(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per tensor: its dtype, shape and a position-weighted sum of its bytes (any one byte
    changed changes it). Cheap next to a cryptographic hash, and enough to tell a replay that
    is not bit-exact."""
    out = {}
    for name, t in state.items():
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        total = 0
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start: start + _CHUNK].to(torch.int64)
            w = (torch.arange(start, start + chunk.numel(), device=chunk.device) % _MOD) + 1
            total += int((chunk * w).sum())
        out[name] = f"{t.dtype}:{tuple(t.shape)}:{total}"
    return out


def write_held(checkpoint_dir: str, state: dict[str, torch.Tensor]) -> None:
    """Record the checksum of weights kept in memory instead of saved (``HELD_FILE``)."""
    (Path(checkpoint_dir) / HELD_FILE).write_text(json.dumps(checksum(state), indent=0))


def read_held(checkpoint: str) -> dict[str, str]:
    return json.loads((Path(checkpoint) / HELD_FILE).read_text())
