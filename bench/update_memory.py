"""Memory and speed of one policy-update step at Qwen3's vocabulary: the whole-vocabulary
log-probs (``before``: ``token_logprobs``, today's path until this change) against the chunked,
response-only ones (``after``: ``response_logprobs``, entropy without gradient).

A Qwen3-architecture model with the real vocabulary (151,936) and two small layers, one AdamW
step on ``micro_batch`` sequences of a 64-token prompt and a response of 1k, 4k and 8k tokens.
Each measurement runs in a process of its own: the peak RSS above the model-and-optimizer
baseline (the kernel's high-water mark, reset after the baseline), and response tokens per
second (median of the repeats). A ``before`` row whose logits alone would not fit this machine is
not run and says so. Also the largest |log-prob| difference between the two paths. Prints a
table, writes JSON, ends with one JSON line.

    python bench/update_memory.py [--json PATH] [--repeats 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB = 151_936
PROMPT = 64
LENGTHS = (1024, 4096, 8192)
MICRO = (1, 4)
CHUNK = 256  # UpdateSpec.logprob_chunk_tokens' default
FREE_GB = 20.0  # what one measurement may use here (24 GiB machine)


def _rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(path: str, tokens: int, micro: int, repeats: int) -> dict:
    """One configuration, in this process: extra peak GB and tokens per second."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ibtpo_core.algo.losses import LossSpec, policy_loss
    from ibtpo_core.algo.tree import TrainingSequence
    from ibtpo_core.training.policy import collate, response_logprobs, token_logprobs

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=tokens + PROMPT,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(1)

    def batch(n_tokens: int):
        seqs = [TrainingSequence(torch.randint(1, VOCAB, (PROMPT,), generator=g).tolist(),
                                 torch.randint(1, VOCAB, (n_tokens,), generator=g).tolist(),
                                 [-12.0] * n_tokens, [0.5] * n_tokens, [1] * n_tokens, 1.0)
                for _ in range(micro)]
        return collate(seqs, 0)

    def step(b) -> None:
        if path == "before":
            logp, ent = token_logprobs(model, b)
        else:
            logp, ent = response_logprobs(model, b, 1.0, CHUNK, entropy_grad=False)
        loss, _ = policy_loss(logp, b.old_logprobs, b.advantages, b.response_mask, LossSpec(),
                              entropy=ent)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(batch(8))  # the optimizer state exists now: part of the baseline
    b = batch(tokens)
    baseline = _rss_gb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    peak = _rss_gb("VmHWM")
    out = {"extra_peak_gb": round(peak - baseline, 3),
           "tokens_per_s": round(micro * tokens / statistics.median(times), 1)}
    if path == "after" and micro == 1 and tokens == LENGTHS[0]:
        with torch.no_grad():  # the two paths side by side, on the same weights
            full, _ = token_logprobs(model, b)
            part, _ = response_logprobs(model, b, 1.0, CHUNK)
        mask = b.response_mask.bool()
        out["max_abs_logprob_diff"] = float((full[mask] - part[mask]).abs().max())
    return out


def run_child(path: str, tokens: int, micro: int, repeats: int, threads: int) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import torch; torch.set_num_threads({threads}); import update_memory as u; "
            f"print(json.dumps(u.measure({path!r}, {tokens}, {micro}, {repeats})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        print(f"  {path} {tokens} x {micro} failed: {proc.stderr[-400:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="bench/results/update_memory.json")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rows, diff = [], None
    for micro in MICRO:
        for tokens in LENGTHS:
            # one fp32 copy of the logits of every position; the old path keeps about three
            copy_gb = micro * (tokens + PROMPT) * VOCAB * 4 / 2**30
            before = (run_child("before", tokens, micro, args.repeats, args.threads)
                      if 3 * copy_gb < FREE_GB else None)
            after = run_child("after", tokens, micro, args.repeats, args.threads)
            if after and "max_abs_logprob_diff" in after:
                diff = after["max_abs_logprob_diff"]
            rows.append({"tokens": tokens, "micro_batch": micro,
                         "extra_peak_gb_before": before and before["extra_peak_gb"],
                         "extra_peak_gb_after": after and after["extra_peak_gb"],
                         "tokens_per_s_before": before and before["tokens_per_s"],
                         "tokens_per_s_after": after and after["tokens_per_s"],
                         "logits_copy_gb": round(copy_gb, 2),
                         "max_abs_logprob_diff": diff})
            r = rows[-1]
            print(f"{tokens:>6} x {micro}: extra peak {r['extra_peak_gb_before']} -> "
                  f"{r['extra_peak_gb_after']} GB, tokens/s {r['tokens_per_s_before']} -> "
                  f"{r['tokens_per_s_after']} (one fp32 logits copy {copy_gb:.2f} GB"
                  f"{'; before not run: would not fit' if before is None else ''})", flush=True)
    from _results import write_json

    summary = {"vocab": VOCAB, "threads": args.threads, "rows": rows}
    write_json(args.json, summary)
    print("| tokens | micro-batch | extra peak GB before | after | tokens/s before | after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['micro_batch']} | {r['extra_peak_gb_before']} | "
              f"{r['extra_peak_gb_after']} | {r['tokens_per_s_before']} | "
              f"{r['tokens_per_s_after']} |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
