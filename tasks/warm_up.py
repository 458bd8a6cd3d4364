"""Stage: create the tiny model (when the config asks for one) and warm it up."""
from __future__ import annotations

from prefect import task

from ibtpo_core import stages
from pipeline.stage_cache import CACHE, inject_fault, stage_dir


@task(name="create_model", task_run_name="create_model",
      cache_policy=CACHE, persist_result=True)
def create_model(model_cfg: dict, run_dir: str, code: str) -> dict:
    from configs.schema import ModelConfig

    folder = stage_dir(run_dir, "model", model_cfg, code)
    return stages.cached(folder) or stages.create_model(ModelConfig.model_validate(model_cfg), folder)


@task(name="warm_up", task_run_name="warm_up",
      cache_policy=CACHE, persist_result=True)
def warm_up(warmup_cfg: dict, task_cfg: dict, model: dict, data: dict, run_dir: str, code: str) -> dict:
    from tqdm import tqdm

    from configs.schema import WarmupConfig
    from ibtpo_core.data.countdown import CountdownSpec

    cfg = WarmupConfig.model_validate(warmup_cfg)
    folder = stage_dir(run_dir, "warmup", warmup_cfg, task_cfg, model["digest"], data["digest"], code)
    hit = stages.cached(folder)
    if hit:
        return hit
    bar = tqdm(total=cfg.spec.steps, desc="warm-up", unit="step", mininterval=2)

    def progress(step, total, loss):
        if step == total // 2:
            inject_fault("warm_up")  # mid-stage
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    try:
        return stages.warm_up(model["path"], data["path"], CountdownSpec(**task_cfg), cfg.spec,
                              folder, progress=progress)
    finally:
        bar.close()
