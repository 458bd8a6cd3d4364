"""Kill the run at every stage boundary and in the middle of every stage kind, rerun the same
command, and check that nothing is lost (marker ``faults``; run by ``make test-faults``).

For each kill point: the killed run dies by SIGKILL (a real ``ibtpo run`` subprocess killing
itself at that point); the rerun completes; every stage output complete before the rerun is
reused untouched (its manifest is not rewritten); the final weights equal those of an
uninterrupted run with the same seed; MLflow holds each iteration's metrics exactly once and no
run is left RUNNING; and no process of the killed run (its Prefect server, an update's ranks)
is left once the rerun has finished. Also: a kill inside DeepSpeed's first build of its
communication op, on a clean extensions folder, does not hang the rerun.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.processes import leftovers, processes

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml")
KILL_POINTS = [  # the middle of every stage kind, and every boundary between stages
    "prepare_data", "after_prepare_data", "after_create_model", "warm_up", "after_warm_up",
    "evaluate_policy", "after_evaluate_policy", "sample_trees:1", "after_sample_trees:0",
    "estimate_scores:1", "after_estimate_scores:1", "update_policy:0", "after_update_policy:1",
    "mlflow_log:1", "benchmark", "after_benchmark",
]


def run(state: Path, fault: str | None = None, tag: str | None = None, sets: tuple = (),
        env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``ibtpo run`` of the smoke config as a user starts it; ``tag`` marks its environment, so
    every process it starts (and they start) can be found afterwards by ``processes``."""
    env = {**os.environ, "PREFECT_HOME": str(state / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "IBTPO_TEST_TAG": tag or uuid.uuid4().hex, **(env_extra or {})}
    env.pop("IBTPO_FAULT", None)
    env.pop("PREFECT_API_URL", None)
    if fault:
        env.update(IBTPO_FAULT=fault, IBTPO_FAULT_MODE="kill")
    cmd = [sys.executable, "-m", "ibtpo", "run", SMOKE, "--set", "threads=1",
           "--set", f"output_dir={state / 'runs'}", "--set", f"stage_cache_dir={state / 'stages'}"]
    for item in sets:
        cmd += ["--set", item]
    # files, not pipes: a helper that outlived the run would hold a pipe open and block the read
    name = (fault or "clean").replace(":", "_")
    out_f, err_f = state / f"{name}.out", state / f"{name}.err"
    with out_f.open("w") as out, err_f.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=err)
        try:
            rc = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
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

    killed_tag = uuid.uuid4().hex
    killed = run(tmp_path, point, tag=killed_tag)
    assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
    done_before = manifests(tmp_path)
    rerun_tag = uuid.uuid4().hex
    out = result(run(tmp_path, tag=rerun_tag))
    # nothing of the killed run survives it (its Prefect server, say), nor of the finished rerun
    assert not leftovers(killed_tag), (point, leftovers(killed_tag, 0))
    assert not leftovers(rerun_tag, 5)
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


def test_a_kill_inside_the_first_build_of_the_comm_op_does_not_hang_the_rerun(tmp_path):
    """Two update ranks in a clean extensions folder build DeepSpeed's CPU communication op;
    everything of the run is SIGKILLed while torch's build lock exists; the rerun clears the
    lock its builder left, builds the op and finishes (it used to wait forever, silently)."""
    ext = tmp_path / "torch_extensions"
    sets = ("algo.update.num_processes=2",)
    tag = uuid.uuid4().hex
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "IBTPO_TEST_TAG": tag, "TORCH_EXTENSIONS_DIR": str(ext)}
    env.pop("PREFECT_API_URL", None)
    cmd = [
        sys.executable,
        "-m",
        "ibtpo",
        "run",
        SMOKE,
        "--set",
        "threads=1",
        "--set",
        f"output_dir={tmp_path / 'runs'}",
        "--set",
        f"stage_cache_dir={tmp_path / 'stages'}",
        "--set",
        sets[0],
    ]
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + 540
        while not list(ext.rglob("lock")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        locks = list(ext.rglob("lock"))
        assert locks, f"no build started: {(tmp_path / 'killed.log').read_text()[-2000:]}"
        for p in processes(tag):  # a machine-wide kill -9: nothing gets to clean up
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait()
    time.sleep(1)
    assert [p for p in locks if p.exists()], "the kill left no stale lock: the test proves nothing"
    out = run(tmp_path, sets=sets, env_extra={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "left by a process killed while compiling it" in out.stderr + out.stdout
    assert not [p for p in locks if p.exists()]


def kill_between_durable_checkpoints(tmp_path, sets) -> tuple[list[Path], list[Path]]:
    """An uninterrupted run and one SIGKILLed after iteration 0's update, then rerun: the rerun
    replays that one update, reuses everything written before the kill and ends on the
    uninterrupted run's weights. Returns both runs' update folders, oldest first."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    ref = result(run(tmp_path / "ref", sets=sets))
    killed = run(tmp_path / "killed", "after_update_policy:0", sets=sets)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = manifests(tmp_path / "killed")
    rerun = run(tmp_path / "killed", sets=sets)
    out = result(rerun)
    assert "replaying 1 update(s)" in rerun.stderr
    assert weights_digest(out["checkpoint"]) == weights_digest(ref["checkpoint"])
    after = manifests(tmp_path / "killed")
    assert all(after[p] == t for p, t in before.items())  # nothing done before was redone
    return tuple(sorted((tmp_path / name / "stages").rglob("it000*-policy-*"))
                 for name in ("ref", "killed"))


def test_a_kill_between_saved_optimizer_states_resumes_by_replay(tmp_path):
    """rl.save_optimizer_every: 2 writes iteration 0's checkpoint without its optimizer state
    (the resident trainer holds it). SIGKILL after that update: the rerun reuses the checkpoint,
    replays its update from the start to rebuild the state, and ends on the uninterrupted run's
    weights."""
    _, its = kill_between_durable_checkpoints(tmp_path, ("rl.iterations=3",
                                                         "rl.save_optimizer_every=2"))
    assert [(p / "optimizer.pt").exists() for p in its] == [False, True, False]


def test_a_kill_between_saved_weights_resumes_by_replay(tmp_path):
    """rl.save_every: 2 writes iteration 0's checkpoint without its weights (the resident
    trainer holds them and hands them to the rollout engine). SIGKILL after that update: the
    rerun reuses the checkpoint, replays its update from the start to rebuild the weights for
    iteration 1's sampling, and ends on the uninterrupted run's weights."""
    ref_its, its = kill_between_durable_checkpoints(
        tmp_path, ("rl.iterations=3", "rl.save_every=2", "eval.every=0"))
    assert [(p / "model.safetensors").exists() for p in ref_its] == [False, True, True]
    assert [(p / "model.safetensors").exists() for p in its] == [False, True, True]
