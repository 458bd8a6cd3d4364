"""The sweep flow: every cell of a sweep file (variants x grid x seeds) as a training run, then
the comparison report.

Cells run as subflows of this flow, one at a time in this process (``executor: inline``), as
runs of the train deployment on a work pool, up to ``concurrency`` in flight
(``executor: deployment``: a process pool here, any Prefect worker type on a cluster), or as
Ray tasks on a Ray cluster with each cell's resources (``executor: ray``, flows/sweep_ray.py; on
a Ray of the sweep's own with ``concurrency`` above 1, the stages the cells share run first, in
this process with every free core). Every cell's config is validated before the first starts.
A cell that finished before (same config, same code) is a cache hit; a failed cell does not stop
the others; the sweep then fails naming the failed cells and the command that reruns one alone.
One MLflow run per sweep; each cell's training run carries its id in the tag
``ibtpo.sweep_run_id``.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from configs.schema import ExperimentConfig, load_config
from configs.sweep import Cell, SweepSpec, check_cells, expand, load_sweep
from flows.train import before_rl, finished_result, train
from ibtpo_core.artifacts import digest_json
from ibtpo_core.preflight import preflight
from ibtpo_core.runtime import set_offline_defaults, set_threads
from pipeline import summaries, tracking
from pipeline.code_digest import code_version
from pipeline.report import report_cell_tag, write_report


def select_cells(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """The cells named in ``only`` (a run name, a label, or ``label.s<seed>``); all if None."""
    if not only:
        return cells
    picked = [c for c in cells if {c.name, c.label, f"{c.label}.s{c.seed}"} & set(only)]
    known = {n for c in cells for n in (c.name, c.label, f"{c.label}.s{c.seed}")}
    unknown = [o for o in only if o not in known]
    if unknown:
        raise ValueError(f"unknown cell(s) {unknown}; this sweep's cells: "
                         f"{', '.join(f'{c.label}.s{c.seed}' for c in cells)}")
    return picked


@flow(name="sweep", log_prints=True)
def sweep(sweep_file: str, cells: list[str] | None = None) -> dict:
    """Run the cells of ``sweep_file`` (all, or those named in ``cells``) and write the report."""
    set_offline_defaults()
    log = get_run_logger()
    spec = load_sweep(sweep_file)
    chosen = select_cells(expand(spec), cells)
    configs = check_cells(spec, chosen)  # every cell's config, validated before any work
    for cfg in configs.values():
        preflight(cfg)
    tracking.check_tracking_store()
    if spec.executor == "deployment":
        check_deployment(spec.deployment)
    if spec.executor == "ray":
        from flows.sweep_ray import check_ray_address

        check_ray_address(spec.ray_address)
    experiment = next(iter(configs.values())).tracking.experiment
    parent = tracking.parent_run(
        experiment, sweep_key(spec), spec.name,
        params={"sweep_file": sweep_file, **spec.model_dump()}, kind="sweep",
        tags={"prefect.flow_run_id": str(flow_run.id), "ibtpo.sweep": spec.name})
    tracking.log_artifact_once(parent, sweep_file)
    out_dir = spec.output_dir.replace("${name}", spec.name)
    tracking.set_tags(parent, {"ibtpo.report_dir": out_dir})
    tags = {"ibtpo.sweep_run_id": parent, "ibtpo.sweep": spec.name}
    todo, status, reused = [], {}, {}
    for cell in chosen:
        done = finished_result(configs[cell.name])
        if done is not None:
            status[cell.name] = "cached"
            reused[cell.index] = done.get("mlflow_run_id")
            log.info(f"cell {cell.name}: finished before (same config and code), skipped")
        else:
            todo.append(cell)
    # a finished cell may belong to another sweep run (the file gained seeds or variants since):
    # the report reads it through this tag (pipeline/report.py collect)
    tracking.set_tags(parent, {report_cell_tag(i): rid for i, rid in reused.items() if rid})
    if spec.executor == "ray":
        from flows.sweep_ray import run_on_ray

        if spec.ray_address is None and spec.concurrency > 1:
            try:
                run_shared_stages([configs[c.name] for c in todo])
            except BaseException:  # no cell started; a rerun continues from the cached stages
                tracking.finish(parent, "FAILED")
                raise
        status.update(run_on_ray(spec, todo, tags, configs))
    else:
        runner = run_inline if spec.executor == "inline" else run_on_pool
        status.update(runner(spec, todo, tags))
    failed = sorted(n for n, s in status.items() if s not in ("completed", "cached"))
    try:
        report = write_report(parent, out_dir)
        summaries.publish_sweep_report(spec.name, Path(report).read_text(), parent)
    except ValueError as err:  # no cell finished: nothing to compare
        report = f"(no report: {err})"
    tracking.finish(parent, "FAILED" if failed else "FINISHED")
    summary = {"sweep_run_id": parent, "cells": status, "report": str(report)}
    if failed:
        rerun = f"ibtpo sweep {sweep_file} --cell {failed[0].removeprefix(spec.name + '.')}"
        raise RuntimeError(f"{len(failed)} of {len(chosen)} cells failed: {', '.join(failed)}. "
                           f"The others finished and are in the report {report}. Rerun a failed "
                           f"cell alone with `{rerun}` (finished cells are cache hits).")
    return summary


def sweep_key(spec: SweepSpec) -> str:
    """What identifies a sweep run (its MLflow run, and so which finished cells its report
    holds): the sweep file, the base config as it now resolves (an edit to the base YAML or a
    file it builds on, such as a new warm-up, starts a new sweep run, so the report never mixes
    cells trained from the old and the new config) and the code."""
    return digest_json([spec.model_dump(), load_config(spec.base, []).model_dump(),
                        code_version()])


def shared_inputs(cfg: ExperimentConfig) -> str:
    """What the stages before RL read (``flows.train.before_rl``): cells equal in it share
    their data, model, warm-up and evaluation before RL."""
    return digest_json([cfg.data.model_dump(), cfg.model.model_dump(), cfg.warmup.model_dump(),
                        cfg.eval.model_dump(), cfg.engine.model_dump(), cfg.rl.iterations > 0,
                        cfg.stage_cache_dir])


def run_shared_stages(configs: list[ExperimentConfig]) -> None:
    """The stages before RL, once per distinct set of inputs among ``configs``, in this process
    with every free core, before cells run several at a time on this machine. Otherwise the
    first cell computes them with its share of the cores (one thread for ``num_cpus: 1``) while
    the others hold theirs and wait on the stage's lock."""
    distinct = {shared_inputs(cfg): cfg for cfg in configs}
    if not distinct:
        return
    threads = set_threads(0)
    get_run_logger().info(f"the stages before RL that the cells share ({len(distinct)} set(s): "
                          f"data, model, warm-up, evaluation before RL), here with {threads} "
                          f"threads before the cells start")
    for cfg in distinct.values():
        before_rl(cfg)


def check_deployment(name: str) -> None:
    """Fail before any cell starts when the deployment the cells run on is not registered."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except Exception as err:  # noqa: BLE001 - ObjectNotFound, or an unreachable server
            raise ValueError(f"deployment {name!r} not found on the Prefect server "
                             f"({type(err).__name__}); register it with `prefect deploy --all` "
                             f"from the repository root, or use executor: inline") from None


def run_inline(spec: SweepSpec, cells: list[Cell], tags: dict) -> dict[str, str]:
    """Each cell as a subflow of this flow, one after another."""
    status = {}
    for cell in cells:
        state = train.with_options(flow_run_name=cell.name)(
            spec.base, list(cell.overrides), cell.tags(tags), return_state=True)
        status[cell.name] = "completed" if state.is_completed() else state.type.value.lower()
        if not state.is_completed():
            get_run_logger().error(f"cell {cell.name} ended {state.type.value}: {state.message}")
    return status


def run_on_pool(
    spec: SweepSpec, cells: list[Cell], tags: dict, poll_s: float = 5.0
) -> dict[str, str]:
    """Each cell as a run of the train deployment (linked as a subflow), at most
    ``spec.concurrency`` in flight; the work pool's own concurrency limit applies as well."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    status, running, queue = {}, {}, list(cells)
    with get_client(sync_client=True) as client:
        while queue or running:
            while queue and len(running) < spec.concurrency:
                cell = queue.pop(0)
                fr = run_deployment(
                    spec.deployment,
                    timeout=0,
                    flow_run_name=cell.name,
                    parameters={
                        "config": spec.base,
                        "overrides": list(cell.overrides),
                        "tags": cell.tags(tags),
                    },
                )
                running[cell.name] = fr.id
            time.sleep(poll_s)
            for name, fr_id in list(running.items()):
                state = client.read_flow_run(fr_id).state
                if state is not None and state.is_final():
                    status[name] = "completed" if state.is_completed() else state.type.value.lower()
                    del running[name]
    return status
