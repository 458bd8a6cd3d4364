"""Prompts from a ``datasets`` source (a local JSONL fixture), malformed rows reported."""
import json
from pathlib import Path

import pytest

from configs.schema import DataConfig
from ibtpo_core.data import splits
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
    metrics = splits.write_splits(tmp_path / "out", cfg)
    out = {
        s: splits.read_jsonl(tmp_path / "out" / f"{s}.jsonl")
        for s in ("train", "validation", "test")
    }
    assert out["test"] == [{"numbers": [1, 2, 3, 4], "target": 10, "key": "1 2 3 4->10"}]
    # both orders of the test problem are held out of training
    assert [r["target"] for r in out["train"]] == [26] and len(out["validation"]) == 1
    assert metrics["data/train_rows"] == 1.0


def test_malformed_rows_fail_with_a_count_or_are_skipped(tmp_path):
    f = write(tmp_path / "t.jsonl", [{"numbers": [1, 2], "target": 3},
                                     {"numbers": "12", "target": 3},
                                     {"numbers": [1, 2]},
                                     {"numbers": [1.5, 2], "target": 3}])
    src = DatasetSource(data_files={"train": f})
    with pytest.raises(
        ValueError,
        match=r"3 of 4 rows of split 'train' lack .* \(first bad row: 1, at .*t.jsonl:2: field "
              r"'numbers' is '12', not a list of integers\).*bad_rows: skip",
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
            splits.read_jsonl(path), iteration, 5, seed=4)
    with pytest.raises(ValueError, match="training split is empty"):
        draw_prompts(JsonlRows(write(tmp_path / "empty.jsonl", [])), 1, 5, seed=4)


def countdown_files(tmp_path, bad_line: int, bad_row: dict):
    """A local countdown train file of 60 rows whose line ``bad_line`` is ``bad_row``, and a test
    file of 5 good rows."""
    rows = [{"numbers": [1 + i % 7, 2 + i % 5, 3, 4], "target": 20 + i} for i in range(60)]
    rows[bad_line - 1] = bad_row
    train = write(tmp_path / "train.jsonl", rows)
    test = write(tmp_path / "test.jsonl",
                 [{"numbers": [9, 8, 7, i], "target": 100 + i} for i in range(5)])
    return {"train": train, "test": test}


def test_a_row_of_the_wrong_type_is_named_by_file_line_and_field(tmp_path):
    # Arrow's JSON reader infers an integer column for "target" and fails the whole file on a
    # string: the error used to name the test split, no file, no line, no field
    files = countdown_files(tmp_path, 38, {"numbers": [1, 2, 3, 4], "target": "twelve"})
    cfg = DataConfig(source="datasets", n_test=5, n_val=2,
                     datasets=DatasetSource(data_files=files))
    with pytest.raises(ValueError) as err:
        splits.write_splits(tmp_path / "out", cfg)
    msg = str(err.value)
    assert "split 'train'" in msg and f"{files['train']}:38" in msg
    assert "field 'target' is 'twelve', not an integer" in msg and "bad_rows: skip" in msg
    assert "(first bad row: 37," in msg  # the row index, 0-based, as before
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_rows_skip_leaves_out_rows_of_the_wrong_type_and_counts_them(tmp_path):
    files = countdown_files(tmp_path, 38, {"numbers": [1, 2, 3, 4], "target": "twelve"})
    with open(files["train"], "a") as f:
        f.write('{"numbers": [1, 2, 3, 4], "target": 13\n')  # not JSON: a line cut short
    cfg = DataConfig(source="datasets", n_test=5, n_val=2,
                     datasets=DatasetSource(data_files=files, bad_rows="skip"))
    metrics = splits.write_splits(tmp_path / "out", cfg)
    m = metrics
    # 61 lines in train: 59 good ones, 2 left out; 2 of the good ones go to validation
    assert m["data/skipped_rows/train"] == 2.0 and m["data/skipped_rows/test"] == 0.0
    assert m["data/train_rows"] == 57.0 and m["data/validation_rows"] == 2.0
    assert m["data/test_rows"] == 5.0


def test_a_line_that_is_not_json_is_named(tmp_path):
    files = countdown_files(tmp_path, 3, {"numbers": [1, 2, 3, 4], "target": 5})
    lines = Path(files["train"]).read_text().splitlines()
    lines[4] = '{"numbers": [1, 2, 3'
    Path(files["train"]).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:5: the line is not valid JSON"):
        load_split(DatasetSource(data_files=files), "train")


def test_a_split_without_a_data_file_names_the_fix(tmp_path):
    files = countdown_files(tmp_path, 1, {"numbers": [1, 2, 3, 4], "target": 5})
    with pytest.raises(ValueError, match=r"no data file for split 'validation': data_files "
                                         r"names train, test; add validation: <file>"):
        load_split(DatasetSource(data_files=files), "validation")


def test_a_json_list_file_reads_like_json_lines(tmp_path):
    rows = [{"numbers": [1, 2], "target": 3}, {"numbers": [2, 2], "target": "x"}]
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps(rows))
    src = DatasetSource(data_files={"train": str(listed)}, bad_rows="skip")
    assert load_split(src, "train") == [{"numbers": [1, 2], "target": 3, "key": "1 2->3"}]
    with pytest.raises(ValueError, match=r"rows.json \(item 1\): field 'target' is 'x'"):
        load_split(DatasetSource(data_files={"train": str(listed)}), "train")
