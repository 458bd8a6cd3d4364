"""Failures outside the pipeline's control: an unreachable tracking store, a full disk; and the
safe defaults (local-only UI, no remote code, no pickles, no secrets in params)."""
import errno
import os
import pickle
import time
from pathlib import Path

import pytest

from ibtpo_core.artifacts import atomic_dir


def test_unreachable_tracking_store_fails_at_start(monkeypatch):
    from pipeline.tracking import check_tracking_store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    with pytest.raises(
        RuntimeError,
        match=r"MLflow tracking store http://127.0.0.1:9 is not reachable.*MLFLOW_TRACKING_URI",
    ):
        check_tracking_store()
    assert time.time() - t0 < 30
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # restored


def test_disk_full_leaves_nothing_half_written(tmp_path, monkeypatch):
    final = tmp_path / "stage"
    real_replace = os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(
        OSError,
        match=r"cannot write .*stage \(No space left on device\); nothing was left half-written",
    ):
        with atomic_dir(final) as tmp:
            (tmp / "weights.safetensors").write_bytes(b"x" * 100)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_a_write_that_dies_leaves_no_output(tmp_path):
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.json").write_text("{")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_ui_listens_on_loopback_by_default():
    from ibtpo.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"


def test_remote_code_is_off_by_default():
    import inspect

    from configs.schema import ModelConfig
    from ibtpo_core.engines.hf import HFEngine

    assert ModelConfig().trust_remote_code is False
    assert inspect.signature(HFEngine).parameters["trust_remote_code"].default is False


def test_secrets_are_not_logged_as_params():
    from pipeline.tracking import flatten

    flat = flatten({"model": {"path": "m", "hf_token": "hf_abc"}, "api_key": "sk-1",
                    "tracking": {"password": "p", "experiment": "e"}})
    assert flat["model.hf_token"] == flat["api_key"] == flat["tracking.password"] == "***"
    assert flat["model.path"] == "m" and flat["tracking.experiment"] == "e"


def test_optimizer_state_is_loaded_without_pickle_code(tmp_path):
    """Checkpoints are safetensors; the optimizer state is read with weights_only=True, which
    refuses arbitrary pickled objects."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"state": {}, "param_groups": [], "x": Evil()}, tmp_path / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "optimizer.pt", weights_only=True)
    src = Path(__file__).resolve().parents[1] / "ibtpo_core" / "training" / "deepspeed_trainer.py"
    assert "weights_only=True" in src.read_text()


def test_orphaned_running_runs_of_dead_processes_are_reaped(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import child_run, parent_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    old = parent_run("e", "key-old", "old", {}, {})
    kid = child_run(old, "warm_up")
    client = MlflowClient()
    client.set_tag(old, "ibtpo.pid", dead)  # as if its process had been killed
    new = parent_run("e", "key-new", "new", {}, {})  # e.g. a rerun after a code change
    assert client.get_run(old).info.status == "KILLED"
    assert client.get_run(kid).info.status == "KILLED"
    assert client.get_run(new).info.status == "RUNNING"
    assert client.get_run(new).data.tags["ibtpo.host"] == socket.gethostname()
