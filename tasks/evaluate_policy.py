"""Stage: held-out accuracy, pass@k and distinct correct solutions of a checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.stage import StageRecord, stage

if TYPE_CHECKING:
    from configs.schema import EngineConfig, EvalConfig


@task(task_run_name="evaluate_policy", cache_policy=NO_CACHE)
@stage("eval", code="evaluate_policy")
def evaluate_policy(out: Path, evaluation: EvalConfig, engine: EngineConfig, policy: StageRecord,
                    data: StageRecord) -> dict:
    from transformers import AutoTokenizer

    from ibtpo_core.data.splits import read_jsonl
    from ibtpo_core.engines.held import stage_engine
    from ibtpo_core.evaluation import accuracy_metrics
    from ibtpo_core.training.retention import require_weights

    require_weights(policy["path"])
    rows = read_jsonl(Path(data["path"]) / f"{evaluation.split}.jsonl")[: evaluation.n]
    rollout = stage_engine(engine.name, policy["path"], **engine.kwargs())
    tok = AutoTokenizer.from_pretrained(policy["path"])
    metrics = accuracy_metrics(rollout, tok, rows, evaluation.spec)
    (out / "results.json").write_text(json.dumps(metrics, indent=1))
    return metrics
