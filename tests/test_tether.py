"""Helper processes end with their owner: a SIGKILLed owner, a stopped one, a command that exits
(ibtpo_core.tether, used for the temporary Prefect server, the UI servers and update ranks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ibtpo_core import tether

# a command that starts a grandchild ignoring SIGTERM, writes both pids, then waits
FAMILY = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    grand = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    open(sys.argv[1], "w").write(f"{os.getpid()} {grand.pid}")
    time.sleep(600)
""")


def _wait_for(path: Path, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return [int(x) for x in path.read_text().split()]
        time.sleep(0.05)
    raise AssertionError(f"{path} was never written")


def _gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_a_sigkilled_owner_takes_its_helpers_and_theirs_along(tmp_path):
    pids_file = tmp_path / "pids"
    owner_code = textwrap.dedent(f"""
        import sys, time
        from ibtpo_core import tether
        tether.spawn([sys.executable, "-c", {FAMILY!r}, {str(pids_file)!r}])
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", owner_code], cwd=Path(__file__).parents[1])
    try:
        pids = _wait_for(pids_file)
        assert all(psutil.pid_exists(p) for p in pids)
        os.kill(owner.pid, signal.SIGKILL)  # no handler of the owner runs
        owner.wait()
        # the watcher notices within 0.2 s, SIGTERMs the group, SIGKILLs the stubborn grandchild
        assert _gone(pids, tether.GRACE_S + 10), "a helper outlived its SIGKILLed owner"
    finally:
        for p in _wait_for(pids_file, 1):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stop_ends_the_whole_group(tmp_path):
    pids_file = tmp_path / "pids"
    proc = tether.spawn([sys.executable, "-c", FAMILY, str(pids_file)])
    pids = _wait_for(pids_file)
    t0 = time.monotonic()
    tether.stop(proc, grace_s=1.0)
    assert _gone(pids, 5), "stop left a process of the group running"
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("code", [0, 3])
def test_the_commands_exit_code_and_output_come_back(code):
    proc = tether.spawn([sys.executable, "-c", f"print('hi'); raise SystemExit({code})"],
                        stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out.strip()) == (code, "hi")


def test_a_missing_program_is_named():
    proc = tether.spawn(["/nonexistent/program"], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 127 and "cannot start /nonexistent/program" in err


def test_prefect_state_defaults_to_this_folder_unless_the_user_chose(tmp_path, monkeypatch):
    """ibtpo's commands keep Prefect's state in ./.prefect, beside ./mlflow.db, so ibtpo ui sees
    what ibtpo run made; a user's own home or server (environment or active profile) wins."""
    from pipeline.servers import use_local_prefect_home

    for k in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    profiles = tmp_path / "profiles.toml"
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    assert use_local_prefect_home(tmp_path) == str(tmp_path / ".prefect")

    monkeypatch.delenv("PREFECT_HOME")
    profiles.write_text('active = "lab"\n[profiles.lab]\nPREFECT_API_URL = "http://prefect.lab:4200/api"\n')
    assert use_local_prefect_home(tmp_path) == "~/.prefect" and "PREFECT_HOME" not in os.environ
    profiles.write_text('active = "local"\n[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n')
    assert use_local_prefect_home(tmp_path) == str(tmp_path / ".prefect")

    monkeypatch.setenv("PREFECT_HOME", "/elsewhere")
    assert use_local_prefect_home(tmp_path) == "/elsewhere"
