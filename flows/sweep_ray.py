"""A sweep's cells on a Ray cluster (sweep file ``executor: ray``), through prefect-ray's task
runner: each cell is a Prefect task run as a Ray task that asks for the cell's
``resources.num_cpus`` / ``num_gpus``, at most ``concurrency`` in flight.

A cell whose Ray worker dies (killed, out of memory, its node lost) is retried once by Ray; the
retry is the same training run, so its finished stages are cache hits and it resumes from its
last checkpoint. A cell that fails by itself (an exception in the run) is not retried: the sweep
names it and the command that reruns it. Cells run in the sweep's folder, which must be at the
same path on every node (a shared filesystem, as the stage store needs; README "Scaling out").
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from prefect import get_run_logger, task

from configs.schema import ExperimentConfig
from configs.sweep import Cell, SweepSpec
from ibtpo_core.runtime import GRANTED_CPUS_ENV

# Ray re-runs a task whose worker died once; a failure inside the run is not retried (the same
# code on the same inputs fails the same way)
WORKER_DEATH_RETRIES = 1
# one cell per worker process: what a cell held goes back to the OS when it ends, instead of
# staying with a worker that the next cell reuses (a worker that had run two SmolLM2 cells held
# more than either, and Ray's memory monitor killed it: docs/results/bench_time.md)
CELLS_PER_WORKER = 1


@task(name="sweep-cell", persist_result=False)
def run_cell(name: str, base: str, overrides: list[str], tags: dict[str, str], workdir: str,
             env: dict[str, str]) -> str:
    """One cell's training run, on whichever Ray node has its resources free."""
    from flows.train import train

    if not Path(workdir).is_dir():
        raise FileNotFoundError(
            f"cell {name}: the sweep's folder {workdir} is not on this Ray node "
            f"({os.uname().nodename}); cells need the repository and its runs/ folder at the same "
            f"path on every node (a shared filesystem, README 'Scaling out')")
    os.chdir(workdir)
    os.environ.update(env)
    state = train.with_options(flow_run_name=name)(base, overrides, tags, return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"cell {name} ended {state.type.value}: {state.message}")
    return "completed"


def cell_env(cfg: ExperimentConfig) -> dict[str, str]:
    """What a cell's process needs from the sweep's: the same MLflow store, its CPU grant."""
    from pipeline.tracking import tracking_uri

    return {"MLFLOW_TRACKING_URI": tracking_uri(),
            GRANTED_CPUS_ENV: str(max(1, int(cfg.resources.num_cpus)))}


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail at once, naming the fix, when nothing listens at a ``host:port`` or ``ray://``
    address (Ray itself waits minutes for a head that is not there)."""
    import socket

    if address is None or address == "auto":
        return  # a local Ray started for the sweep; "auto" fails fast in Ray itself
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address {address!r} is not host:port, ray://host:port or auto "
                         f"(e.g. 10.0.0.5:6379, the head's GCS port)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(
            f"no Ray head answers at ray_address {address!r} ({err.strerror or err}); start one "
            f"there (`ray start --head --port {port}` on that machine), fix the address, or set "
            f"ray_address: null to start a local Ray for the sweep") from None


def _named(address: str | None) -> bool:
    """Whether ``address`` names a cluster to join (not a local Ray, not one Ray finds itself)."""
    return address not in (None, "local", "auto")


def use_local_ray_token(address: str | None) -> bool:
    """Before joining a cluster by its address: turn Ray's token authentication on when
    RAY_AUTH_MODE is unset and a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), the rule `ray start --head` applies on the head. Ray itself does this only
    for a cluster it finds on its own, so without it a head started on this machine after any
    local ray.init() (which writes ~/.ray/auth_token) refuses the sweep. A cluster without token
    authentication accepts a driver that sends one. Returns whether token mode is on."""
    if not _named(address):
        return False  # Ray decides for a local or auto-found cluster
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def joined_ray(address: str | None):
    """prefect-ray's task runner on the cluster at ``address``; null: a Ray of our own
    ("local"), never a cluster named by RAY_ADDRESS or by a stale /tmp/ray/ray_current_cluster
    left by an earlier `ray start` (Ray would wait on it, then fail). A named head that answers
    but refuses us fails with what to check."""
    from prefect_ray import RayTaskRunner

    token = use_local_ray_token(address)
    with contextlib.ExitStack() as stack:
        try:
            runner = stack.enter_context(RayTaskRunner(address=address or "local"))
        except ConnectionError as err:
            if not _named(address):
                raise
            where = ("the head's token (`ray get-auth-token` on the head) in ~/.ray/auth_token, "
                     "RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN here")
            raise ConnectionError(
                f"{err}: the Ray head at ray_address {address!r} answers but refused this "
                "sweep. "
                + (f"A token was sent (RAY_AUTH_MODE=token): it must be {where}" if token else
                   f"If the head uses token authentication, put {where}")
                + "; check too that both sides run the same Ray version") from None
        yield runner


def check_cluster_fits(configs: dict[str, ExperimentConfig], total: dict[str, float]) -> None:
    """Fail before any cell starts when a cell asks for more than the whole cluster has (Ray
    would leave it pending for ever)."""
    for name, cfg in configs.items():
        for key, need in (("CPU", cfg.resources.num_cpus), ("GPU", cfg.resources.num_gpus)):
            if need > total.get(key, 0.0):
                raise ValueError(
                    f"cell {name} asks for {need:g} {key}(s) (resources.num_{key.lower()}s) but "
                    f"the Ray cluster has {total.get(key, 0.0):g} in all: lower it in the sweep's "
                    f"set: (e.g. resources.num_{key.lower()}s: {int(total.get(key, 0.0))}) or add "
                    f"nodes that have them")


def run_on_ray(spec: SweepSpec, cells: list[Cell], tags: dict[str, str],
               configs: dict[str, ExperimentConfig]) -> dict[str, str]:
    """Each cell as a Ray task, at most ``spec.concurrency`` in flight; returns each cell's
    final state (completed, failed, crashed)."""
    import ray
    from prefect_ray.context import remote_options

    if not cells:  # every cell finished before: no Ray to start
        return {}
    log = get_run_logger()
    status: dict[str, str] = {}
    queue, running = list(cells), {}
    with joined_ray(spec.ray_address) as runner:
        check_cluster_fits({c.name: configs[c.name] for c in cells}, ray.cluster_resources())
        while queue or running:
            while queue and len(running) < spec.concurrency:
                cell = queue.pop(0)
                res = configs[cell.name].resources
                with remote_options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                    max_retries=WORKER_DEATH_RETRIES,
                                    max_calls=CELLS_PER_WORKER):
                    # named after the cell: its Prefect task run, its Ray task and the worker's
                    # process title (ray::cell:<name>) say which cell it is
                    future = runner.submit(run_cell.with_options(name=f"cell:{cell.name}"), {
                        "name": cell.name, "base": spec.base, "overrides": list(cell.overrides),
                        "tags": cell.tags(tags), "workdir": os.getcwd(),
                        "env": cell_env(configs[cell.name])})
                running[future.wrapped_future] = (cell, future)
                log.info(f"cell {cell.name}: submitted to Ray ({res.num_cpus:g} CPU, "
                         f"{res.num_gpus:g} GPU)")
            done, _ = ray.wait(list(running), num_returns=1)
            cell, future = running.pop(done[0])
            future.wait()
            state = future.state
            status[cell.name] = "completed" if state.is_completed() else state.type.value.lower()
            if not state.is_completed():
                log.error(f"cell {cell.name} ended {state.type.value}: {state.message}")
    return status
