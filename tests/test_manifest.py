"""A stage output's manifest is hashed once, when it is written: checking it on a cache hit
reads no file whose size and modification time are as recorded, and still catches every
changed, missing or extra file (issue 29, item 4)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ibtpo_core import artifacts
from pipeline.stage import cached, external_record, publish


@pytest.fixture()
def hashed(monkeypatch) -> list[str]:
    """The files ``file_digest`` reads, in order."""
    calls: list[str] = []
    real = artifacts.file_digest

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(artifacts, "file_digest", counting)
    return calls


def _output(tmp_path: Path) -> dict:
    def write(tmp: Path) -> dict:
        (tmp / "weights.bin").write_bytes(b"w" * 4096)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "trees.json").write_text("[1, 2, 3]")
        return {"loss": 0.5}

    return publish(tmp_path / "out", write)


def test_publishing_hashes_each_file_once_and_a_hit_reads_none(tmp_path, hashed):
    rec = _output(tmp_path)
    assert sorted(hashed) == ["trees.json", "weights.bin"]  # written: hashed once each
    hashed.clear()
    assert cached(tmp_path / "out") == rec and cached(tmp_path / "out") == rec
    assert hashed == []  # two hits, nothing read


def test_a_touched_file_is_hashed_again_and_still_a_hit(tmp_path, hashed):
    rec = _output(tmp_path)
    hashed.clear()
    path = tmp_path / "out" / "weights.bin"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # copied, say: same bytes
    assert cached(tmp_path / "out") == rec and hashed == ["weights.bin"]


def test_a_same_size_rewrite_is_caught(tmp_path):
    _output(tmp_path)
    (tmp_path / "out" / "sub" / "trees.json").write_text("[1, 2, 4]")  # same length, new bytes
    assert cached(tmp_path / "out") is None


def test_a_missing_or_an_extra_file_fails_without_reading_any(tmp_path, hashed):
    _output(tmp_path)
    hashed.clear()
    (tmp_path / "out" / "extra.txt").write_text("x")
    assert cached(tmp_path / "out") is None
    (tmp_path / "out" / "extra.txt").unlink()
    (tmp_path / "out" / "weights.bin").unlink()
    assert cached(tmp_path / "out") is None
    assert hashed == []


def test_a_manifest_without_stats_is_checked_by_hashing(tmp_path, hashed):
    rec = _output(tmp_path)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    del manifest["stat"]  # as written before stats were recorded
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    hashed.clear()
    assert cached(tmp_path / "out") == rec and sorted(hashed) == ["trees.json", "weights.bin"]


def test_a_given_checkpoint_is_hashed_once_per_change(tmp_path, hashed):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"m" * 100)
    store = str(tmp_path / "stages")
    first = external_record(str(ckpt), store=store)
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    hashed.clear()
    assert external_record(str(ckpt), store=store) == first and hashed == []
    (ckpt / "model.safetensors").write_bytes(b"n" * 100)
    changed = external_record(str(ckpt), store=store)
    assert hashed == ["model.safetensors"] and changed["digest"] != first["digest"]
    assert artifacts.folder_digest(artifacts.digest_files(ckpt)) == changed["digest"]  # whole
