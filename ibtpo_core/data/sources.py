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

import json
from dataclasses import dataclass, field
from pathlib import Path
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


def _math_row(raw: dict, src: DatasetSource) -> tuple[dict | None, str]:
    problem, answer = _field(raw, src.problem_field), _field(raw, src.answer_field)
    if isinstance(problem, list):  # chat messages: the last user turn is the problem
        users = [
            m.get("content") for m in problem if isinstance(m, dict) and m.get("role") == "user"
        ]
        problem = users[-1] if users else None
    if not isinstance(problem, str) or not problem.strip():
        return None, f"field {src.problem_field!r} is {_shown(problem)}, not a problem text"
    if answer is None:
        return None, f"field {src.answer_field!r} is missing"
    gold = gold_answer(answer, src.answer_format)
    if not gold:
        return None, (f"field {src.answer_field!r} is {_shown(answer)}, not readable as "
                      f"answer_format {src.answer_format!r}")
    text = " ".join(problem.split())
    return {"prompt": src.prompt_template.replace("{problem}", problem.strip()), "answer": gold,
            "key": text, "verifier": "math"}, ""


def _shown(value) -> str:
    return "missing" if value is None else repr(value)[:60]


def _integer(value) -> int | None:
    """``value`` as an int if it is a whole number (3, 3.0, "3"), else None."""
    if isinstance(value, bool):
        return None
    try:
        n = int(value)
        return n if float(value) == n else None
    except (TypeError, ValueError, OverflowError):
        return None


def _row(raw: dict, src: DatasetSource) -> tuple[dict | None, str]:
    """The row in the pipeline's format, or None and what is wrong with it (naming the field)."""
    if not isinstance(raw, dict):
        return None, f"the row is {_shown(raw)}, not a JSON object"
    if src.format == "math":
        return _math_row(raw, src)
    nums, target = raw.get(src.numbers_field), raw.get(src.target_field)
    numbers = [_integer(x) for x in nums] if isinstance(nums, (list, tuple)) else []
    if not numbers or None in numbers:
        return None, f"field {src.numbers_field!r} is {_shown(nums)}, not a list of integers"
    tgt = _integer(target)
    if tgt is None:
        return None, f"field {src.target_field!r} is {_shown(target)}, not an integer"
    return {"numbers": numbers, "target": tgt, "key": canonical_key(numbers, tgt)}, ""


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


def _local_json(src: DatasetSource) -> bool:
    """Local JSON / JSONL files, read here line by line (so a bad row is named by file and
    line, and one row of the wrong type cannot fail the whole file, as in ``datasets``' Arrow
    reader)."""
    return src.path == "json" and bool(src.data_files) and not src.extra


def _read_json_rows(path: str) -> list[tuple[str, object]]:
    """(``file:line``, the parsed row or a ``_BadJson``) for each row of a JSON-lines file or of
    a file holding one JSON list."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        try:
            return [(f"{path} (item {i})", r) for i, r in enumerate(json.loads(text))]
        except ValueError:
            pass  # JSON lines whose first row is a list: read line by line
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except ValueError as err:
                out.append((f"{path}:{n}", _BadJson(f"the line is not valid JSON ({err})")))
    return out


@dataclass(frozen=True)
class _BadJson:
    why: str


def _raw_rows(src: DatasetSource, split: str) -> list[tuple[str, object]]:
    """(where, raw row) for every row of ``split``; raises ``ValueError`` naming the fix."""
    files = src.data_files or {}
    if _local_json(src):
        if split not in files:
            raise ValueError(f"no data file for split {split!r}: data_files names "
                             f"{', '.join(files) or 'none'}; add {split}: <file> to data_files "
                             f"(or set the split's name, train_split / test_split)")
        return _read_json_rows(files[split])
    from datasets import load_dataset

    try:
        ds = load_dataset(src.path, src.name, data_files=files or None, split=split,
                          revision=src.revision, **src.extra)
    except Exception as err:  # noqa: BLE001 - a boundary: any loader failure is a data problem
        what = (f"the data files {', '.join(f'{k}: {v}' for k, v in files.items())}" if files
                else f"split {split!r} of {src.path!r}")
        raise ValueError(f"cannot load {what} ({type(err).__name__}: {str(err)[:300]}); check "
                         f"path, data_files and the split names") from None
    return [(f"{src.path} split {split!r} row {i}", raw) for i, raw in enumerate(ds)]


def load_split(src: DatasetSource, split: str) -> list[dict]:
    """Rows of one split, validated; raises ``ValueError`` naming the bad rows and the fix."""
    return load_split_counted(src, split)[0]


def load_split_counted(src: DatasetSource, split: str) -> tuple[list[dict], int]:
    """Rows of one split, validated, and how many malformed rows ``bad_rows: skip`` left out;
    with ``bad_rows: fail`` a malformed row raises ``ValueError`` naming its file, line and
    field, and the fix."""
    check_files(src)
    raw_rows = _raw_rows(src, split)
    if not raw_rows:
        raise ValueError(f"split {split!r} of {src.path!r} is empty")
    rows, bad = [], []
    for i, (where, raw) in enumerate(raw_rows):
        r, why = (None, raw.why) if isinstance(raw, _BadJson) else _row(raw, src)
        (bad.append((i, where, why)) if r is None else rows.append(r))
    if bad and src.bad_rows == "fail":
        if src.format == "math":
            need = (f"a problem text in {src.problem_field!r} or an answer in "
                    f"{src.answer_field!r} readable as answer_format {src.answer_format!r}")
            fields = "problem_field / answer_field / answer_format"
        else:
            need = (f"a list of integers in {src.numbers_field!r} or an integer "
                    f"{src.target_field!r}")
            fields = "numbers_field / target_field"
        i, where, why = bad[0]
        raise ValueError(
            f"{len(bad)} of {len(raw_rows)} rows of split {split!r} lack {need} (first bad row: "
            f"{i}, at {where}: {why}); fix the data, map the fields with {fields}, or set "
            f"bad_rows: skip to leave such rows out")
    if not rows:
        raise ValueError(f"split {split!r} of {src.path!r} has no usable rows")
    return rows, len(bad)
