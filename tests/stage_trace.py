"""Which of the project's files each stage executes: runs the training flow on a config with a
trace function that records, per Prefect task, the files of every Python function called, and
writes ``{stage kind: [files relative to the repository]}`` as JSON.

Run as ``python -m tests.stage_trace OUT.json STATE_DIR [override ...]`` (a process of its own:
the trace function stays out of the test process). The ground truth for the code-digest test:
what a stage really runs, whatever loaded it (an import, a registry, a name in a string).
"""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WATCHED = tuple(str(ROOT / d) + "/" for d in ("ibtpo_core", "tasks", "configs"))
# Prefect task name -> the stage kind whose code digest keys it (pipeline/code_digest.py)
KIND = {"sample_trees": "rl", "estimate_scores": "rl", "update_policy": "rl"}


def main(out: str, state: str, overrides: list[str]) -> None:
    from prefect.context import TaskRunContext
    from prefect.testing.utilities import prefect_test_harness

    from flows.train import train

    seen: dict[str, set[str]] = {}
    files_of: dict[object, str | None] = {}

    def tracer(frame, event, arg):
        code = frame.f_code
        path = files_of.get(code, "")
        if path == "":
            name = code.co_filename
            path = name[len(str(ROOT)) + 1:] if name.startswith(WATCHED) else None
            files_of[code] = path
        if path is not None:
            ctx = TaskRunContext.get()
            if ctx is not None:
                kind = KIND.get(ctx.task.name, ctx.task.name)
                seen.setdefault(kind, set()).add(path)
        return None  # no line events

    with prefect_test_harness(server_startup_timeout=120):
        threading.settrace(tracer)
        sys.settrace(tracer)
        try:
            train(str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml"),
                  [f"output_dir={state}/runs", f"stage_cache_dir={state}/stages", "threads=1",
                   *overrides])
        finally:
            sys.settrace(None)
            threading.settrace(None)
    Path(out).write_text(json.dumps({k: sorted(v) for k, v in seen.items()}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
