"""One stage store shared by workers (issue 15, item 3): two processes started from different
working directories reach the same stage at once; one computes it, the other waits and reuses
it; a worker killed while it holds a stage does not block the next."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = r"""
import json, os, sys, time
from pathlib import Path
from pipeline import stage

folder = Path(sys.argv[1])

def write(tmp):  # half the output, a pause (the worker may be killed here), the rest
    (tmp / "half.txt").write_text(os.getcwd())
    time.sleep(float(sys.argv[2]))
    (tmp / "out.txt").write_text(os.getcwd())
    return {"worker/pid": float(os.getpid())}

def compute():
    (folder.parent / f"computed-by-{os.getpid()}").write_text(os.getcwd())
    return stage.publish(folder, write)

with stage.claim(folder) as hit:
    rec = hit or compute()
print(json.dumps(rec))
"""


def _start(cwd: Path, folder: Path, seconds: float) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(seconds)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_workers_from_different_folders_compute_a_shared_stage_once(tmp_path):
    folder = tmp_path / "shared" / "stages" / "warmup-abc"
    first = _start(tmp_path / "machine_a", folder, 3.0)
    time.sleep(1.0)  # the first holds the stage while the second arrives
    second = _start(tmp_path / "machine_b", folder, 3.0)
    out_a, err_a = first.communicate(timeout=60)
    out_b, err_b = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, (err_a, err_b)
    computed = list(folder.parent.glob("computed-by-*"))
    assert len(computed) == 1, computed  # one computed, the other reused
    rec_a, rec_b = json.loads(out_a), json.loads(out_b)
    assert rec_a == rec_b and rec_a["metrics"]["worker/pid"] == first.pid
    assert "warmup-abc: another worker is writing it; waiting" in err_b
    assert (folder / "out.txt").read_text() == str(tmp_path / "machine_a")
    leftovers = [p for p in folder.parent.iterdir() if p.is_dir() and p.name.startswith(".warmup")]
    assert not leftovers  # no temporary folder left behind


def test_a_worker_killed_while_computing_does_not_block_the_next(tmp_path):
    folder = tmp_path / "shared" / "eval-xyz"
    first = _start(tmp_path / "a", folder, 60.0)
    deadline = time.time() + 30
    while not list(folder.parent.glob(".eval-xyz.*/half.txt")) and time.time() < deadline:
        time.sleep(0.1)
    half_written = [p for p in folder.parent.glob(".eval-xyz.*") if p.is_dir()]
    assert len(half_written) == 1
    second = _start(tmp_path / "b", folder, 0.5)
    time.sleep(1.0)
    assert second.poll() is None  # waiting on the first
    os.kill(first.pid, signal.SIGKILL)  # mid-write: its half-written folder stays behind
    first.wait(timeout=10)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert json.loads(out)["metrics"]["worker/pid"] == second.pid  # it computed the stage itself
    assert (folder / "out.txt").read_text() == str(tmp_path / "b")
    assert not half_written[0].exists()  # the next writer cleared what the killed one left
    assert (folder.parent / ".eval-xyz.lock").is_file()  # the lock, which waiters may hold, stays


def test_runs_starting_together_on_a_new_sqlite_store_both_start(tmp_path):
    # the first client of a new MLflow sqlite store migrates its schema; without a lock, two at
    # once failed with "duplicate column name" (seen when two runs started together)
    db = tmp_path / "shared" / "mlflow.db"
    code = "from pipeline.tracking import check_tracking_store; check_tracking_store(); print('ok')"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    procs = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path / name, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in results]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A fresh MLflow sqlite store for this test, named by MLFLOW_TRACKING_URI as the pipeline
    names it; MLflow's process-wide URI (set by any earlier test that ran a flow, and pointing
    at that test's deleted store) is cleared for the test and put back after."""
    from mlflow.tracking._tracking_service import utils

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(utils, "_tracking_uri", None)
    return db


def _split(tmp_path: Path) -> Path:
    split = tmp_path / "test.jsonl"
    split.write_text('{"numbers": [1, 2, 3], "target": 6}\n')
    return split


def test_a_cell_that_loses_the_race_to_log_a_split_links_the_dataset_the_other_logged(
        tmp_path, monkeypatch, store):
    # two cells of a sweep log the same split at once; MLflow looks the dataset up, then inserts
    # it, so the slower cell hit the table's unique key and the whole cell failed (a Ray sweep,
    # about one run in five)
    import sqlite3

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    db = store
    client = MlflowClient()
    exp = tracking.experiment_id(client, "race")
    other, mine = (client.create_run(exp).info.run_id for _ in range(2))
    real, calls = MlflowClient.log_inputs, []

    def racing(self, run_id, datasets=None, models=None):
        calls.append(run_id)
        if len(calls) == 1:
            # the other cell logs the split between this one's look-up and its insert: this
            # insert then meets the row the other wrote (SQLite's own error, as MLflow wraps it)
            real(self, other, datasets=datasets)
            ds = datasets[0].dataset
            with sqlite3.connect(db) as con:
                try:
                    con.execute("INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, "
                                "dataset_source_type, dataset_source) VALUES (?, ?, ?, ?, ?, ?)",
                                ("0" * 32, int(exp), ds.name, ds.digest, "local", "{}"))
                except sqlite3.IntegrityError as err:
                    raise MlflowException(f"(sqlite3.IntegrityError) {err}") from err
        return real(self, run_id, datasets=datasets, models=models)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    tracking.log_dataset(mine, str(_split(tmp_path)), "test", "ab" * 32, "eval")
    assert calls == [mine, mine]  # lost the race once, linked on the second try
    for run in (other, mine):
        assert [d.dataset.name for d in client.get_run(run).inputs.dataset_inputs] == ["test"]
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM datasets").fetchone() == (1,)


def test_a_failure_to_log_a_split_that_is_no_race_is_raised_at_once(tmp_path, monkeypatch, store):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    client = MlflowClient()
    run = client.create_run(tracking.experiment_id(client, "race")).info.run_id
    calls = []

    def refusing(self, run_id, datasets=None, models=None):
        calls.append(run_id)
        raise MlflowException("The run must be in the 'active' state")

    monkeypatch.setattr(MlflowClient, "log_inputs", refusing)
    with pytest.raises(MlflowException, match="active"):
        tracking.log_dataset(run, str(_split(tmp_path)), "test", "ab" * 32, "eval")
    assert calls == [run]


def test_two_runs_that_create_the_experiment_at_once_both_get_its_id(monkeypatch, store):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    client = MlflowClient()
    real, looked = MlflowClient.get_experiment_by_name, []

    def late(self, name):
        looked.append(name)
        if len(looked) == 1:  # the other run creates it after this one looked and found nothing
            self.create_experiment(name)
            return None
        return real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", late)
    exp = tracking.experiment_id(client, "ibtpo")
    assert looked == ["ibtpo", "ibtpo"] and exp == real(client, "ibtpo").experiment_id
