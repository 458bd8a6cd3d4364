"""Stage: held-out accuracy, pass@k and distinct correct solutions of a checkpoint."""
from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task

from ibtpo_core import stages
from ibtpo_core.stages import StageRecord
from pipeline.stage_cache import CACHE, inject_fault, stage_dir

if TYPE_CHECKING:
    from configs.schema import EngineConfig, EvalConfig


@task(name="evaluate_policy", task_run_name="evaluate_policy",
      cache_policy=CACHE, persist_result=True)
def evaluate_policy(evaluation: EvalConfig, engine: EngineConfig, policy: StageRecord,
                    data: StageRecord, run_dir: str, code: str) -> StageRecord:
    folder = stage_dir(run_dir, "eval", evaluation.stage_key(), engine, policy["digest"],
                       data["digest"], code)
    with stages.claim(folder) as hit:  # one worker computes; others wait, then reuse
        if hit:
            return hit
        inject_fault("evaluate_policy")
        return stages.evaluate_checkpoint(policy["path"], data["path"], evaluation, engine, folder,
                                          evaluation.split)
