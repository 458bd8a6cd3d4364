"""Held-out evaluation: accuracy at temperature T, pass@k and distinct correct solutions.

Samples ``k`` responses per problem through a rollout engine and scores them with the same
verifier as the RL reward. ``accuracy`` is the mean over all samples (pass@1 estimated with k
samples per problem); its standard error is taken over problems.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ibtpo_core.data.problems import prompt_text, row_verifier
from ibtpo_core.data.prompts import encode_prompt
from ibtpo_core.engines.base import RolloutEngine, StopConditions


@dataclass(frozen=True)
class EvalSpec:

    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    num_samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 32
    seed: int = 1234
    verifier: str = "countdown"  # for rows that name none


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate(engine: RolloutEngine, tokenizer, rows: list[dict], spec: EvalSpec) -> dict:
    """Metrics over ``rows`` (prepared problems, see ``ibtpo_core.data.problems``)."""
    if not rows:
        raise ValueError("evaluation got no problems: check the test split size (data.n_test)")
    prompts = [encode_prompt(tokenizer, prompt_text(r)) for r in rows]
    stop = StopConditions(eos_token_ids=(tokenizer.eos_token_id,))
    comps = engine.generate(prompts, num_samples=spec.num_samples, temperature=spec.temperature,
                            max_new_tokens=spec.max_new_tokens, stop=stop, seed=spec.seed)
    k = spec.num_samples
    per_problem, passk, distinct, tokens = [], [], [], 0
    for i, row in enumerate(rows):
        group = comps[i * k:(i + 1) * k]
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group]
        verify = row_verifier(row, spec.verifier)
        rewards = [verify(t, row) for t in texts]
        tokens += sum(len(c.token_ids) for c in group)
        c = int(sum(rewards))
        per_problem.append(c / k)
        passk.append(pass_at_k(k, c, k))
        distinct.append(len({" ".join(t.split()) for t, r in zip(texts, rewards) if r > 0}))
    n = len(rows)
    acc = sum(per_problem) / n
    var = sum((a - acc) ** 2 for a in per_problem) / max(1, n - 1)
    return {"accuracy": acc, "accuracy_se": math.sqrt(var / n), f"pass_at_{k}": sum(passk) / n,
            "distinct_correct": sum(distinct) / n, "n_eval": float(n),
            "eval_decoded_tokens": float(tokens)}
