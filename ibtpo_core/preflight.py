"""Checks that run before any expensive work: every path, model, tokenizer, DeepSpeed config and
benchmark name a config refers to. Each failure is a ``ValueError`` (or ``FileNotFoundError``)
that names the problem and the fix. The config's own types and ranges are checked when it is
loaded (``configs.schema``); this module checks what the config points at.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ibtpo_core.lm_eval_runner import AVG_K_TASKS, BUILTIN

BUILTIN_BENCHMARKS = (BUILTIN, *AVG_K_TASKS)  # the project's own lm-eval tasks


def check_writable(path: str, what: str) -> None:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable ({err.strerror or err}); choose another "
                         f"folder (--set {what}=...) or free the disk") from None


def check_model_dir(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model.path {path} does not exist: pass a folder written by "
                                f"save_pretrained")
    if not (p / "config.json").is_file():
        raise ValueError(f"model.path {path} is not a model (no config.json): pass a folder "
                         f"written by save_pretrained")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"model.path {path} has no *.safetensors weights: checkpoints are loaded "
                         f"only from safetensors (re-save the model with safe_serialization=True)")
    tok_cfg = p / "tokenizer_config.json"
    if tok_cfg.is_file():
        eos = json.loads(tok_cfg.read_text()).get("eos_token")
        if not eos:
            raise ValueError(f"the tokenizer in {path} has no EOS token: responses could never "
                             f"end; set eos_token in its tokenizer_config.json")


def check_deepspeed(config_path: str, world_size: int) -> None:
    from ibtpo_core.training.deepspeed_trainer import load_deepspeed_config

    load_deepspeed_config(config_path, world_size)


def check_data(data_cfg) -> None:
    if data_cfg.source == "datasets":
        from ibtpo_core.data.sources import check_files

        check_files(data_cfg.datasets)
        if data_cfg.test_datasets is not None:
            check_files(data_cfg.test_datasets)
    elif data_cfg.source == "reasoning_gym":
        from ibtpo_core.data.gym import check_dataset

        check_dataset(data_cfg.reasoning_gym)


def check_benchmarks(bench) -> None:
    for task, path in bench.local_data.items():
        if task not in BUILTIN_BENCHMARKS:
            raise ValueError(f"benchmark.local_data names {task!r}: only the project's tasks "
                             f"({', '.join(BUILTIN_BENCHMARKS)}) read local files")
        if not Path(path).is_file():
            raise FileNotFoundError(f"benchmark.local_data[{task!r}]: {path} does not exist")
    other = [t for t in bench.tasks if t not in BUILTIN_BENCHMARKS]
    if not bench.enabled or not other:
        return
    from lm_eval.tasks import TaskManager

    known = set(TaskManager().all_tasks)
    unknown = [t for t in other if t not in known]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: use {BUILTIN_BENCHMARKS[0]!r} or a "
                         f"standard lm-eval task such as gsm8k, minerva_math500, aime24")


def preflight(cfg) -> None:
    """Everything a run needs, checked in seconds, before data, warm-up or training start."""
    check_writable(str(cfg.resolved_output_dir()), "output_dir")
    check_writable(cfg.stage_cache_dir, "stage_cache_dir")
    if cfg.model.path is not None:
        from ibtpo_core.models.hub import resolve_model_path

        check_model_dir(resolve_model_path(cfg.model.path))
    elif cfg.model.gguf is not None:
        from ibtpo_core.models.gguf_checkpoint import locate

        locate(cfg.model.gguf)
    check_data(cfg.data)
    if cfg.eval.split == "validation" and cfg.data.n_val == 0:
        raise ValueError("eval.split is validation but data.n_val is 0 (no validation split): "
                         "set data.n_val (e.g. --set data.n_val=200) or eval.split=test")
    check_deepspeed(cfg.algo.update.deepspeed_config, cfg.algo.update.world_size)
    check_benchmarks(cfg.benchmark)
