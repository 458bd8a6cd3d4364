"""Process-level settings: thread counts sized to the free cores, hub-offline defaults, a quiet
console (the pipeline's own stage lines and progress bars, not every library's)."""
from __future__ import annotations

import os

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "MLFLOW_ENABLE_TELEMETRY": "false", "RAY_USAGE_STATS_ENABLED": "0"}


# progress bars of every checkpoint load and save, and of every dataset split lm-eval reads:
# dozens a run, drowning the pipeline's own bars
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def set_offline_defaults() -> None:
    """Never reach a model or data hub, and keep libraries' progress bars off, unless the user
    set these variables otherwise."""
    for k, v in {**OFFLINE_ENV, **QUIET_ENV}.items():
        os.environ.setdefault(k, v)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it), never a fixed one."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_accelerator_default() -> None:
    """Tell DeepSpeed the accelerator up front (it warns on every process that has to guess);
    a user's DS_ACCELERATOR wins."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"


def free_cores(sample_s: float = 0.3) -> int:
    """Cores not busy right now (a busy core slows torch's threads many times over:
    docs/results/bench_time.md).

    Sampled over ``sample_s`` seconds: the load average lags by a minute and would count a job
    that has just ended (an install, say) as still running.
    """
    n = os.cpu_count() or 1
    try:
        import psutil

        busy = psutil.cpu_percent(interval=sample_s) / 100.0 * n
    except ImportError:
        busy = os.getloadavg()[0]
    return max(1, min(n, round(n - busy + 0.3)))


# the CPUs a scheduler granted this process (set by a sweep's Ray cell from resources.num_cpus)
GRANTED_CPUS_ENV = "IBTPO_GRANTED_CPUS"


def set_threads(threads: int = 0) -> int:
    """torch's thread count: ``threads``; else the CPUs a scheduler granted; else the free
    cores."""
    import torch

    granted = int(float(os.environ.get(GRANTED_CPUS_ENV, "0")))
    n = threads or granted or free_cores()
    torch.set_num_threads(n)
    return n
