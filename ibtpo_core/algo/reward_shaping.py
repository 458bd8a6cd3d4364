"""Reward shaping on top of the verifier (method.md §6): DAPO's overlong penalty.

    L = the rollout's max_new_tokens, |y| = response tokens,
    B = overlong_buffer tokens, or round(overlong_buffer_frac * L) when that is 0
    penalty(|y|) = 0                      |y| <= L - B
                   (L - B - |y|) / B      L - B < |y| <= L       (linear, down to -1 at L)
                   -1                     |y| > L
    reward = verifier + overlong_factor * penalty(|y|)

(Yu et al. 2025, "DAPO", §3.4, "Soft Overlong Punishment"; verl's ``reward_model.overlong_buffer``
with ``len`` and ``penalty_factor``; DAPO's B is 4096 of L = 20480, a fraction of 0.2.) Both 0
(the default) turn it off. Pure.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardSpec:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    overlong_buffer: int = 0  # B, in tokens
    overlong_buffer_frac: float = 0.0  # B as a share of max_new_tokens, where overlong_buffer is 0
    overlong_factor: float = 1.0

    def __post_init__(self):
        if self.overlong_buffer < 0:
            raise ValueError(f"overlong_buffer must be >= 0 tokens (got {self.overlong_buffer}); "
                             f"0 turns the overlong penalty off")
        if not 0 <= self.overlong_buffer_frac < 1:
            raise ValueError(f"overlong_buffer_frac must be in [0, 1) (got "
                             f"{self.overlong_buffer_frac}): the share of max_new_tokens")
        if self.overlong_factor < 0:
            raise ValueError(f"overlong_factor must be >= 0 (got {self.overlong_factor})")


def overlong_penalty(length: int, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong penalty of a ``length``-token response (module docstring), in
    [-1, 0]; 0 when ``buffer`` is 0."""
    if buffer <= 0:
        return 0.0
    start = max_len - buffer
    if length <= start:
        return 0.0
    if length > max_len:
        return -1.0
    return (start - length) / buffer


def buffer_tokens(spec: RewardSpec, max_len: int) -> int:
    return spec.overlong_buffer or round(spec.overlong_buffer_frac * max_len)


def shaped_reward(verified: float, length: int, max_len: int, spec: RewardSpec) -> float:
    """The verifier's reward plus the weighted overlong penalty of a ``length``-token response."""
    buffer = buffer_tokens(spec, max_len)
    return verified + spec.overlong_factor * overlong_penalty(length, max_len, buffer)
