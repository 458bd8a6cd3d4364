"""What an RL run keeps of its checkpoints on disk: the optimizer state of the last
``rl.keep_optimizer_states`` iterations, the weights of the last ``rl.keep_checkpoints`` and of
every ``rl.keep_checkpoint_every``-th. Deleting keeps a checkpoint's digest
(``artifacts.prune``), so the cache and reruns are unchanged; what must read deleted files stops
and names the fix.
"""
from __future__ import annotations

from pathlib import Path

OPTIMIZER_FILE = "optimizer.pt"  # ZeRO stage 0: every rank holds the whole state
ZERO_STATE_DIR = "zero_state"  # ZeRO 1-3: DeepSpeed's own checkpoint of the sharded state
OPTIMIZER_STATE = (OPTIMIZER_FILE, ZERO_STATE_DIR)  # what rl.keep_optimizer_states prunes


def prune_optimizer_states(checkpoints: list[str], keep: int | None) -> int:
    """Delete the optimizer state of every checkpoint of ``checkpoints`` (oldest first) that
    holds one but the last ``keep`` of those (None: keep all); returns the bytes freed. The
    weights and the checkpoints' digests stay. Checkpoints saved without a state
    (``rl.save_optimizer_every``) do not count: the last states saved are what a replay needs."""
    from ibtpo_core.artifacts import prune

    if keep is None:
        return 0
    holding = [c for c in checkpoints if any((Path(c) / n).exists() for n in OPTIMIZER_STATE)]
    return sum(prune(Path(c), OPTIMIZER_STATE) for c in holding[: max(0, len(holding) - keep)])


def weight_files(folder: Path) -> tuple[str, ...]:
    """The weight files of a HF checkpoint folder (one file or shards, and the shards' index)."""
    return tuple(sorted(p.name for p in Path(folder).iterdir()
                        if p.name.endswith((".safetensors", ".safetensors.index.json"))))


def prune_checkpoints(checkpoints: list[str], keep_last: int | None, every: int) -> int:
    """Delete the weights of the checkpoints of ``checkpoints`` (oldest first: the one after
    iteration i at index i - 1) but the last ``keep_last`` that hold weights, every ``every``-th
    iteration's (every 0: none besides the last) and the last one holding an optimizer state
    (what a replay starts from, ``rl.save_every``); None keeps all. Returns the bytes freed.
    Their digests stay, so the cache and reruns are unchanged; a stage that must read deleted
    weights says so (``require_weights``)."""
    from ibtpo_core.artifacts import prune

    if keep_last is None:
        return 0
    names = {i: weight_files(Path(c)) if Path(c).is_dir() else ()
             for i, c in enumerate(checkpoints)}
    holding = [i for i in names if names[i]]
    keep = set(holding[max(0, len(holding) - keep_last):])
    states = [i for i, c in enumerate(checkpoints)
              if any((Path(c) / n).exists() for n in OPTIMIZER_STATE)]
    keep.update(states[-1:])
    freed = 0
    for i in holding:
        if i in keep or (every and (i + 1) % every == 0):
            continue
        freed += prune(Path(checkpoints[i]), names[i])
    return freed


def require_weights(model_dir: str) -> None:
    """Fail, naming the fix, if ``model_dir`` is a checkpoint whose weights were deleted by
    ``rl.keep_checkpoints``."""
    from ibtpo_core.artifacts import pruned_files

    gone = [f for f in pruned_files(Path(model_dir))
            if f.endswith((".safetensors", ".safetensors.index.json"))]
    if gone:
        raise ValueError(
            f"cannot read the policy in {model_dir}: its weights were deleted by "
            f"rl.keep_checkpoints (only the last iterations' and every "
            f"rl.keep_checkpoint_every-th are kept), and a stage must now be recomputed from it "
            f"(a later output is missing or corrupted, or an evaluation asks for it). Rerun with "
            f"rl.keep_checkpoints=null and a new output_dir, or evaluate a kept checkpoint")


def require_optimizer_state(model_dir: str) -> None:
    """Fail, naming the fix, if ``model_dir`` is a checkpoint whose optimizer state was pruned:
    continuing from it with a fresh optimizer would silently change the run."""
    from ibtpo_core.artifacts import pruned_files

    if pruned_files(Path(model_dir), OPTIMIZER_STATE):
        raise ValueError(
            f"cannot update from {model_dir}: its optimizer state was deleted by "
            f"rl.keep_optimizer_states (only the last iterations' states are kept), and this "
            f"iteration must now be recomputed from it (a later checkpoint is missing or "
            f"corrupted). Rerun with rl.keep_optimizer_states=null (keep them all) and a new "
            f"output_dir, or restore the checkpoint that was lost")
