"""The servers around a run: where Prefect keeps its state, the temporary Prefect API a command
line run talks to, and the MLflow and Prefect UI servers of ``ibtpo ui``.

Every server is started through ``tether`` so it ends with the command that started it, a
SIGKILLed one included. Prefect's own temporary server (what a flow starts when no API is
configured) is not tethered and outlives a killed run, so command line runs start this one
instead. Knows nothing of flows, tasks or the training code.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ibtpo_core import tether
from ibtpo_core.runtime import free_port

STARTUP_TIMEOUT_S = 120.0
MLFLOW_UI_PORT, PREFECT_UI_PORT = (
    5000,
    4200,
)  # `ibtpo ui`'s defaults  # a loaded 2-core machine needs far more than Prefect's default 20 s


def profile_api_url() -> str | None:
    """PREFECT_API_URL as the active profile of Prefect's default home sets it (``prefect config
    set PREFECT_API_URL=...``), if it does."""
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", Path.home() / ".prefect" / "profiles.toml"))
    try:
        import tomllib

        data = tomllib.loads(path.read_text())
    except (ImportError, OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    return data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def configured_api_url() -> str | None:
    """The Prefect server the user named: PREFECT_API_URL, else the active profile's."""
    return os.environ.get("PREFECT_API_URL") or profile_api_url()


def use_local_prefect_home(folder: Path | None = None) -> str:
    """Keep Prefect's state in ``./.prefect`` (as MLflow's store is ``./mlflow.db``) unless the
    user chose a home (PREFECT_HOME) or a server (PREFECT_API_URL, in the environment or the
    active profile): ``ibtpo run``, ``ibtpo ui`` and ``make`` then all see the same flow runs.
    Returns the home in use."""
    chosen = "PREFECT_HOME" in os.environ or "PREFECT_API_URL" in os.environ
    if not chosen and not profile_api_url():
        os.environ["PREFECT_HOME"] = str((folder or Path.cwd()) / ".prefect")
    return os.environ.get("PREFECT_HOME", "~/.prefect")


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 right now."""
    if not url.startswith(("http://", "https://")):
        return False
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, proc, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail naming ``what`` if ``proc`` exits or time runs
    out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        if answers(url):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s; raise "
                       f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a loaded machine")


def _startup_timeout() -> float:
    raw = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    return max(float(raw), STARTUP_TIMEOUT_S) if raw else STARTUP_TIMEOUT_S


def prefect_api_command(port: int) -> list[str]:
    """The API server Prefect itself starts for a run without a server (no UI, no schedulers),
    over the database in PREFECT_HOME."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "error", "--lifespan", "on"]


@contextlib.contextmanager
def prefect_api():
    """A Prefect API for the flows this process runs: the user's (PREFECT_API_URL) if set, else
    a temporary server tethered to this process, stopped when the process exits."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    proc = None
    for attempt in range(3):  # a port taken between choosing and binding: choose again
        port = free_port()
        proc = tether.spawn(prefect_api_command(port), env=env)
        try:
            wait_healthy(f"http://127.0.0.1:{port}/api/health", proc, _startup_timeout(),
                         "the temporary Prefect server")
            break
        except RuntimeError:
            tether.stop(proc)
            if attempt == 2:
                raise
    # stopped at exit, not when the block ends: Prefect's log and event workers flush to this
    # server from their own exit handlers, which run before this one (registered earlier), and
    # they wait on a server that is gone. A killed process is covered by the tether.
    atexit.register(tether.stop, proc)
    url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = url  # for anything this process starts
    # Prefect's "View at" links: this server has no UI and ends with the run; `ibtpo ui` serves
    # the same flow runs at its default address
    ui = os.environ.get("PREFECT_UI_URL") or f"http://127.0.0.1:{PREFECT_UI_PORT}"
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: ui}):
        yield url


def browser_host(host: str) -> str:
    """The address a browser on this machine uses for a server listening on ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def mlflow_ui_command(uri: str, host: str, port: int) -> list[str]:
    bindir = Path(sys.executable).parent
    exe = str(bindir / "mlflow") if (bindir / "mlflow").exists() else "mlflow"
    return [exe, "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def prefect_ui_env(host: str, port: int) -> dict[str, str]:
    """The Prefect UI page reads its API address from the server's settings: without these it
    calls port 4200 whatever port the server listens on."""
    env = {"PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    if "PREFECT_UI_API_URL" not in os.environ:
        env["PREFECT_UI_API_URL"] = f"http://{browser_host(host)}:{port}/api"
    return env


def prefect_ui_command(host: str, port: int) -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", host,
            "--port", str(port)]
