"""Process-level settings: thread counts sized to the free cores, hub-offline defaults."""
from __future__ import annotations

import os

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


def set_offline_defaults() -> None:
    """Never reach a model or data hub unless the user set these variables otherwise."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def free_cores() -> int:
    """Cores not busy right now (a busy core made 2-thread torch 15x slower on these machines)."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(n, round(n - load + 0.3)))


def set_threads(threads: int = 0) -> int:
    import torch

    n = threads or free_cores()
    torch.set_num_threads(n)
    return n
