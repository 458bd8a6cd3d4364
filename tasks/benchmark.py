"""Stage: benchmark a saved checkpoint with lm-eval (``ibtpo_core.lm_eval_runner``): the built-in
task on the run's test split, the AIME avg@k tasks, and standard lm-eval tasks by name."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.stage import StageRecord, stage

if TYPE_CHECKING:
    from configs.schema import BenchmarkConfig


@task(task_run_name="benchmark", cache_policy=NO_CACHE)
@stage("bench", code="benchmark")
def benchmark(out: Path, bench: BenchmarkConfig, policy: StageRecord, data: StageRecord) -> dict:
    from ibtpo_core.lm_eval_runner import run_lm_eval

    t0 = time.time()
    got = run_lm_eval(policy["path"], str(Path(data["path"]) / "test.jsonl"), bench.model_dump(),
                      out)
    shutil.rmtree(out / "lm_eval_tasks", ignore_errors=True)
    results = got["results"]
    config = {k: str(v) for k, v in got.get("config", {}).items()}
    (out / "lm_eval_results.json").write_text(
        json.dumps({"results": results, "config": config}, indent=1, default=str))
    metrics = {f"lm_eval/{name}/{k.replace(',', '_')}": float(v)
               for name, vals in results.items() for k, v in vals.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics["timing_s/benchmark"] = time.time() - t0
    return metrics
