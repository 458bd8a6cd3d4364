"""Stage: build the dataset splits and save them (JSONL through ``datasets``)."""
from __future__ import annotations

from prefect import task

from ibtpo_core import stages
from pipeline.stage_cache import CACHE, inject_fault, stage_dir


@task(name="prepare_data", task_run_name="prepare_data",
      cache_policy=CACHE, persist_result=True, retries=1)
def prepare_data(data_cfg: dict, run_dir: str, code: str) -> dict:
    from configs.schema import DataConfig

    cfg = DataConfig.model_validate(data_cfg)
    folder = stage_dir(run_dir, "data", data_cfg, code)
    hit = stages.cached(folder)
    if hit:
        return hit
    inject_fault("prepare_data")
    return stages.prepare_data(cfg, folder)
