"""Rollout throughput: the hf engine against plain ``model.generate`` on the same model.

Decodes a fixed number of new tokens (no early stop) at batch 1, 16 and 64 and reports decoded
tokens per second, the engine / generate ratio, and the share of the machine's FLOP bound
(2 x params x tokens/s against a measured float32 matmul peak). Prints a table, writes JSON.

    python bench/rollout.py [--json PATH] [--new-tokens 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_json  # noqa: E402

from ibtpo_core.runtime import set_offline_defaults, set_threads  # noqa: E402


def matmul_peak_flops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a fresh tiny model)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: all cores; stop other jobs first)",
    )
    args = ap.parse_args()
    set_offline_defaults()
    threads = set_threads(args.threads or os.cpu_count() or 1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ibtpo_core.data.tokenizer import build_tokenizer
    from ibtpo_core.engines.base import StopConditions, build_engine
    from ibtpo_core.models.tiny import TinyModelSpec, create_tiny_model

    model_dir = args.model
    if model_dir is None:
        model_dir = tempfile.mkdtemp(prefix="bench_model_")
        create_tiny_model(build_tokenizer(), TinyModelSpec(), seed=0, out_dir=model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = build_engine("hf", model_path=model_dir, reuse_prefixes=False)
    params = sum(p.numel() for p in model.parameters())
    prompt = tok("nums 3 5 2 6 target 22\n", add_special_tokens=False)["input_ids"]
    T = args.new_tokens
    no_stop = StopConditions(eos_token_ids=())
    peak = matmul_peak_flops()

    def time_engine(b: int) -> float:
        t = time.perf_counter()
        out = engine.generate([prompt], num_samples=b, max_new_tokens=T, stop=no_stop, seed=0)
        dt = time.perf_counter() - t
        assert sum(len(c.token_ids) for c in out) == b * T
        return b * T / dt

    def time_generate(b: int) -> float:
        ids = torch.tensor([prompt] * b)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 max_new_tokens=T, min_new_tokens=T, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=tok.pad_token_id)
        dt = time.perf_counter() - t
        assert out.shape[1] - len(prompt) == T
        return b * T / dt

    rows, result = [], {"threads": threads, "params": params, "new_tokens": T,
                        "matmul_peak_gflops": peak / 1e9}
    for b in [int(x) for x in args.batches.split(",")]:
        time_engine(b), time_generate(b)  # warm-up
        eng, gen = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            eng.append(time_engine(b))
            gen.append(time_generate(b))
        e, g = statistics.median(eng), statistics.median(gen)
        result[f"engine_tok_s_b{b}"] = e
        result[f"generate_tok_s_b{b}"] = g
        result[f"speedup_ratio_b{b}"] = e / g
        result[f"engine_flop_bound_share_b{b}"] = 2 * params * e / peak
        rows.append((b, e, g, e / g, 2 * params * e / peak))
    print(f"model: {params / 1e6:.2f}M params, {threads} threads, {T} new tokens, "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s, median of {args.repeats}")
    print(
        f"{'batch':>5} {'engine tok/s':>13} {'generate tok/s':>15} {'ratio':>6} {'FLOP share':>10}"
    )
    for b, e, g, r, s in rows:
        print(f"{b:>5} {e:>13.0f} {g:>15.0f} {r:>6.2f} {s:>10.4f}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
