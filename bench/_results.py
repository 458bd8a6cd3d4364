"""Shared by the benchmark scripts: write a result dict as JSON where --json asks."""
import json
from pathlib import Path


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
