"""prefect.yaml as a user runs it: a temporary Prefect server on 127.0.0.1, a process work pool,
`prefect deploy --all`, a worker; the smoke deployment runs to Completed, then the sweep
deployment runs its cells as runs of the smoke deployment on the pool, two at a time."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ibtpo_core.runtime import free_port
from pipeline.servers import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def test_prefect_yaml_declares_the_deployments():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"ibtpo-train", "ibtpo-smoke", "ibtpo-sweep", "ibtpo-evaluate"}
    for d in deps.values():
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file() and f"def {func}(" in (ROOT / path).read_text()
        assert d["work_pool"]["name"] == "ibtpo-process"
    for key, val in deps["ibtpo-sweep"]["parameters"].items():
        assert (ROOT / val).is_file(), key
    assert "# schedules:" in (ROOT / "prefect.yaml").read_text()  # the commented example


def test_deploy_and_run_the_smoke_and_sweep_deployments(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    # without the torch.distributed variables an earlier in-process DeepSpeed test left in this
    # process's environment: its rendezvous port is still held here
    dist = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {
        **{k: v for k, v in os.environ.items() if k not in dist},
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PWD": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    logs = tmp_path / "server.log"
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env={**env, "PREFECT_API_URL": ""}, cwd=ROOT,
                              stdout=logs.open("w"), stderr=subprocess.STDOUT)
    worker, worker_log = None, tmp_path / "worker.log"
    try:
        wait_healthy(f"{api}/health", server, 120, "prefect server")

        def prefect(*args: str, timeout: float = 180, tries: int = 1) -> str:
            for _ in range(tries):
                r = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True,
                                   text=True, timeout=timeout)
                if r.returncode == 0:
                    return r.stdout
                time.sleep(3)  # a server still starting up on a loaded machine
            raise AssertionError(
                f"prefect {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}\n"
                f"worker log:\n{worker_log.read_text()[-6000:] if worker_log.exists() else ''}"
            )

        prefect("work-pool", "create", "ibtpo-process", "--type", "process", "--overwrite",
                tries=3)
        out = prefect("--no-prompt", "deploy", "--all")
        assert "ibtpo-smoke" in out and "ibtpo-sweep" in out
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "ibtpo-process"],
                                  env=env, cwd=ROOT,
                                  stdout=worker_log.open("w"), stderr=subprocess.STDOUT)
        small = [f"stage_cache_dir={tmp_path / 'stages'}", "threads=1",
                 "benchmark.enabled=false", "rl.iterations=1"]
        params = {"overrides": [f"output_dir={tmp_path / 'run'}", *small]}
        out = prefect("deployment", "run", "train/ibtpo-smoke", "--params", json.dumps(params),
                      "--watch", timeout=480)
        assert "Completed" in out, out
        result = json.loads((tmp_path / "run" / "result.json").read_text())
        assert result["n_eval"] == 16 and result["decoded_tokens"] > 0
        # `prefect flow-run retry` hands the run to the worker again; every stage is cached
        name = re.search(r"Created flow run '([^']+)'", out).group(1)
        (tmp_path / "run" / "result.json").unlink()
        prefect("flow-run", "retry", name)
        t0 = time.time()
        while not (tmp_path / "run" / "result.json").is_file() and time.time() - t0 < 240:
            time.sleep(2)
        again = json.loads((tmp_path / "run" / "result.json").read_text())
        assert again["accuracy_after"] == result["accuracy_after"]

        sweep_file = tmp_path / "pool_sweep.yaml"
        sweep_file.write_text(yaml.safe_dump({
            "name": "pool", "base": "configs/experiments/tiny_smoke.yaml",
            "set": dict(o.split("=", 1) for o in small),
            "variants": [{"name": "ibtpo"}, {"name": "grpo", "set": {"algo.method": "grpo"}}],
            "seeds": [0], "executor": "deployment", "deployment": "train/ibtpo-smoke",
            "concurrency": 2, "output_dir": str(tmp_path / "sweep"),
            "report": {"baseline": "grpo"}}))
        out = prefect("deployment", "run", "sweep/ibtpo-sweep", "--params",
                      json.dumps({"sweep_file": str(sweep_file)}), "--watch", timeout=480)
        assert "Completed" in out, out
        report = json.loads((tmp_path / "sweep" / "report.json").read_text())
        assert set(report["methods"]) == {"ibtpo", "grpo"}
    finally:
        for p in (worker, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
