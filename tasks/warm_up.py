"""Stage: create the tiny model (when the config asks for one) and warm it up."""
from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task

from ibtpo_core import stages
from ibtpo_core.stages import StageRecord
from pipeline.stage_cache import CACHE, inject_fault, stage_dir

if TYPE_CHECKING:
    from configs.schema import ModelConfig, WarmupConfig
    from ibtpo_core.data.countdown import CountdownSpec


@task(name="create_model", task_run_name="create_model",
      cache_policy=CACHE, persist_result=True)
def create_model(model: ModelConfig, run_dir: str, code: str) -> StageRecord:
    folder = stage_dir(run_dir, "model", model, code)
    with stages.claim(folder) as hit:
        return hit or stages.create_model(model, folder)


@task(name="warm_up", task_run_name="warm_up",
      cache_policy=CACHE, persist_result=True)
def warm_up(warmup: WarmupConfig, task_spec: CountdownSpec, model: StageRecord, data: StageRecord,
            run_dir: str, code: str) -> StageRecord:
    from tqdm import tqdm

    folder = stage_dir(run_dir, "warmup", warmup, task_spec, model["digest"], data["digest"], code)
    with stages.claim(folder) as hit:  # one worker computes; others wait, then reuse
        if hit:
            return hit
        bar = tqdm(total=warmup.spec.steps, desc="warm-up", unit="step", mininterval=2)

        def progress(step, total, loss):
            if step == total // 2:
                inject_fault("warm_up")  # mid-stage
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        try:
            return stages.warm_up(model["path"], data["path"], task_spec, warmup.spec, folder,
                                  progress=progress)
        finally:
            bar.close()
