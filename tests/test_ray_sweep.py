"""A sweep on a Ray cluster (issue 15, item 1), as a user runs it: a Ray head started from a
shell on 127.0.0.1 with 2 CPUs, then `ibtpo sweep` of a file with ``executor: ray`` from another
folder. Two cells run at once; a Ray worker killed (SIGKILL) in the middle of a cell is retried
by Ray and its cell completes without redoing the stages it had finished; the report holds
every cell. Marker ``ray`` (``make test-ray``)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.processes import leftovers, processes

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml")
BIN = Path(sys.executable).parent


def _token(path: Path) -> str:
    """A Ray auth token file, as `ray get-auth-token --generate` writes ~/.ray/auth_token."""
    path.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    return str(path)


def _env(tmp_path: Path, tag: str, **extra: str) -> dict[str, str]:
    """The environment of a test's Ray and sweep processes: tagged (so every process they start
    is found and killed), their own Prefect home and MLflow store, a Ray token of the test's own
    (so nothing reads or writes ~/.ray/auth_token), no Prefect server or Ray auth settings
    inherited from the caller."""
    env = {**os.environ, "IBTPO_TEST_TAG": tag, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_TOKEN_PATH": _token(tmp_path / "auth_token"),
           "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", **extra}
    for key in ("PREFECT_API_URL", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    return env


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with 2 CPUs, started as a user would; every process it (and its
    workers) started is killed afterwards, found by the test's tag. A token is at hand, as on
    any machine where a local ray.init() ran (it writes ~/.ray/auth_token): `ray start` then
    turns token authentication on, and the sweep must send the token."""
    from ibtpo_core.runtime import free_port

    tag = uuid.uuid4().hex
    port = free_port()
    # Ray's sockets live under its temp dir, whose path must stay short (a unix socket's limit)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # RAY_DEDUP_LOGS=0: the sweep's output shows each worker's lines (the test counts them)
    env = _env(tmp_path, tag, RAY_DEDUP_LOGS="0")
    t0 = time.monotonic()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                    "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
                    "--include-dashboard", "false", "--disable-usage-stats",
                    "--object-store-memory", str(200 * 2**20), "--temp-dir", ray_tmp],
                   env=env, check=True, capture_output=True, timeout=180)
    start_s = time.monotonic() - t0
    try:
        yield {"address": f"127.0.0.1:{port}", "env": env, "tag": tag, "start_s": start_s}
    finally:
        # Ray's agents do not inherit the tag: they are found as children of tagged processes
        family = {p for q in processes(tag) for p in [q, *_children(q)]}
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        left = leftovers(tag, wait_s=0)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        print(f"ray head start-up {start_s:.1f} s; killed {len(family) + len(left)} Ray "
              f"processes at the end")


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _sweep_file(tmp_path: Path, address: str | None, **extra) -> Path:
    body = {
        "name": "raysweep", "base": SMOKE, "executor": "ray", "ray_address": address,
        "concurrency": 2,
        "set": {"benchmark.enabled": False, "rl.iterations": 6, "tracking.sample_trees": 0,
                "rl.keep_optimizer_states": None,
                "threads": 0, "resources.num_cpus": 1,
                "stage_cache_dir": str(tmp_path / "stages"),
                "output_dir": str(tmp_path / "runs" / "${name}")},
        "variants": [{"name": "ibtpo", "set": {"algo.method": "ibtpo"}},
                     {"name": "grpo", "set": {"algo.method": "grpo"}}],
        "seeds": [0], "output_dir": str(tmp_path / "report"), "report": {"baseline": "grpo"},
        **extra}
    path = tmp_path / "raysweep.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _cell_workers(tag: str, cell: str = "") -> list[psutil.Process]:
    """Ray workers of this test's cluster running a sweep cell (or this cell) now: Ray titles a
    busy worker ``ray::<task name>``, and a cell's task is named ``cell:<cell name>``."""
    found = []
    for p in processes(tag):
        try:
            if " ".join(p.cmdline()).startswith(f"ray::cell:{cell}"):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _manifests(folder: Path) -> dict[str, int]:
    """Finished outputs: every manifest outside a stage's temporary folder (``.NAME.xxxx``, which
    a writer renames into place when done, or a retry deletes when its writer was killed)."""
    found = {}
    for p in folder.rglob("manifest.json"):
        if not any(part.startswith(".") for part in p.relative_to(folder).parts):
            with contextlib.suppress(FileNotFoundError):  # renamed while we looked
                found[str(p)] = p.stat().st_mtime_ns
    return found


def test_two_cells_run_at_once_and_a_killed_worker_is_retried(ray_head, tmp_path, monkeypatch):
    sweep_file = _sweep_file(tmp_path, ray_head["address"])
    user_dir = tmp_path / "user"  # the sweep runs from a folder of its own, not the repository
    user_dir.mkdir()
    out_f = (tmp_path / "sweep.out").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen([str(BIN / "ibtpo"), "sweep", str(sweep_file)], cwd=user_dir,
                            env=ray_head["env"], stdout=out_f, stderr=subprocess.STDOUT)
    try:
        # both cells in flight at once, each in a Ray worker of its own
        deadline, both = time.monotonic() + 300, []
        while time.monotonic() < deadline and len(both) < 2 and proc.poll() is None:
            both = _cell_workers(ray_head["tag"])
            time.sleep(0.5)
        both_running_s = time.monotonic() - t0
        assert len(both) == 2, (tmp_path / "sweep.out").read_text()[-3000:]
        # kill the ibtpo cell's worker once the cell has finished an RL iteration
        done_it0 = tmp_path / "report" / "ibtpo" / "s0"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if any(done_it0.glob("iterations/it0000-policy-*/manifest.json")):
                break
            time.sleep(0.2)
        before = _manifests(tmp_path)
        victims = _cell_workers(ray_head["tag"], "raysweep.ibtpo.s0")
        assert len(victims) == 1 and proc.poll() is None, "the ibtpo cell was not running"
        killed = victims[0].pid
        os.kill(killed, signal.SIGKILL)
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        out_f.close()
    out = (tmp_path / "sweep.out").read_text()
    assert rc == 0, out[-5000:]
    print(f"ray sweep: both cells running after {both_running_s:.1f} s, "
          f"all done after {time.monotonic() - t0:.1f} s")
    # the report holds both cells
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {m: report["methods"][m]["n_seeds"] for m in ("ibtpo", "grpo")} == {
        "ibtpo": 1, "grpo": 1}
    # the killed cell ran twice (Ray's retry), the other once; both finished in a live worker
    # (MLflow records the pid of the process that last ran a cell)
    starts = [out.count(f"subflow run 'raysweep.{m}.s0'") for m in ("ibtpo", "grpo")]
    assert starts == [2, 1], (starts, out[-3000:])
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", ray_head["env"]["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    exp = client.get_experiment_by_name("ibtpo")
    cells = client.search_runs([exp.experiment_id], "tags.`ibtpo.kind` = 'train'")
    assert len(cells) == 2 and all(c.info.status == "FINISHED" for c in cells)
    pids = {int(c.data.tags["ibtpo.pid"]) for c in cells}
    assert len(pids) == 2 and killed not in pids
    # nothing finished before the kill was computed again: the retry resumed after iteration 0
    after = _manifests(tmp_path)
    rewritten = [p for p, t in before.items() if after.get(p) != t]
    assert not rewritten and any("it0000-policy" in p for p in before), rewritten


def test_a_cell_asking_more_than_the_cluster_has_fails_before_any_work(ray_head, tmp_path):
    sweep_file = _sweep_file(tmp_path, ray_head["address"])
    body = yaml.safe_load(sweep_file.read_text())
    body["set"]["resources.num_gpus"] = 1
    sweep_file.write_text(yaml.safe_dump(body))
    res = subprocess.run([str(BIN / "ibtpo"), "sweep", str(sweep_file)], cwd=tmp_path,
                         env=ray_head["env"], capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "asks for 1 GPU(s) (resources.num_gpus) but the Ray cluster has 0" in res.stderr + \
        res.stdout
    assert not (tmp_path / "runs").exists()  # no cell started


def test_a_head_that_refuses_the_token_fails_naming_the_fix(ray_head, tmp_path):
    """A sweep holding another token than the head's fails, saying where the token goes."""
    sweep_file = _sweep_file(tmp_path, ray_head["address"])
    env = {**ray_head["env"], "RAY_AUTH_TOKEN_PATH": _token(tmp_path / "other_token")}
    res = subprocess.run([str(BIN / "ibtpo"), "sweep", str(sweep_file)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    out = res.stderr + res.stdout
    assert f"the Ray head at ray_address '{ray_head['address']}' answers but refused" in out, \
        out[-3000:]
    assert "`ray get-auth-token` on the head" in out
    assert not (tmp_path / "runs").exists()  # no cell started


def test_a_sweep_without_ray_address_starts_a_ray_of_its_own(tmp_path):
    """``ray_address: null`` is a local Ray for this sweep, even where RAY_ADDRESS (or a stale
    /tmp/ray/ray_current_cluster from an earlier `ray start`) names a cluster that is gone: Ray
    alone would wait on it and fail. Three cells, two at a time: each in a worker process of its
    own (the third does not inherit a finished cell's memory)."""
    from ibtpo_core.runtime import free_port

    sweep_file = _sweep_file(tmp_path, None, variants=[{"name": "grpo",
                                                         "set": {"algo.method": "grpo"}}],
                             seeds=[0, 1, 2])
    body = yaml.safe_load(sweep_file.read_text())
    body["set"]["rl.iterations"] = 2
    sweep_file.write_text(yaml.safe_dump(body))
    tag = uuid.uuid4().hex
    env = _env(tmp_path, tag, RAY_ADDRESS=f"127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.monotonic()
    try:
        res = subprocess.run([str(BIN / "ibtpo"), "sweep", str(sweep_file)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=900)
    finally:
        family = {p for q in processes(tag) for p in [q, *_children(q)]}
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["methods"]["grpo"]["n_seeds"] == 3
    # cells side by side on this machine: the stages they share ran first, in the sweep's process
    assert "the stages before RL that the cells share (1 set(s)" in res.stdout + res.stderr
    # Ray prefixes a worker's forwarded lines with its task and pid
    pids = dict(re.findall(r"\(cell:raysweep\.grpo\.(s\d) pid=(\d+)\)", res.stdout + res.stderr))
    assert len(pids) == 3 and len(set(pids.values())) == 3, pids
    print(f"sweep on a local Ray: {time.monotonic() - t0:.1f} s; "
          f"{len(family)} processes left at the end, killed")
