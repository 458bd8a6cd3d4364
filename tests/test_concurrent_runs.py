"""Two ``ibtpo run`` of one config started together in one working directory (one MLflow store,
one stage cache): both finish, one MLflow run holds each iteration once, no stage is computed
twice (marker ``faults``; run by ``make test-faults``).

Before every tracking write was made atomic across processes, the slower run died about one
time in two (``UNIQUE constraint failed: tags.key, tags.run_uuid``), so the pair is started
``PAIRS`` times: on that code, all of them pass with probability about 1/16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml")
PAIRS = 4


def start(cwd: Path, experiment: str, name: str) -> subprocess.Popen:
    """``ibtpo run configs/experiments/tiny_smoke.yaml`` from ``cwd``, as a user types it (its
    store, runs and stage cache are the defaults, in that folder)."""
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("PREFECT_API_URL", None)
    env.pop("IBTPO_FAULT", None)
    cmd = [sys.executable, "-m", "ibtpo", "run", SMOKE, "--set", "threads=1",
           "--set", f"tracking.experiment={experiment}"]
    out, err = (cwd / f"{name}.out").open("w"), (cwd / f"{name}.err").open("w")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)


def finish(proc: subprocess.Popen, cwd: Path, name: str) -> dict:
    rc = proc.wait(timeout=600)
    err = (cwd / f"{name}.err").read_text()
    assert rc == 0, f"{name} failed:\n{err[-3000:]}"
    return json.loads((cwd / f"{name}.out").read_text().strip().splitlines()[-1])


def test_two_runs_of_one_config_at_once_both_finish_and_log_once(tmp_path):
    from mlflow.tracking import MlflowClient

    for i in range(PAIRS):
        # a new folder each time: the second run waits on the first's stages and then runs in
        # step with it, which is when both write the same MLflow rows (a warm cache hides it)
        cwd = tmp_path / f"pair{i}"
        cwd.mkdir()
        a = start(cwd, "ibtpo", "a")
        time.sleep(3)  # as the issue found it: the second started 3 s after the first
        b = start(cwd, "ibtpo", "b")
        ra, rb = finish(a, cwd, "a"), finish(b, cwd, "b")
        assert ra["mlflow_run_id"] == rb["mlflow_run_id"]  # one config, one MLflow run
        assert ra["accuracy_after"] == rb["accuracy_after"]

        client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
        exp = client.get_experiment_by_name("ibtpo")
        runs = client.search_runs([exp.experiment_id], "tags.`ibtpo.kind` = 'train'")
        assert len(runs) == 1, [r.info.run_id for r in runs]
        run = runs[0]
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "iteration"))
        assert steps == [0, 1]  # each iteration logged once, not once per process
        children = client.search_runs([exp.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        names = [c.data.tags["ibtpo.stage"] for c in children]
        assert len(names) == len(set(names)), names  # one child run per stage kind
        assert all(c.info.status != "RUNNING" for c in children)
        assert run.data.tags["ibtpo.data_digest"]  # the tag the race used to fail on
        # each stage computed once: one folder per stage, none half-written left behind
        stages = cwd / "runs" / "_stages"
        assert not [p for p in stages.rglob(".*") if p.is_dir()]
