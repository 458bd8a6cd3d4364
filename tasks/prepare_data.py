"""Stage: build the dataset splits and save them (``train/validation/test.jsonl``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.stage import stage

if TYPE_CHECKING:
    from configs.schema import DataConfig


@task(task_run_name="prepare_data", cache_policy=NO_CACHE, retries=1)
@stage("data", code="prepare_data")
def prepare_data(out: Path, data: DataConfig) -> dict:
    from ibtpo_core.data.splits import write_splits

    return write_splits(out, data)
