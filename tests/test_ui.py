"""The UIs as a user meets them (marker ``ui``; ``make test-ui``, run by .ci/run): a smoke run
from a shell in a fresh folder, then ``ibtpo ui`` on non-default ports in that folder, read by
a real headless browser (Debian's ``chromium``, installed here if missing). The MLflow run page
draws metric charts; the Prefect flow-run page lists the run's task runs by stage and
iteration and shows its result artifact; SIGTERM or SIGKILL to ``ibtpo ui`` leaves no server.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from ibtpo_core.runtime import free_port
from tests.processes import TAG, leftovers

pytestmark = pytest.mark.ui
ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml")
IBTPO = str(Path(sys.executable).parent / "ibtpo")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed by this test's own set-up where the machine lacks it."""
    exe = shutil.which("chromium")
    if exe is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}"
        exe = shutil.which("chromium")
    assert exe, "chromium is not on PATH after installing it"
    return exe


def browse(chromium: str, url: str, workdir: Path) -> str:
    """The page's DOM after 20 s of virtual time. A screenshot is taken in the same call: only
    then does chromium paint, and MLflow draws its charts when painted."""
    out = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                          "--window-size=1600,1200", "--virtual-time-budget=20000",
                          f"--screenshot={workdir / 'page.png'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=240, cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def browse_until(chromium: str, url: str, workdir: Path, ready, tries: int = 8) -> str:
    """``browse`` again while ``ready(page)`` is false: on a fresh MLflow server the first one
    or two looks end while the charts still spin (their code is fetched the first time)."""
    for _ in range(tries):
        page = browse(chromium, url, workdir)
        if ready(page):
            break
    return page


def user_env(tag: str) -> dict[str, str]:
    """A shell's environment: none of the test harness's Prefect or MLflow settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_HOME", "PREFECT_API", "MLFLOW_TRACKING"))}
    env[TAG] = tag
    return env


def start_ui(workdir: Path, tag: str, mlflow_port: int, prefect_port: int) -> subprocess.Popen:
    log = (workdir / f"ui-{tag[:6]}.log").open("w")
    proc = subprocess.Popen([IBTPO, "ui", "--mlflow-port", str(mlflow_port), "--prefect-port",
                             str(prefect_port)], cwd=workdir, env=user_env(tag), stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    urls = [f"http://127.0.0.1:{mlflow_port}/health", f"http://127.0.0.1:{prefect_port}/api/health"]
    from pipeline.servers import answers

    while not all(answers(u) for u in urls):
        assert proc.poll() is None, (workdir / f"ui-{tag[:6]}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the UIs did not come up in 180 s"
        time.sleep(0.5)
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``ibtpo run`` of the smoke config from a shell in a fresh folder; its result and ids."""
    workdir = tmp_path_factory.mktemp("user")
    out = subprocess.run([IBTPO, "run", SMOKE, "--set", "threads=1"], cwd=workdir,
                         env=user_env(uuid.uuid4().hex), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (workdir / ".prefect").is_dir() and (workdir / "mlflow.db").is_file()
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    run = MlflowClient().get_run(result["mlflow_run_id"])
    return workdir, result, run.info.experiment_id, run.data.tags["prefect.flow_run_id"]


def test_both_uis_show_the_runs_of_ibtpo_run_and_stop_with_sigterm(chromium, smoke_run):
    workdir, result, experiment, flow_run = smoke_run
    tag = uuid.uuid4().hex
    mlflow_port, prefect_port = free_port(), free_port()
    ui = start_ui(workdir, tag, mlflow_port, prefect_port)
    try:
        # the Prefect page calls the API on the port it is served from, not on 4200
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/ui-settings") as r:
            assert json.load(r)["api_url"] == f"http://127.0.0.1:{prefect_port}/api"

        # the flow run's page: its task runs by stage and iteration (graph and log list)
        page = browse(
            chromium, f"http://127.0.0.1:{prefect_port}/runs/flow-run/{flow_run}", workdir
        )
        assert "Can't connect" not in page
        for name in ("prepare_data", "warm_up", "evaluate_policy[before]", "sample_trees[it 0]",
                     "update_policy[it 1]", "evaluate_policy[after]", "benchmark[final]"):
            assert name in page, f"{name} is not on the flow run's page"
        # its result artifact: the table and the link to the MLflow run
        request = urllib.request.Request(
            f"http://127.0.0.1:{prefect_port}/api/artifacts/filter", method="POST",
            data=json.dumps({"artifacts": {"key": {"any_": ["result-tiny-smoke"]}}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as r:
            artifact = json.load(r)[0]
        assert artifact["flow_run_id"] == flow_run
        page = browse(chromium, f"http://127.0.0.1:{prefect_port}/artifacts/artifact/"
                                f"{artifact['id']}", workdir)
        assert "Held-out test problems: 16" in page and "after RL" in page
        assert f"#/experiments/{experiment}/runs/{result['mlflow_run_id']}" in page

        page = browse_until(chromium, f"http://127.0.0.1:{mlflow_port}/#/experiments/{experiment}"
                                      f"/runs/{result['mlflow_run_id']}/model-metrics", workdir,
                            lambda p: "main-svg" in p)
        assert page.count("main-svg") >= 4, "the MLflow run page drew no metric charts"
        assert "tiny_smoke (adv/abs_mean)" in page  # the first chart's legend: our metric
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
    assert not leftovers(tag), "a server outlived ibtpo ui after SIGTERM"


def test_a_sigkilled_ibtpo_ui_leaves_no_server(chromium, smoke_run):
    workdir, *_ = smoke_run
    tag = uuid.uuid4().hex
    ui = start_ui(workdir, tag, free_port(), free_port())
    os.kill(ui.pid, signal.SIGKILL)
    ui.wait()
    assert not leftovers(tag), "a server outlived a SIGKILLed ibtpo ui"
