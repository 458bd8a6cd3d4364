"""Stage: supervised warm-up of the starting model on the training split's solution traces."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.stage import StageRecord, stage

if TYPE_CHECKING:
    from configs.schema import WarmupConfig
    from ibtpo_core.data.countdown import CountdownSpec


@task(task_run_name="warm_up", cache_policy=NO_CACHE)
@stage("warmup", code="warm_up")
def warm_up(out: Path, warmup: WarmupConfig, task_spec: CountdownSpec, model: StageRecord,
            data: StageRecord) -> dict:
    from tqdm import tqdm

    from ibtpo_core.data.splits import read_jsonl
    from ibtpo_core.training.warmup import run_warmup

    train = read_jsonl(Path(data["path"]) / "train.jsonl")
    with tqdm(total=warmup.spec.steps, desc="warm-up", unit="step", mininterval=2) as bar:

        def progress(step, total, loss):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        return run_warmup(model["path"], str(out), train, task_spec, warmup.spec,
                          progress=progress)
