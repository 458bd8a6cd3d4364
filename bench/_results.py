"""Shared by the benchmark scripts: write a result dict as JSON where --json asks, with NaN as
null (JSON has no NaN)."""
import json
import math
from pathlib import Path


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))


def nan_to_null(x):
    """``x`` with every float NaN, in nested dicts and lists, replaced by None."""
    if isinstance(x, dict):
        return {k: nan_to_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_null(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x
