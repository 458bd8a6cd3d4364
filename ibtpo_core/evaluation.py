"""Held-out evaluation: accuracy at temperature T, pass@k and distinct correct solutions.

Samples ``k`` responses per problem through a rollout engine and scores them with the same
verifier as the RL reward. ``accuracy`` is the mean over all samples (pass@1 estimated with k
samples per problem); its standard error is taken over problems.

Where the engine reports per-token entropies, the evaluation also measures the task's shape as
the policy sees it: the mean entropy at the first token of each step (``task/step_entropy_k``),
which steps hold a real choice, and the most a tree can gain in unique leaves per decoded token
over independent samples (``task/ceiling_unique_ratio``, method.md §6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ibtpo_core.data.problems import prompt_text, row_verifier
from ibtpo_core.data.prompts import encode_prompt
from ibtpo_core.data.tokenizer import before_stop, step_end_token_ids, stop_token_ids
from ibtpo_core.engines.base import RolloutEngine, StopConditions


@dataclass(frozen=True)
class EvalSpec:

    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    num_samples: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 32
    seed: int = 1234
    verifier: str = "countdown"  # for rows that name none
    step_delimiter: str = "\n"  # where a step ends (for the per-step entropies)
    choice_entropy: float = 0.1  # nats at a step's first token for the step to count as a choice


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def step_first_entropies(token_ids, entropies, step_end_ids, eos_ids) -> list[float]:
    """The entropy at the first token of each step of one response (a step ends at a token in
    ``step_end_ids``; a step that would start with EOS is not a step)."""
    out, at_start = [], True
    for tok, h in zip(token_ids, entropies):
        if at_start and tok not in eos_ids:
            out.append(float(h))
        at_start = tok in step_end_ids
    return out


def unique_leaf_ceiling(num_steps: int, choice_steps: list[int]) -> float:
    """The most unique leaves per decoded token a tree can reach, over independent samples.

    A new unique leaf must differ from its siblings at a step with a real choice; branching at
    the start of step ``j`` (1-based) re-decodes only steps ``j..num_steps``, so with ``j`` the
    last choice step the ratio is at most ``num_steps / (num_steps - j + 1)`` (reached only with
    unlimited branching there). Countdown-4 with choices at steps 1-2: 3 / 2 = 1.5.
    """
    if not choice_steps or num_steps < 1:
        return 1.0
    last = min(max(choice_steps), num_steps)
    return num_steps / (num_steps - last + 1)


def task_shape(per_response: list[list[float]], choice_entropy: float) -> dict:
    """``task/*`` metrics from the first-token entropies of each response's steps."""
    if not per_response:
        return {}
    counts = sorted(len(r) for r in per_response)
    num_steps = counts[len(counts) // 2]  # the median number of steps
    out: dict = {"task/steps": float(num_steps)}
    choices = []
    for k in range(1, max(counts) + 1):
        vals = [r[k - 1] for r in per_response if len(r) >= k]
        mean = sum(vals) / len(vals)
        if k <= 10:
            out[f"task/step_entropy_{k}"] = mean
        if k <= num_steps and mean >= choice_entropy:
            choices.append(k)
    out["task/choice_steps"] = float(len(choices))
    out["task/ceiling_unique_ratio"] = unique_leaf_ceiling(num_steps, choices)
    return out


def accuracy_metrics(engine: RolloutEngine, tokenizer, rows: list[dict], spec: EvalSpec) -> dict:
    """Metrics over ``rows`` (prepared problems, see ``ibtpo_core.data.problems``)."""
    if not rows:
        raise ValueError("evaluation got no problems: check the test split size (data.n_test)")
    prompts = [encode_prompt(tokenizer, prompt_text(r)) for r in rows]
    stop = StopConditions(eos_token_ids=stop_token_ids(tokenizer))
    comps = engine.generate(prompts, num_samples=spec.num_samples, temperature=spec.temperature,
                            max_new_tokens=spec.max_new_tokens, stop=stop, seed=spec.seed)
    k = spec.num_samples
    per_problem, passk, distinct, tokens = [], [], [], 0
    ends = set(step_end_token_ids(tokenizer, spec.step_delimiter)) if any(
        c.entropies for c in comps) else set()
    shapes = [step_first_entropies(c.token_ids, c.entropies, ends, stop.eos_token_ids)
              for c in comps if c.entropies]
    for i, row in enumerate(rows):
        group = comps[i * k:(i + 1) * k]
        texts = [tokenizer.decode(before_stop(c.token_ids, stop.eos_token_ids),
                                  skip_special_tokens=True) for c in group]
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
            "eval_decoded_tokens": float(tokens), **task_shape(shapes, spec.choice_entropy)}
