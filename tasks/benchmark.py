"""Stage: benchmark a saved checkpoint with lm-eval (``ibtpo_core.lm_eval_runner``): the built-in
task on the run's test split, the AIME avg@k tasks, and standard lm-eval tasks by name."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from ibtpo_core import stages
from ibtpo_core.stages import StageRecord
from pipeline.stage_cache import CACHE, inject_fault, stage_dir

if TYPE_CHECKING:
    from configs.schema import BenchmarkConfig


@task(name="benchmark", task_run_name="benchmark",
      cache_policy=CACHE, persist_result=True)
def benchmark(bench: BenchmarkConfig, policy: StageRecord, data: StageRecord, run_dir: str,
              code: str) -> StageRecord:
    folder = stage_dir(run_dir, "bench", bench, policy["digest"], data["digest"], code)
    with stages.claim(folder) as hit:  # one worker computes; others wait, then reuse
        if hit:
            return hit
        t0 = time.time()
        metrics: dict = {}

        def write(tmp: Path) -> None:
            from ibtpo_core.lm_eval_runner import run_lm_eval

            out = run_lm_eval(
                policy["path"], str(Path(data["path"]) / "test.jsonl"), bench.model_dump(), tmp
            )
            shutil.rmtree(tmp / "lm_eval_tasks", ignore_errors=True)
            results = out["results"]
            (tmp / "lm_eval_results.json").write_text(
                json.dumps(
                    {
                        "results": results,
                        "config": {k: str(v) for k, v in out.get("config", {}).items()},
                    },
                    indent=1,
                    default=str,
                )
            )
            for task_name, vals in results.items():
                for k, v in vals.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        metrics[f"lm_eval/{task_name}/{k.replace(',', '_')}"] = float(v)
            metrics["timing_s/benchmark"] = time.time() - t0
            inject_fault("benchmark")  # mid-stage: results computed, output not yet in place

        return stages.publish(folder, write, metrics)
