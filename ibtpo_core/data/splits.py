"""The dataset splits a run trains, tunes and tests on: built from a data source (the built-in
task, a ``datasets`` source, a reasoning-gym generator) and kept as JSON lines."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ibtpo_core.registry import Registry

# data.source -> fn(data_cfg) -> ({"train", "validation", "test": rows}, metrics)
DATA_SOURCES: Registry[Callable[..., tuple[dict, dict]]] = Registry("data source")


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with Path(path).open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build_splits(data_cfg) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """The rows of ``train``, ``validation`` and ``test``, and metrics: each split's row count
    (``data/<split>_rows``) and what the source reports (malformed rows it skipped)."""
    splits, metrics = DATA_SOURCES.get(data_cfg.source)(data_cfg)
    return splits, {**{f"data/{k}_rows": float(len(v)) for k, v in splits.items()}, **metrics}


def write_splits(folder: Path, data_cfg) -> dict[str, float]:
    """``<split>.jsonl`` in ``folder`` for each split; returns the metrics of ``build_splits``."""
    splits, metrics = build_splits(data_cfg)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(Path(folder) / f"{name}.jsonl", rows)
    return metrics


@DATA_SOURCES.register("countdown")
def _countdown_splits(data_cfg) -> tuple[dict[str, list[dict]], dict]:
    from ibtpo_core.data.countdown import make_splits

    return make_splits(data_cfg.countdown, data_cfg.seed, data_cfg.n_test, data_cfg.n_val), {}


@DATA_SOURCES.register("reasoning_gym")
def _gym_splits(data_cfg) -> tuple[dict[str, list[dict]], dict]:
    from ibtpo_core.data.gym import make_gym_splits

    spec = data_cfg.reasoning_gym
    return make_gym_splits(spec, data_cfg.seed, data_cfg.n_test, data_cfg.n_val), {}


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
