"""Load problems from any ``datasets`` source (a hub id or local files).

Two row formats: ``countdown`` maps the configured fields to ``numbers`` / ``target`` rows;
``math`` (MATH, MATH-500, GSM8K, DAPO-Math-17k and the like) maps a problem field and an answer
field (dotted paths reach nested fields, e.g. ``reward_model.ground_truth``; a list of chat
messages counts as its last user message) to ``prompt`` / ``answer`` rows scored by the ``math``
verifier, the gold answer read out of the field by ``answer_format``. Malformed rows are counted
and either skipped or reported with the count and the first bad row's index, before any training
starts. Knows nothing of tokenizers or models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ibtpo_core.data.answers import gold_answer
from ibtpo_core.data.countdown import canonical_key

MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class DatasetSource:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    path: str = "json"  # a datasets builder or hub id ("json" reads local files)
    data_files: Optional[dict[str, str]] = None  # split name -> file
    name: Optional[str] = None  # the dataset's configuration (GSM8K: "main")
    train_split: str = "train"
    test_split: str = "test"
    format: Literal["countdown", "math"] = "countdown"
    numbers_field: str = "numbers"  # countdown rows
    target_field: str = "target"
    problem_field: str = "problem"  # math rows
    answer_field: str = "answer"
    answer_format: Literal["plain", "gsm8k", "boxed"] = "plain"
    prompt_template: str = MATH_TEMPLATE  # {problem} is replaced by the problem text
    bad_rows: Literal["fail", "skip"] = "fail"
    revision: Optional[str] = None
    extra: dict = field(default_factory=dict)  # passed to load_dataset


def _field(raw: dict, dotted: str):
    value = raw
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _math_row(raw: dict, src: DatasetSource) -> dict | None:
    problem, answer = _field(raw, src.problem_field), _field(raw, src.answer_field)
    if isinstance(problem, list):  # chat messages: the last user turn is the problem
        users = [
            m.get("content") for m in problem if isinstance(m, dict) and m.get("role") == "user"
        ]
        problem = users[-1] if users else None
    if not isinstance(problem, str) or not problem.strip() or answer is None:
        return None
    gold = gold_answer(answer, src.answer_format)
    if not gold:
        return None
    text = " ".join(problem.split())
    return {"prompt": src.prompt_template.replace("{problem}", problem.strip()), "answer": gold,
            "key": text, "verifier": "math"}


def _row(raw: dict, src: DatasetSource) -> dict | None:
    if src.format == "math":
        return _math_row(raw, src)
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
        ds = load_dataset(src.path, src.name, data_files=files or None, split=split,
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
        if src.format == "math":
            need = (f"a problem text in {src.problem_field!r} or an answer in "
                    f"{src.answer_field!r} readable as answer_format {src.answer_format!r}")
            fields = "problem_field / answer_field / answer_format"
        else:
            need = (f"a list of integers in {src.numbers_field!r} or an integer "
                    f"{src.target_field!r}")
            fields = "numbers_field / target_field"
        raise ValueError(
            f"{len(bad)} of {len(ds)} rows of split {split!r} lack {need} (first bad row: "
            f"{bad[0]}); fix the data, map the fields with {fields}, or set bad_rows: skip")
    if not rows:
        raise ValueError(f"split {split!r} of {src.path!r} has no usable rows")
    return rows
