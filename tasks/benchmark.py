"""Stage: benchmark a saved checkpoint with lm-eval (``simple_evaluate``).

The built-in task folder (``configs/lm_eval/ibtpo_countdown``) is copied next to the run with
the run's test split filled in and loaded with ``TaskManager(include_path=...)``; standard
tasks (gsm8k, minerva_math500, aime24, ...) are passed by name for real models.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from prefect import task

from ibtpo_core import stages
from tasks.common import CACHE, inject_fault, stage_dir

TASK_FOLDER = Path(__file__).resolve().parents[1] / "configs" / "lm_eval"
BUILTIN = "ibtpo_countdown"


def _task_folder(tmp: Path, test_jsonl: str) -> Path:
    dst = tmp / "lm_eval_tasks"
    shutil.copytree(TASK_FOLDER, dst, ignore=shutil.ignore_patterns("__pycache__"))
    y = dst / BUILTIN / f"{BUILTIN}.yaml"
    y.write_text(y.read_text().replace("__TEST_JSONL__", str(Path(test_jsonl).resolve())))
    return dst


def run_lm_eval(model_dir: str, test_jsonl: str, bench: dict, work: Path, seed: int = 1234) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder = _task_folder(work, test_jsonl)
    tm = TaskManager(include_path=str(folder))
    unknown = [t for t in bench["tasks"] if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; the built-in one is {BUILTIN!r}, "
                         f"standard ones include gsm8k, minerva_math500, aime24")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = f"temperature={bench['temperature']},do_sample={bench['temperature'] > 0},max_gen_toks={bench['max_gen_toks']}"
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32,trust_remote_code=False,device={device}",
        tasks=list(bench["tasks"]), task_manager=tm, limit=bench["limit"],
        batch_size=bench["batch_size"], gen_kwargs=gen, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    return out


@task(name="benchmark", cache_policy=CACHE, persist_result=True)
def benchmark(bench: dict, policy: dict, data: dict, run_dir: str, code: str) -> dict:
    folder = stage_dir(run_dir, "bench", bench, policy["digest"], data["digest"], code)
    hit = stages.cached(folder)
    if hit:
        return hit
    t0 = time.time()
    metrics: dict = {}

    def write(tmp: Path) -> None:
        out = run_lm_eval(policy["path"], str(Path(data["path"]) / "test.jsonl"), bench, tmp)
        shutil.rmtree(tmp / "lm_eval_tasks", ignore_errors=True)
        results = out["results"]
        (tmp / "lm_eval_results.json").write_text(json.dumps(
            {"results": results, "config": {k: str(v) for k, v in out.get("config", {}).items()}},
            indent=1, default=str))
        for task_name, vals in results.items():
            for k, v in vals.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics[f"lm_eval/{task_name}/{k.replace(',', '_')}"] = float(v)
        metrics["timing_s/benchmark"] = time.time() - t0
        inject_fault("benchmark")  # mid-stage: results computed, output not yet in place

    return stages.publish(folder, write, metrics)
