"""Helper processes that end with the process that started them.

``spawn(cmd)`` starts ``cmd`` under a small watcher (this module, run as a program) in a process
group of its own. The watcher ends the whole group -- the command and anything it started --
when its owner is gone, even when the owner died by SIGKILL, which no handler in the owner can
catch, or when the owner asks with ``stop``. A killed ``ibtpo run`` thus leaves no Prefect
server, update launcher or rank behind, and ``ibtpo ui`` takes its servers with it.

Knows nothing of what it runs. Standard library only, so the watcher starts in milliseconds.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.2  # how often the watcher looks for its owner
GRACE_S = 10.0  # SIGTERM first; what is still alive after this gets SIGKILL


def spawn(cmd: list[str], env: dict[str, str] | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start ``cmd`` tied to this process; the returned handle is the watcher's (its exit code
    is the command's). Output goes wherever ``popen_kwargs`` say (inherited by default)."""
    watcher = [sys.executable, "-m", "ibtpo_core.tether", str(os.getpid()), "--", *cmd]
    return subprocess.Popen(watcher, env=env, start_new_session=True, **popen_kwargs)


def stop(proc: subprocess.Popen, grace_s: float = GRACE_S) -> int | None:
    """End a spawned command and its whole group: SIGTERM, then SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)  # the watcher forwards it to the group
            proc.wait(timeout=grace_s + 2)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _end_group(child: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the group (this watcher ignores it), wait for the command, then SIGKILL the
    group, this watcher included: nothing it started outlives it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pgid = os.getpgid(0)
    _kill_group(pgid, signal.SIGTERM)
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(pgid, signal.SIGKILL)


def _watch(owner: int, cmd: list[str]) -> int:
    asked = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: asked.append(s))
    try:
        child = subprocess.Popen(cmd)  # same process group as this watcher
    except OSError as err:
        print(f"ibtpo: cannot start {cmd[0]}: {err}", file=sys.stderr)
        return 127
    while True:
        rc = child.poll()
        if rc is not None:  # the command ended: anything it left running goes too
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _kill_group(os.getpgid(0), signal.SIGTERM)
            return rc
        if asked or os.getppid() != owner:  # asked to stop, or the owner is gone
            _end_group(child, GRACE_S)
            return 128 + signal.SIGTERM
        time.sleep(POLL_S)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m ibtpo_core.tether OWNER_PID -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    return _watch(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
