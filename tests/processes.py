"""Finding every process a test started, however deep: the test marks the environment of the
command it starts with a tag (``IBTPO_TEST_TAG``), which every child inherits."""
from __future__ import annotations

import time

import psutil

TAG = "IBTPO_TEST_TAG"


def processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``tag``."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def leftovers(tag: str, wait_s: float = 20.0) -> list[str]:
    """The command lines of ``tag``'s processes still alive after ``wait_s``; they are killed
    afterwards, so one failure does not leak into the next test."""
    deadline = time.monotonic() + wait_s
    while (alive := processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    names = []
    for p in alive:
        try:
            names.append(" ".join(p.cmdline())[:160])
            p.kill()
        except psutil.Error:
            pass
    return names
