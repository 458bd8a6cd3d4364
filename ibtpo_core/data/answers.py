"""Verifiers for free-text answers: math problems (``math-verify``) and ``reasoning-gym`` tasks.

Registered in the same table as the built-in countdown verifier (``ibtpo_core.algo.rewards``),
with the same signature ``fn(response, problem) -> float`` and rewards in {0, 1}; a row of the
prepared data names its verifier in its ``verifier`` field. Also here: reading the gold answer
out of a dataset's solution text (GSM8K's ``#### 42``, MATH's ``\\boxed{...}``).
"""
from __future__ import annotations

import logging
import re
import threading

from ibtpo_core.algo.rewards import VERIFIERS

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every untimed call


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


def gold_answer(text: str, fmt: str) -> str | None:
    """The reference answer inside a dataset's answer field; ``fmt``: ``plain`` (the field is the
    answer), ``gsm8k`` (after ``####``), ``boxed`` (the last ``\\boxed{}`` of a solution)."""
    text = str(text).strip()
    if fmt == "plain":
        return text or None
    if fmt == "gsm8k":
        m = _GSM8K.search(text)
        return m.group(1).replace(",", "").strip() if m else None
    if fmt == "boxed":
        return last_boxed(text)
    raise ValueError(f"unknown answer_format {fmt!r}; use plain, gsm8k or boxed")


def final_answer(response: str) -> str:
    """What a free-text response answers: the ``<answer>`` tag if any, else its last non-empty
    line (the prompt asks for the answer alone or on the last line)."""
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return tags[-1].strip()
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may set (Prefect runs
    # tasks in worker threads); elsewhere its parse and verify run untimed
    return 5 if threading.current_thread() is threading.main_thread() else None


@VERIFIERS.register("math")
def math_reward(response: str, problem: dict) -> float:
    """1.0 if the response's answer equals ``problem['answer']`` mathematically (math-verify:
    numbers, fractions, LaTeX expressions, sets); the last ``\\boxed{}`` counts first."""
    from math_verify import parse, verify

    t = _timeout()
    gold = parse(f"${problem['answer']}$", parsing_timeout=t)
    if not gold:
        gold = parse(str(problem["answer"]), parsing_timeout=t)
    boxed = last_boxed(response)
    pred = parse(f"\\boxed{{{boxed}}}" if boxed is not None else response, parsing_timeout=t)
    return 1.0 if gold and pred and verify(gold, pred, timeout_seconds=t) else 0.0


@VERIFIERS.register("reasoning_gym")
def reasoning_gym_reward(response: str, problem: dict) -> float:
    """1.0 if reasoning-gym's own scorer for ``problem['rg_dataset']`` gives the response's final
    answer full marks (its partial credit for a well-formed wrong answer counts as 0)."""
    import reasoning_gym

    score = reasoning_gym.get_score_answer_fn(problem["rg_dataset"])
    entry = {"question": problem["prompt"], "answer": problem["answer"],
             "metadata": problem["rg_metadata"]}
    return 1.0 if score(answer=final_answer(response), entry=entry) >= 1.0 else 0.0
