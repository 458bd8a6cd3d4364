"""What a row of the prepared data means to the pipeline: its prompt text and its verifier.

Two row shapes: the built-in countdown task's ``numbers`` / ``target`` (the prompt is formatted
here, so the order of the numbers can be shuffled per sample), and free-text problems with a
ready ``prompt``, an ``answer`` and the name of their ``verifier`` (math datasets, reasoning-gym).
"""
from __future__ import annotations

from typing import Callable

from ibtpo_core.algo.rewards import VERIFIERS
from ibtpo_core.data.countdown import format_prompt


def prompt_text(row: dict) -> str:
    """The user prompt of a row (before any chat template)."""
    if "prompt" in row:
        return row["prompt"]
    return format_prompt(row["numbers"], row["target"])


def verifier(name: str) -> Callable[[str, dict], float]:
    """The registered verifier ``name`` (countdown, math, reasoning_gym)."""
    import ibtpo_core.data.answers  # noqa: F401  registers math and reasoning_gym

    return VERIFIERS.get(name)


def row_verifier(row: dict, default: str) -> Callable[[str, dict], float]:
    """The verifier a row names, else ``default``."""
    return verifier(row.get("verifier", default))
