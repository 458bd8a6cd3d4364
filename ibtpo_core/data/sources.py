"""Load countdown-style problems from any ``datasets`` source (a hub id or local files).

Maps the configured fields to ``numbers`` / ``target`` rows, counts malformed rows and either
skips them or fails with the count and the first bad row's index, before any training starts.
Knows nothing of tokenizers or models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ibtpo_core.data.countdown import canonical_key


@dataclass(frozen=True)
class DatasetSource:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    path: str = "json"  # a datasets builder or hub id ("json" reads local files)
    data_files: Optional[dict[str, str]] = None  # split name -> file
    train_split: str = "train"
    test_split: str = "test"
    numbers_field: str = "numbers"
    target_field: str = "target"
    bad_rows: Literal["fail", "skip"] = "fail"
    revision: Optional[str] = None
    extra: dict = field(default_factory=dict)  # passed to load_dataset


def _row(raw: dict, src: DatasetSource) -> dict | None:
    nums, target = raw.get(src.numbers_field), raw.get(src.target_field)
    if not isinstance(nums, (list, tuple)) or not nums or isinstance(target, bool):
        return None
    try:
        numbers = [int(x) for x in nums]
        tgt = int(target)
    except (TypeError, ValueError):
        return None
    if any(float(x) != n for x, n in zip(nums, numbers)) or float(target) != tgt:
        return None
    return {"numbers": numbers, "target": tgt, "key": canonical_key(numbers, tgt)}


def check_files(src: DatasetSource) -> None:
    """Local data files must exist and not be empty (hub sources are checked when loaded)."""
    import os

    if src.path != "json":
        return
    for name, f in (src.data_files or {}).items():
        if not os.path.exists(f):
            raise FileNotFoundError(f"data file for split {name!r} does not exist: {f}")
        if os.path.getsize(f) == 0:
            raise ValueError(f"data file for split {name!r} is empty: {f}")


def load_split(src: DatasetSource, split: str) -> list[dict]:
    """Rows of one split, validated; raises ``ValueError`` naming the bad rows and the fix."""
    from datasets import load_dataset

    check_files(src)
    files = src.data_files or {}
    try:
        ds = load_dataset(src.path, data_files=files or None, split=split,
                          revision=src.revision, **src.extra)
    except Exception as err:  # noqa: BLE001 - a boundary: any loader failure is a data problem
        raise ValueError(f"cannot load split {split!r} from {src.path!r} "
                         f"({type(err).__name__}: {str(err)[:300]}); check path, data_files "
                         f"and the split names") from None
    if len(ds) == 0:
        raise ValueError(f"split {split!r} of {src.path!r} is empty")
    rows, bad = [], []
    for i, raw in enumerate(ds):
        r = _row(raw, src)
        (bad.append(i) if r is None else rows.append(r))
    if bad and src.bad_rows == "fail":
        raise ValueError(
            f"{len(bad)} of {len(ds)} rows of split {split!r} lack a list of integers in "
            f"{src.numbers_field!r} or an integer {src.target_field!r} (first bad row: {bad[0]}); "
            f"fix the data, map the fields with numbers_field / target_field, or set "
            f"bad_rows: skip")
    if not rows:
        raise ValueError(f"split {split!r} of {src.path!r} has no usable rows")
    return rows
