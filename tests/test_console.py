"""What a newcomer's terminal shows for ``ibtpo run``: the stage lines, the progress bars and the
result, not library noise (issue 13, item 8). The smoke config, from a shell, in a fresh folder."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml")

NOISE = {
    "a Python warning": re.compile(r"\w*Warning: "),
    "DeepSpeed guessing its accelerator": re.compile(r"Setting accelerator to CPU"),
    "DeepSpeed building its comm op": re.compile(r"built successfully"),
    "checkpoint load/save progress bars": re.compile(r"Loading weights|Writing model shards"),
    "dataset progress bars": re.compile(r"Generating \w+ split"),
    "lm-eval's override notice": re.compile(r"specified through cli"),
    "one pruning line an iteration": re.compile(r"deleted \d+ MiB"),
}


def test_ibtpo_run_prints_stages_progress_and_the_result_only(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_HOME", "PREFECT_API", "MLFLOW_TRACKING"))}
    out = subprocess.run([str(Path(sys.executable).parent / "ibtpo"), "run", SMOKE,
                          "--set", "threads=1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    console = (out.stdout + out.stderr).replace("\r", "\n")
    found = {what: sorted({m.group(0) for m in rx.finditer(console)})
             for what, rx in NOISE.items() if rx.search(console)}
    assert not found, f"noise on the console: {found}"
    for stage in ("prepare_data", "warm_up", "sample_trees[it 1]", "benchmark[final]"):
        assert f"Task run '{stage}' - Finished in state Completed()" in console, stage
    assert "RL iterations: 100%" in console and "warm-up: 100%" in console
    result = json.loads(out.stdout.strip().splitlines()[-1])  # the result closes the output
    assert result["n_eval"] == 16
