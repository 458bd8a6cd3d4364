"""Stage: held-out accuracy, pass@k and distinct correct solutions of a checkpoint."""
from __future__ import annotations

from prefect import task

from ibtpo_core import stages
from pipeline.stage_cache import CACHE, inject_fault, stage_dir


@task(name="evaluate_policy", task_run_name="evaluate_policy",
      cache_policy=CACHE, persist_result=True)
def evaluate_policy(eval_cfg: dict, engine_cfg: dict, policy: dict, data: dict, run_dir: str,
                    code: str) -> dict:
    from configs.schema import EngineConfig, EvalConfig

    folder = stage_dir(run_dir, "eval", eval_cfg, engine_cfg, policy["digest"], data["digest"], code)
    hit = stages.cached(folder)
    if hit:
        return hit
    inject_fault("evaluate_policy")
    return stages.evaluate_checkpoint(
        policy["path"], data["path"], EvalConfig.model_validate(eval_cfg),
        EngineConfig.model_validate(engine_cfg), folder, eval_cfg.get("split", "test"))
