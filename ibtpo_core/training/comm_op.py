"""DeepSpeed's CPU communication op (a shared-memory all-reduce), and the lock of its build.

DeepSpeed compiles this op with gcc at the first ``init_distributed`` of an environment (tens of
seconds: docs/results/bench_time.md) into torch's extensions folder, under a ``lock`` file that
torch creates, holds open while it builds, and removes afterwards. A process killed during that
build leaves the file behind, and every later build then waits for it forever without a word.
Two rules prevent that here:

- one process exchanges nothing, so the op is switched off there: no build, no lock;
- several processes: before the build, a lock that no live process holds open is stale (its
  builder died); it is removed, with a message, and the op is built again.

Linux only where it matters (the op itself is Linux only). Knows nothing of the trainer.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

OP_NAME = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME
log = logging.getLogger(__name__)


def skip_comm_op() -> None:
    """Never build or load the op in this process (one rank: torch's collectives suffice)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[OP_NAME] = False  # read by deepspeed.comm.torch


def lock_path() -> Path:
    """Where torch's build of the op keeps its lock (TORCH_EXTENSIONS_DIR or torch's default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(OP_NAME, verbose=False)) / "lock"


def lock_holders(path: Path) -> list[int]:
    """Process ids that hold ``path`` open (read from /proc; processes of other users are not
    visible and do not count)."""
    target = os.path.realpath(path)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                pids.append(int(proc.name))
        except OSError:  # the process ended meanwhile, or is not ours
            continue
    return pids


def clear_stale_lock(path: Path | None = None, settle_s: float = 1.0) -> bool:
    """Remove the build lock at ``path`` if no live process holds it; True if removed.

    A lock seen without a holder is looked at again after ``settle_s``: a build that has just
    finished closes the file a moment before it deletes it.
    """
    if not Path("/proc/self/fd").is_dir():
        return False
    path = path or lock_path()
    if not path.exists() or lock_holders(path):
        return False
    time.sleep(settle_s)
    if not path.exists() or lock_holders(path):
        return False
    path.unlink(missing_ok=True)
    log.warning("removed %s: a build lock of DeepSpeed's %s op left by a process killed while "
                "compiling it; the op is built again now (about 40 s)", path, OP_NAME)
    return True


def prepare_comm_op(world_size: int) -> None:
    """Call before ``deepspeed.init_distributed`` on CPU."""
    if world_size == 1:
        skip_comm_op()
    else:
        clear_stale_lock()
