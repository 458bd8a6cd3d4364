"""Problems from ``reasoning-gym``'s seeded generators (countdown, basic_arithmetic, chain_sum,
...),
scored by reasoning-gym's own answer checkers (the ``reasoning_gym`` verifier) or by math-verify.

One seeded draw is deduplicated on the question text and split into test / validation / train,
so no test question reaches RL. Rows: ``prompt`` (the question and the answer-format line the
verifier reads), ``answer``, ``key``, ``verifier``, ``rg_dataset``, ``rg_metadata``.
Knows nothing of tokenizers or models.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from ibtpo_core.registry import closest

ANSWER_LINE = "Give your final answer alone on the last line."


@dataclass(frozen=True)
class ReasoningGymSpec:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    dataset: str = "countdown"  # a reasoning-gym dataset name
    config: dict = field(default_factory=dict)  # its generator's options (min_numbers, ...)
    n_train: int = 2000
    instruction: str = ANSWER_LINE  # appended to every question
    # who scores a response: reasoning-gym's own checker on its last line, or math-verify on
    # the whole response (its last number or \boxed{}: for generators with numeric answers,
    # such as basic_arithmetic or chain_sum, it rewards a right answer in a sentence too)
    verifier: Literal["reasoning_gym", "math"] = "reasoning_gym"


def check_dataset(spec: ReasoningGymSpec) -> None:
    """Fail at once on an unknown dataset or option, naming the valid ones."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if spec.dataset not in DATASETS:
        close = closest(spec.dataset, DATASETS)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ValueError(f"unknown reasoning-gym dataset {spec.dataset!r}{hint}; see "
                         f"reasoning_gym.factory.DATASETS for the {len(DATASETS)} names")
    try:
        reasoning_gym.create_dataset(spec.dataset, seed=0, size=1, **spec.config)
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"reasoning-gym dataset {spec.dataset!r} rejects config "
                         f"{spec.config}: {err}") from None


def make_gym_splits(
    spec: ReasoningGymSpec, seed: int, n_test: int, n_val: int
) -> dict[str, list[dict]]:
    import reasoning_gym

    check_dataset(spec)
    want = n_test + n_val + spec.n_train
    ds = reasoning_gym.create_dataset(spec.dataset, seed=seed, size=want, **spec.config)
    rows, seen = [], set()
    for i in range(want):
        e = ds[i]
        key = " ".join(str(e["question"]).split())
        if key in seen:
            continue
        seen.add(key)
        meta = json.loads(json.dumps(e["metadata"], default=str))
        rows.append({"prompt": f"{e['question'].rstrip()}\n{spec.instruction}".strip(),
                     "answer": str(e["answer"]), "key": key, "verifier": spec.verifier,
                     "rg_dataset": spec.dataset, "rg_metadata": meta})
    if len(rows) < n_test + n_val + 1:
        raise ValueError(f"reasoning-gym {spec.dataset!r} gave only {len(rows)} distinct problems "
                         f"for {n_test} test and {n_val} validation problems plus training: "
                         f"widen its config or lower the split sizes")
    return {"test": rows[:n_test], "validation": rows[n_test:n_test + n_val],
            "train": rows[n_test + n_val:]}
