"""The pipeline's stages as plain functions over folders: each reads its inputs from paths,
writes one output folder atomically with a manifest, and returns a small record
(path, digest, metrics). Prefect tasks and the CLI both call these; nothing here knows about
Prefect or MLflow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable, TypedDict

from ibtpo_core.artifacts import (
    atomic_dir,
    clear_dead_writes,
    exclusive,
    read_manifest,
    write_manifest,
)
from ibtpo_core.registry import Registry


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


class StageRecord(TypedDict):
    """What a stage returns and the next one takes (a plain dict on the wire, so Prefect's cache
    and task runners carry it as is): the stage's output folder, the digest of its files (what
    later stages are keyed on) and its metrics."""

    path: str
    digest: str
    metrics: dict[str, float]


def _record(folder: Path, manifest: dict) -> StageRecord:
    return {
        "path": str(folder),
        "digest": manifest["digest"],
        "metrics": manifest.get("metrics", {}),
    }


def publish(folder: Path, write, metrics: dict, **extra) -> StageRecord:
    """Write a stage's output atomically: ``write(tmp)`` fills a temporary folder, the manifest
    (file digests, ``metrics``, ``extra``) is written last, then the folder is renamed into
    place. Returns the stage's record."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write(tmp)
        manifest = write_manifest(tmp, {"metrics": metrics, **extra})
    return _record(folder, manifest)


def cached(folder: Path) -> StageRecord | None:
    """The record of a finished, intact stage output in ``folder``; None if it must be (re)made."""
    manifest = read_manifest(folder)
    return None if manifest is None else _record(folder, manifest)


@contextlib.contextmanager
def claim(folder: Path):
    """``with claim(folder) as hit``: ``hit`` is the finished output's record, or None, and then
    this process holds the stage until the block ends and must compute it. Where several workers
    reach one stage of a shared store at once, one computes; the others wait and get its record.
    """
    hit = cached(folder)
    if hit is not None:
        yield hit
        return
    with exclusive(folder):
        hit = cached(folder)  # a worker that held the stage before us may have finished it
        if hit is None:
            clear_dead_writes(folder)
        yield hit


# data.source -> fn(data_cfg) -> ({"train", "validation", "test": rows}, metrics)
DATA_SOURCES: Registry[Callable[..., tuple[dict, dict]]] = Registry("data source")


@DATA_SOURCES.register("countdown")
def _countdown_splits(data_cfg) -> tuple[dict[str, list[dict]], dict]:
    from ibtpo_core.data.countdown import make_splits

    return make_splits(data_cfg.countdown, data_cfg.seed, data_cfg.n_test, data_cfg.n_val), {}


@DATA_SOURCES.register("reasoning_gym")
def _gym_splits(data_cfg) -> tuple[dict[str, list[dict]], dict]:
    from ibtpo_core.data.gym import make_gym_splits

    spec = data_cfg.reasoning_gym
    return make_gym_splits(spec, data_cfg.seed, data_cfg.n_test, data_cfg.n_val), {}


def prepare_data(data_cfg, folder: Path) -> dict:
    """Write ``train/validation/test.jsonl`` of the built-in task, a ``datasets`` source or a
    reasoning-gym generator."""
    folder = Path(folder)
    splits, metrics = DATA_SOURCES.get(data_cfg.source)(data_cfg)

    def write(tmp: Path) -> None:
        for name, rows in splits.items():
            _write_jsonl(tmp / f"{name}.jsonl", rows)

    counts = {f"data/{k}_rows": float(len(v)) for k, v in splits.items()}
    return publish(folder, write, {**counts, **metrics},
                   task=dataclasses.asdict(data_cfg.countdown))


@DATA_SOURCES.register("datasets")
def _splits_from_datasets(data_cfg) -> tuple[dict[str, list[dict]], dict]:
    """Train and test from a ``datasets`` source; ``data/skipped_rows/<split>`` counts the
    malformed rows ``bad_rows: skip`` left out."""
    from ibtpo_core.data.sources import load_split_counted

    src = data_cfg.datasets
    test_src = data_cfg.test_datasets or src
    test, skipped_test = load_split_counted(test_src, test_src.test_split)
    test = test[: data_cfg.n_test]
    held = {r["key"] for r in test}
    train, skipped_train = load_split_counted(src, src.train_split)
    train = [r for r in train if r["key"] not in held]
    n_val = min(data_cfg.n_val, max(0, len(train) - 1))
    if not train:
        raise ValueError("every training row is also a test problem: nothing left to train on")
    splits = {"train": train[: len(train) - n_val], "validation": train[len(train) - n_val:],
              "test": test}
    return splits, {"data/skipped_rows/train": float(skipped_train),
                    "data/skipped_rows/test": float(skipped_test)}


def create_model(model_cfg, folder: Path) -> dict:
    """Save a tokenizer and model: a GGUF file converted to a HF checkpoint, or a freshly
    initialised tiny model."""
    from ibtpo_core.data.tokenizer import build_tokenizer
    from ibtpo_core.models.gguf_checkpoint import convert_gguf
    from ibtpo_core.models.tiny import create_tiny_model

    metrics: dict = {}

    def write(tmp: Path) -> None:
        if model_cfg.gguf is not None:
            n = convert_gguf(model_cfg.gguf, str(tmp))
        else:
            n = create_tiny_model(build_tokenizer(), model_cfg.tiny, model_cfg.init_seed, str(tmp))
        metrics["model/params"] = float(n)

    return publish(folder, write, metrics)


def warm_up(model_dir: Path, data_dir: Path, task, spec, folder: Path, progress=None) -> dict:
    """Supervised warm-up of ``model_dir`` on the training split; saves the checkpoint."""
    from ibtpo_core.training.warmup import run_warmup

    train = read_jsonl(Path(data_dir) / "train.jsonl")
    metrics: dict = {}

    def write(tmp: Path) -> None:
        metrics.update(run_warmup(str(model_dir), str(tmp), train, task, spec, progress=progress))

    return publish(folder, write, metrics)


def evaluate_checkpoint(model_dir: Path, data_dir: Path, eval_cfg, engine_cfg, folder: Path,
                        split: str = "test") -> dict:
    """Accuracy, pass@k and distinct correct solutions of a checkpoint on a split."""
    from transformers import AutoTokenizer

    from ibtpo_core.engines.held import stage_engine
    from ibtpo_core.evaluation import evaluate
    from ibtpo_core.training.retention import require_weights

    require_weights(str(model_dir))

    rows = read_jsonl(Path(data_dir) / f"{split}.jsonl")
    if eval_cfg.n is not None:
        rows = rows[: eval_cfg.n]
    engine = stage_engine(engine_cfg.name, str(model_dir), **engine_cfg.kwargs())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    metrics = evaluate(engine, tok, rows, eval_cfg.spec)
    return publish(
        folder,
        lambda tmp: (tmp / "results.json").write_text(json.dumps(metrics, indent=1)),
        metrics,
    )
