"""Kill the run at every stage boundary and in the middle of every stage kind, rerun the same
command, and check that nothing is lost (marker ``faults``; run by ``make test-faults``).

For each kill point: the killed run dies by SIGKILL (a real ``ibtpo run`` subprocess killing
itself at that point); the rerun completes; every stage output complete before the rerun is
reused untouched (its manifest is not rewritten); the final weights equal those of an
uninterrupted run with the same seed; MLflow holds each iteration's metrics exactly once and no
run is left RUNNING.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml")
KILL_POINTS = [  # the middle of every stage kind, and every boundary between stages
    "prepare_data", "after_prepare_data", "after_create_model", "warm_up", "after_warm_up",
    "evaluate_policy", "after_evaluate_policy", "sample_trees:1", "after_sample_trees:0",
    "estimate_scores:1", "after_estimate_scores:1", "update_policy:0", "after_update_policy:1",
    "mlflow_log:1", "benchmark", "after_benchmark",
]


def run(state: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(state / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    env.pop("IBTPO_FAULT", None)
    if fault:
        env.update(IBTPO_FAULT=fault, IBTPO_FAULT_MODE="kill")
    cmd = [sys.executable, "-m", "ibtpo_core.cli", "run", SMOKE, "--set", "threads=1",
           "--set", f"output_dir={state / 'runs'}", "--set", f"stage_cache_dir={state / 'stages'}"]
    # files, not pipes: a helper that outlives the run (Prefect's temporary server) would hold
    # a pipe open and block the read
    tag = (fault or "clean").replace(":", "_")
    out_f, err_f = state / f"{tag}.out", state / f"{tag}.err"
    with out_f.open("w") as out, err_f.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=600)
        finally:
            try:  # the run's helpers go with it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, rc, out_f.read_text(), err_f.read_text())


def result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def weights_digest(checkpoint: str) -> dict:
    m = json.loads((Path(checkpoint) / "manifest.json").read_text())
    return {k: v for k, v in m["files"].items() if k.endswith(".safetensors")}


def manifests(state: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in state.rglob("manifest.json")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    state = tmp_path_factory.mktemp("reference")
    out = result(run(state))
    return out, weights_digest(out["checkpoint"])


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_and_rerun_loses_nothing(reference, tmp_path, point):
    from mlflow.tracking import MlflowClient

    killed = run(tmp_path, point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    done_before = manifests(tmp_path)
    out = result(run(tmp_path))
    ref_out, ref_weights = reference
    assert weights_digest(out["checkpoint"]) == ref_weights
    assert out["accuracy_after"] == ref_out["accuracy_after"]
    after = manifests(tmp_path)
    for path, mtime in done_before.items():
        assert after[path] == mtime, f"{path} was recomputed after the kill at {point}"
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    steps = sorted(m.step for m in client.get_metric_history(out["mlflow_run_id"], "iteration"))
    assert steps == [0, 1]
    assert len(client.get_metric_history(out["mlflow_run_id"], "reward")) == 2
    exp = client.get_run(out["mlflow_run_id"]).info.experiment_id
    running = client.search_runs([exp], "attributes.status = 'RUNNING'")
    assert not running, [r.info.run_name for r in running]
