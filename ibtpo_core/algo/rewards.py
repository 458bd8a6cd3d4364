"""Verifiers: map a finished response text to a reward in {0, 1}.

Pure (standard library only). The same functions score RL rollouts, held-out evaluation and the
lm-eval task, so training reward and benchmark agree. Each verifier is registered under a name
and shares one signature: ``fn(response: str, problem: dict) -> float``.

The built-in countdown format (one step per line, the last line's result is the answer)::

    5 + 3 = 8
    8 * 2 = 16
    16 - 6 = 10

Rules checked: every line parses as ``a op b = r`` with integers and op in ``+ - * /``; the
arithmetic is exact (division without remainder, no negative results); each operand is either an
unused given number or an unused earlier result (each value is consumed once); every given
number is used; the last result equals the target.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable

from ibtpo_core.registry import Registry

VERIFIERS: Registry[Callable[[str, dict], float]] = Registry("verifier")

_STEP = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*$")


def apply_op(a: int, op: str, b: int) -> int | None:
    """The countdown result of ``a op b``, or None where the rules forbid it (negative, inexact)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    if op == "/":
        return a // b if b != 0 and a % b == 0 else None
    raise ValueError(f"unknown operator {op!r}; use one of + - * /")


def parse_steps(response: str) -> list[tuple[int, str, int, int]] | None:
    """Parse non-empty lines into ``(a, op, b, r)`` tuples; None if any line is malformed."""
    steps = []
    for line in response.split("\n"):
        if not line.strip():
            continue
        m = _STEP.match(line)
        if m is None:
            return None
        steps.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
    return steps


def check_countdown(response: str, numbers: list[int], target: int) -> tuple[bool, str]:
    """Check a countdown solution; returns ``(ok, reason)`` where reason names the first fault."""
    steps = parse_steps(response)
    if steps is None:
        return False, "malformed line"
    if not steps:
        return False, "no steps"
    pool = Counter(numbers)
    for i, (a, op, b, r) in enumerate(steps):
        need = Counter([a, b])
        if any(pool[v] < k for v, k in need.items()):
            return False, f"step {i + 1} uses a number that is not available"
        got = apply_op(a, op, b)
        if got is None or got != r:
            return False, f"step {i + 1} arithmetic is wrong"
        pool.subtract(need)
        pool[r] += 1
    if steps[-1][3] != target:
        return False, "last result is not the target"
    leftover = +pool
    leftover[target] -= 1
    if +leftover:
        return False, "not every given number is used"
    return True, "ok"


@VERIFIERS.register("countdown")
def countdown_reward(response: str, problem: dict) -> float:
    """1.0 if ``response`` solves the countdown ``problem`` (keys ``numbers``, ``target``),
    else 0.0."""
    ok, _ = check_countdown(response, list(problem["numbers"]), int(problem["target"]))
    return 1.0 if ok else 0.0
