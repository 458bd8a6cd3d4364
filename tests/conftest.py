"""Shared fixtures. Every test runs with the network closed except loopback: any attempt to
reach a model or data hub fails the test that made it."""
from __future__ import annotations

import os
import shutil
import socket

import pytest

from ibtpo_core.runtime import set_offline_defaults

set_offline_defaults()

_real_connect = socket.socket.connect


class NetworkBlocked(RuntimeError):
    pass


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")
                                  or self.family == getattr(socket, "AF_UNIX", None)):
        return _real_connect(self, address)
    raise NetworkBlocked(f"test tried to reach {address!r}: code must not download anything")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny model + tokenizer saved with save_pretrained."""
    import torch

    from ibtpo_core.data.tokenizer import build_tokenizer
    from ibtpo_core.models.tiny import TinyModelSpec, create_tiny_model

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    d = tmp_path_factory.mktemp("tiny_model")
    create_tiny_model(build_tokenizer(), TinyModelSpec(hidden_size=64, intermediate_size=128,
                                                       num_layers=2, num_heads=4, num_kv_heads=2),
                      seed=0, out_dir=str(d))
    return str(d)


@pytest.fixture(scope="module")
def harness(request, tmp_path_factory):
    """A Prefect test harness and an MLflow store of its own, shared by one test module's flow
    runs; yields the module's state folder, deleted afterwards unless a test failed."""
    from prefect.testing.utilities import prefect_test_harness

    failed_before = request.session.testsfailed
    state = tmp_path_factory.mktemp("flows")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{state / 'mlflow.db'}"
    with prefect_test_harness(server_startup_timeout=120):
        yield state
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    if request.session.testsfailed == failed_before:
        shutil.rmtree(state, ignore_errors=True)
