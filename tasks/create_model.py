"""Stage: save the policy a run starts from when the config makes one: a GGUF file converted to
a Hugging Face checkpoint, or a freshly initialised tiny model with the built-in tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline.stage import stage

if TYPE_CHECKING:
    from configs.schema import ModelConfig


@task(task_run_name="create_model", cache_policy=NO_CACHE)
@stage("model", code="create_model")
def create_model(out: Path, model: ModelConfig) -> dict:
    from ibtpo_core.data.tokenizer import build_tokenizer
    from ibtpo_core.models.gguf_checkpoint import convert_gguf
    from ibtpo_core.models.tiny import create_tiny_model

    if model.gguf is not None:
        n = convert_gguf(model.gguf, str(out))
    else:
        n = create_tiny_model(build_tokenizer(), model.tiny, model.init_seed, str(out))
    return {"model/params": float(n)}
