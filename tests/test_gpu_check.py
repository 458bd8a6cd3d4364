"""bench/gpu_check.sh runs here, as a user starts it from a shell, with its CPU stand-ins
(GPU_CHECK_CPU=1: the hf engine and a two-layer Qwen3-architecture model of the real vocabulary),
so the script a lent GPU runs cannot rot unseen; without a GPU and without the flag it says so."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.scripts
ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path), **env}
    full.pop("PREFECT_API_URL", None)
    return subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=900)


def test_the_gpu_check_runs_on_cpu_and_reports_every_figure(tmp_path):
    proc = run(tmp_path, GPU_CHECK_CPU="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert out["device"] == "cpu" and out["peak_gpu_memory_gb"] is None
    # 4 prompts x G = 8 leaves; random weights over 151,936 ids never pick an end of text
    assert sum(out["stop_reasons"].values()) == 32 and out["mean_response_tokens"] == 24
    ratio = out["first_mini_batch"]
    assert ratio["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # fp32 on both sides
    assert ratio["clipfrac"] == 0.0 and ratio["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert out["update_tokens"] == out["decoded_tokens"] == 32 * 24
    assert out["time_s"]["sample_trees"] > 0 and out["time_s"]["update_policy"] > 0
    assert "| stop_reasons |" in proc.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_without_a_gpu_the_check_names_the_cpu_flag(tmp_path):
    proc = run(tmp_path)
    assert proc.returncode == 2
    assert "no NVIDIA GPU visible" in proc.stdout and "GPU_CHECK_CPU=1" in proc.stdout
