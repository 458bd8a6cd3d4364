"""The evaluate flow: held-out accuracy, pass@k and the lm-eval benchmark of one checkpoint.

For a checkpoint a run made (``runs/<name>/iterations/it0039-policy-...``) or any Hugging Face
model directory: the data stage of ``config`` gives the test split, the evaluation and benchmark
stages are the training flow's own (cached on the checkpoint's content digest), and the results
go to an MLflow run tagged ``ibtpo.kind = evaluate``.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from configs.schema import load_config
from ibtpo_core.artifacts import digest_json
from ibtpo_core.preflight import preflight
from ibtpo_core.runtime import set_accelerator_default, set_offline_defaults, set_threads
from pipeline import tracking
from pipeline.code_digest import code_version
from pipeline.stage import external_record
from tasks.benchmark import benchmark
from tasks.evaluate_policy import evaluate_policy
from tasks.prepare_data import prepare_data


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoint: str, config: str = "configs/experiments/tiny_ibtpo.yaml",
             overrides: list[str] | None = None) -> dict:
    """Evaluate ``checkpoint`` on the test split of ``config`` (its eval and benchmark sections)."""
    set_offline_defaults()
    set_accelerator_default()
    cfg = load_config(config, [*(overrides or []), f"model.path={checkpoint}"])
    preflight(cfg)
    tracking.check_tracking_store()
    set_threads(cfg.threads)
    policy = external_record(checkpoint, store=cfg.stage_cache_dir)
    run = tracking.parent_run(
        cfg.tracking.experiment,
        digest_json([policy["digest"], cfg.model_dump(), code_version()]),
        f"evaluate {Path(checkpoint).name}",
        params=cfg.model_dump(),
        kind="evaluate",
        tags={"prefect.flow_run_id": str(flow_run.id), "ibtpo.checkpoint_digest": policy["digest"]},
    )
    try:
        shared = cfg.stage_cache_dir
        data = prepare_data(cfg.data, store=shared)
        ev = evaluate_policy(cfg.eval, cfg.engine, policy, data, store=shared)
        metrics = dict(ev["metrics"])
        if cfg.benchmark.enabled:
            b = benchmark(cfg.benchmark, policy, data, store=shared)
            metrics.update(b["metrics"])
            tracking.log_artifact_once(run, str(Path(b["path"]) / "lm_eval_results.json"))
        tracking.log_metrics_once(run, 0, metrics)
    except BaseException:
        tracking.finish(run, "FAILED")
        raise
    tracking.finish(run)
    return {"checkpoint": checkpoint, "mlflow_run_id": run, **metrics}
