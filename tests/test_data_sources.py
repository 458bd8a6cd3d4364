"""Prompts from a ``datasets`` source (a local JSONL fixture), malformed rows reported."""
import json

import pytest

from configs.schema import DataConfig
from ibtpo_core import stages
from ibtpo_core.data.sources import DatasetSource, load_split


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_jsonl_through_datasets_with_mapped_fields(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"nums": [1, 2, 3, 4], "answer": 10},
                                             {"nums": [2, 3, 4, 5], "answer": 26},
                                             {"nums": [4, 3, 2, 1], "answer": 10},  # a test problem
                                             {"nums": [1, 1, 2, 6], "answer": 12}])
    test = write(tmp_path / "test.jsonl", [{"nums": [1, 2, 3, 4], "answer": 10}])
    cfg = DataConfig(source="datasets", n_test=5, n_val=1, datasets=DatasetSource(
        data_files={"train": train, "test": test}, numbers_field="nums", target_field="answer"))
    rec = stages.prepare_data(cfg, tmp_path / "out")
    out = {
        s: stages.read_jsonl(tmp_path / "out" / f"{s}.jsonl")
        for s in ("train", "validation", "test")
    }
    assert out["test"] == [{"numbers": [1, 2, 3, 4], "target": 10, "key": "1 2 3 4->10"}]
    # both orders of the test problem are held out of training
    assert [r["target"] for r in out["train"]] == [26] and len(out["validation"]) == 1
    assert rec["metrics"]["data/train_rows"] == 1.0


def test_malformed_rows_fail_with_a_count_or_are_skipped(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"numbers": [1, 2], "target": 3},
                                     {"numbers": "12", "target": 3},
                                     {"numbers": [1, 2]},
                                     {"numbers": [1.5, 2], "target": 3}])
    src = DatasetSource(data_files={"train": f})
    with pytest.raises(
        ValueError,
        match=r"3 of 4 rows of split 'train' lack .* \(first bad row: 1\).*bad_rows: skip",
    ):
        load_split(src, "train")
    rows = load_split(DatasetSource(data_files={"train": f}, bad_rows="skip"), "train")
    assert rows == [{"numbers": [1, 2], "target": 3, "key": "1 2->3"}]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(DatasetSource(data_files={"train": str(tmp_path / "nope.jsonl")}), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises((ValueError,), match="empty|cannot load"):
        load_split(DatasetSource(data_files={"train": str(empty)}), "train")


def test_datasets_source_needs_its_section():
    with pytest.raises(ValueError, match="source: datasets needs a datasets section"):
        DataConfig(source="datasets")


def test_rows_parsed_on_read_give_the_same_prompts_as_rows_parsed_up_front(tmp_path):
    from ibtpo_core.rl import JsonlRows, draw_prompts

    rows = [{"numbers": [i, i + 1, 2, 3], "target": 10 + i, "key": f"k{i}"} for i in range(7)]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    lazy = JsonlRows(path)
    assert len(lazy) == 7 and lazy[3] == rows[3] and lazy[5:] == rows[5:]  # the blank line skipped
    for iteration in (1, 2, 3):
        assert draw_prompts(lazy, iteration, 5, seed=4) == draw_prompts(
            stages.read_jsonl(path), iteration, 5, seed=4)
    with pytest.raises(ValueError, match="training split is empty"):
        draw_prompts(JsonlRows(write(tmp_path / "empty.jsonl", [])), 1, 5, seed=4)
