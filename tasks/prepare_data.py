"""Stage: build the dataset splits and save them (JSONL through ``datasets``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task

from ibtpo_core import stages
from ibtpo_core.stages import StageRecord
from pipeline.stage_cache import CACHE, inject_fault, stage_dir

if TYPE_CHECKING:
    from configs.schema import DataConfig


@task(name="prepare_data", task_run_name="prepare_data",
      cache_policy=CACHE, persist_result=True, retries=1)
def prepare_data(data: DataConfig, run_dir: str, code: str) -> StageRecord:
    folder = stage_dir(run_dir, "data", data, code)
    with stages.claim(folder) as hit:  # one worker computes; others wait, then reuse
        if hit:
            return hit
        inject_fault("prepare_data")
        return stages.prepare_data(data, folder)
