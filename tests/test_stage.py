"""``@stage`` (pipeline/stage.py) on a toy stage: what keys it, when its body runs, what a
killed or altered output leaves, and where its fault hooks fire."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.stage import Output, cached, stage


@dataclass(frozen=True)
class Knob:
    width: int = 2


class Keyed:
    """A section whose ``stage_key()`` leaves out a setting that changes no result."""

    def __init__(self, lr: float, port: int):
        self.lr, self.port = lr, port

    def stage_key(self) -> dict:
        return {"lr": self.lr}


RUNS: list[tuple] = []


@stage("toy{iteration:02d}", code="prepare_data")
def toy(out: Path, iteration: int, knob: Knob, section: Keyed, parent: dict) -> Output:
    RUNS.append((iteration, knob.width, section.lr))
    (out / "x.txt").write_text(f"{iteration} {knob.width} {section.lr}")
    return Output({"width": float(knob.width)}, {"parent": parent["digest"]})


PARENT = {"path": "/somewhere/a", "digest": "d1", "metrics": {}}


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    RUNS.clear()
    monkeypatch.delenv("IBTPO_FAULT", raising=False)


def test_same_inputs_run_once_and_return_the_same_record(tmp_path):
    a = toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    b = toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    assert a == b and RUNS == [(0, 2, 0.1)]
    assert Path(a["path"]).name.startswith("toy00-") and a["metrics"] == {"width": 2.0}
    assert (Path(a["path"]) / "x.txt").read_text() == "0 2 0.1"


def test_every_input_but_what_no_result_depends_on_keys_the_folder(tmp_path):
    base = toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))["path"]
    moved = {**PARENT, "path": "/elsewhere/a"}  # a record is keyed by its digest, not its path
    assert toy(0, Knob(), Keyed(0.1, 2), moved, store=str(tmp_path))["path"] == base
    others = {toy(1, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))["path"],
              toy(0, Knob(3), Keyed(0.1, 1), PARENT, store=str(tmp_path))["path"],
              toy(0, Knob(), Keyed(0.2, 1), PARENT, store=str(tmp_path))["path"],
              toy(0, Knob(), Keyed(0.1, 1), {**PARENT, "digest": "d2"}, store=str(tmp_path))[
                  "path"]}
    assert len(others) == 4 and base not in others
    assert len(RUNS) == 5


def test_an_altered_output_is_computed_again(tmp_path, capsys):
    rec = toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    (Path(rec["path"]) / "x.txt").write_text("tampered")
    again = toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    assert again == rec and len(RUNS) == 2
    assert "incomplete or was altered" in capsys.readouterr().err


def test_a_fault_mid_stage_leaves_no_output_and_the_rerun_computes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("IBTPO_FAULT", "toy:0")
    with pytest.raises(RuntimeError, match="injected fault in toy"):
        toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    assert RUNS == [(0, 2, 0.1)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("toy")]  # nothing in place
    toy(1, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))  # another iteration: no fault
    monkeypatch.delenv("IBTPO_FAULT")
    rec = toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    assert len(RUNS) == 3 and cached(Path(rec["path"])) == rec


def test_a_fault_after_the_stage_finds_its_output_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("IBTPO_FAULT", "after_toy")
    with pytest.raises(RuntimeError, match="injected fault in after_toy"):
        toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    monkeypatch.delenv("IBTPO_FAULT")
    toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    assert len(RUNS) == 1  # the rerun reused it


def test_the_manifest_keeps_the_bodys_lineage_fields(tmp_path):
    import json

    rec = toy(0, Knob(), Keyed(0.1, 1), PARENT, store=str(tmp_path))
    manifest = json.loads((Path(rec["path"]) / "manifest.json").read_text())
    assert manifest["parent"] == "d1" and manifest["metrics"] == {"width": 2.0}


def test_the_public_signature_has_the_inputs_and_store():
    import inspect

    assert list(inspect.signature(toy).parameters) == ["iteration", "knob", "section", "parent",
                                                       "store"]
    with pytest.raises(TypeError):
        toy(0, Knob(), Keyed(0.1, 1), PARENT)  # no store
