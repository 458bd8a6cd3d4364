"""Supervised warm-up: teach the policy the response format on step-by-step solutions.

Trains a causal LM (loaded with ``from_pretrained``) on prompt -> solution trace pairs, with the
loss on response tokens only, then saves it with ``save_pretrained``. Each example draws one of
the problem's solutions at random and shuffles the order of its numbers, so the model sees many
ways to reach a target. Knows nothing of RL, engines or the pipeline.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from ibtpo_core.data.countdown import CountdownSpec, format_prompt, sample_trace
from ibtpo_core.data.prompts import encode_prompt, encode_response


@dataclass(frozen=True)
class WarmupSpec:

    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    seed: int = 0


def build_example(
    tokenizer, row: dict, spec: CountdownSpec, rng: random.Random
) -> tuple[list[int], int]:
    """``(ids, n_prompt)``: prompt + trace + EOS for a randomly reordered ``row``."""
    nums = list(row["numbers"])
    rng.shuffle(nums)
    prompt = encode_prompt(tokenizer, format_prompt(nums, row["target"]))
    return prompt + encode_response(tokenizer, sample_trace(row, spec, rng)), len(prompt)


def run_warmup(model_dir: str, out_dir: str, train_rows: list[dict], task: CountdownSpec,
               spec: WarmupSpec, progress=None) -> dict:
    """Train from ``model_dir`` and save to ``out_dir``; returns metrics (final loss, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not train_rows:
        raise ValueError("warm-up got no training problems: check the data split sizes")
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay,
                            betas=(0.9, 0.95))
    n_warm = max(1, int(spec.warmup_frac * spec.steps))

    def lr_at(step: int) -> float:
        if step < n_warm:
            return spec.lr * (step + 1) / n_warm
        frac = (step - n_warm) / max(1, spec.steps - n_warm)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    t0, losses = time.time(), []
    for step in range(spec.steps):
        batch = [
            build_example(tok, rng.choice(train_rows), task, rng) for _ in range(spec.batch_size)
        ]
        T = max(len(ids) for ids, _ in batch)
        inp = torch.full((len(batch), T), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(batch):
            inp[i, : len(ids)] = torch.tensor(ids)
            labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=inp, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, spec.steps, losses[-1])
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    tail = losses[-50:]
    return {"warmup/final_loss": sum(tail) / len(tail), "warmup/seconds": time.time() - t0,
            "warmup/steps": float(spec.steps)}
