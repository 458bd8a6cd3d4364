"""The Qwen3 GPU configs: each validates, is headed by the command that runs it, and its data /
model / multi-process DeepSpeed / benchmark paths run here with the GPU-only pieces swapped by
config (a local tiny model for the hub one, local fixtures for the hub datasets, the hf engine
for vLLM, two CPU ranks for eight GPUs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIGS = ["qwen3_1.7b_ibtpo", "qwen3_1.7b_grpo", "qwen3_8b_ibtpo"]
FIX = ROOT / "tests" / "fixtures" / "math"


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_validate_and_say_how_to_run_them(name):
    path = ROOT / "configs" / "experiments" / f"{name}.yaml"
    header = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    assert any(
        ln.startswith(
            f"# Run:   pip install -e .[gpu] && ibtpo run configs/experiments/{name}.yaml"
        )
        for ln in header
    )
    cfg = load_config(path)
    assert cfg.engine.name == "vllm" and cfg.engine.device == "cuda"
    assert cfg.algo.update.num_processes == 8 and cfg.rl.rollout.prompts_per_iteration == 128
    assert (
        cfg.algo.tree.G == 8
        and cfg.algo.update.lr == 1e-6
        and cfg.rl.rollout.max_new_tokens == 8192
    )
    zero = 3 if "8b" in name else 2
    assert cfg.algo.update.deepspeed_config == f"configs/deepspeed/zero{zero}.yaml"
    assert cfg.data.datasets.path == "BytedTsinghua-SIA/DAPO-Math-17k"
    assert {"aime24_avgk", "aime25_avgk"} <= set(cfg.benchmark.tasks)


def test_a_hub_model_id_resolves_from_the_local_hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    """Offline, a hub id is read from the hub cache; one that is not there is named with the fix."""
    import shutil

    from ibtpo_core.models.hub import resolve_model_path
    from ibtpo_core.preflight import check_model_dir

    cache = tmp_path / "hub"
    snap = cache / "models--Org--Tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snap)
    (cache / "models--Org--Tiny" / "refs").mkdir()
    (cache / "models--Org--Tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    got = resolve_model_path("Org/Tiny")
    assert Path(got) == snap
    check_model_dir(got)
    with pytest.raises(
        FileNotFoundError,
        match=r"model.path 'Org/Missing' is neither a local folder nor a hub model",
    ):
        resolve_model_path("Org/Missing")
    assert resolve_model_path(tiny_model_dir) == tiny_model_dir


def test_qwen3_config_paths_run_here_with_gpu_pieces_swapped(harness, tiny_model_dir):
    """qwen3_1.7b_ibtpo.yaml as written except: model, data files, engine, ranks, sizes."""
    from mlflow.tracking import MlflowClient

    from flows.train import train

    swaps = [
        f"model.path={tiny_model_dir}", "engine.name=hf", "engine.device=cpu",
        "engine.dtype=float32", "engine.options={}",
        "data.datasets.path=json", f"data.datasets.data_files={{train: {FIX / 'dapo.jsonl'}}}",
        "data.test_datasets.path=json",
        f"data.test_datasets.data_files={{test: {FIX / 'math_test.jsonl'}}}",
        "data.n_val=1", "algo.update.num_processes=2", "algo.update.mini_batches=1",
        'algo.tree.steps={delimiter: "\\n", min_step_tokens: 2, max_step_tokens: 256}',
        "rl.iterations=1", "rl.rollout.prompts_per_iteration=2", "rl.rollout.max_new_tokens=12",
        "rl.rollout.probe_every=1", "rl.rollout.probe_prompts=2",
        "eval.spec.max_new_tokens=12", "eval.spec.num_samples=2",
        "benchmark.tasks=[aime24_avgk]", "benchmark.backend=hf", "benchmark.avg_k=2",
        f"benchmark.local_data={{aime24_avgk: {FIX / 'aime.jsonl'}}}", "benchmark.max_gen_toks=8",
        f"output_dir={harness / 'qwen3'}", f"stage_cache_dir={harness / 'stages'}",
    ]
    out = train(str(ROOT / "configs" / "experiments" / "qwen3_1.7b_ibtpo.yaml"), swaps)
    assert out["n_eval"] == 2  # the two MATH-shaped test problems
    run = MlflowClient().get_run(out["mlflow_run_id"])
    assert run.data.params["algo.update.deepspeed_config"] == "configs/deepspeed/zero2.yaml"
    assert run.data.params["algo.update.num_processes"] == "2"
    assert "ib_probe/score_mean" in run.data.metrics  # the probe trees use surprisal too
    # pi_old recomputed by the trainer, its gap to the rollout's log-probs in MLflow
    assert run.data.metrics["mismatch/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert "mismatch/is_weight_mean" in run.data.metrics
    policy = Path(out["checkpoint"])
    assert (policy / "zero_state").is_dir() and (policy / "model.safetensors").is_file()
    bench = json.loads(next((harness / "stages").glob("bench-*/lm_eval_results.json")).read_text())
    assert set(bench["results"]["aime24_avgk"]) >= {"avg_at_k,all_k", "pass_at_k,all_k"}
