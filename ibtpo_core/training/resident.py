"""The resident update worker of a one-process run (issue 29, item 1): the DeepSpeed engine,
its optimizer and the reference model stay in memory from one RL iteration's update to the
next, instead of being rebuilt from the checkpoint on disk each time.

A held state answers only for the checkpoint it wrote itself and left unaltered: it remembers
the device, inode, size and modification time of the weights file it saved, which the stage's
rename into place keeps. The next update asks for its parent checkpoint by path; a state whose
fingerprint matches that path's weights file is taken, anything else (a cache hit on another
process's checkpoint, a resume in a new process, a changed or rewritten file, other update or
loss settings) is dropped and the update builds from disk as before. The rollout engine is
handed the same weights in memory (``weights_for``) instead of re-reading the file. A checkpoint
saved without its weights (``rl.save_every``) is fingerprinted by its small ``HELD_FILE``.

Knows nothing of stages; one state per process.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ibtpo_core.training.replay import HELD_FILE

WEIGHTS_FILE = "model.safetensors"

_HELD: dict = {}


def fingerprint(checkpoint: str) -> tuple | None:
    """What identifies a checkpoint's weights file on disk without reading it (or, for one saved
    without its weights, its ``HELD_FILE``); None if neither is there."""
    for name in (WEIGHTS_FILE, HELD_FILE):
        try:
            st = os.stat(Path(checkpoint) / name)
        except OSError:
            continue
        return (name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return None


@dataclass
class TrainerState:
    """What one update leaves for the next: the DeepSpeed engine, its optimizer, the tokenizer,
    the reference model (or None) and whether the optimizer state is sharded."""

    engine: object
    optimizer: object
    tok: object
    ref: object
    sharded: bool
    key: str  # the update and loss settings it was built for
    clip: float = 0.0  # the DeepSpeed config's gradient_clipping (0: none)
    saved: tuple | None = None  # the fingerprint of the checkpoint it wrote


def _held_for(checkpoint: str) -> TrainerState | None:
    """The held state if it wrote ``checkpoint`` and the file is unaltered since; else None."""
    state = _HELD.get("state")
    if state is None or state.saved is None or state.saved != fingerprint(checkpoint):
        return None
    return state


def take(checkpoint: str, key: str) -> TrainerState | None:
    """The held state if it wrote ``checkpoint`` (unaltered since) under settings ``key``; else
    None, the held state released."""
    state = _held_for(checkpoint)
    if state is not None and state.key == key:
        return state
    release()
    return None


def hold(state: TrainerState, checkpoint_written: str) -> None:
    """Keep ``state`` for the next update; it answers for the weights of ``checkpoint_written``
    (just written to a stage's temporary folder: the rename keeps the fingerprint; or a
    checkpoint the state was replayed to)."""
    state.saved = fingerprint(checkpoint_written)
    _HELD["state"] = state


def weights_for(checkpoint: str):
    """The held model's parameters (a state dict, in memory) if the held state wrote
    ``checkpoint`` and it is unaltered; else None."""
    state = _held_for(checkpoint)
    return None if state is None else state.engine.module.state_dict()


def release() -> None:
    """Drop the held state and free its memory."""
    if _HELD.pop("state", None) is not None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
