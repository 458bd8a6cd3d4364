"""DAPO's dynamic sampling (method.md §6): groups whose rewards are all equal carry no advantage
under a group-relative estimator, so they are dropped and the batch is refilled with new
prompts until it holds ``prompts_per_iteration`` informative groups or ``max_draws`` draws were
made (Yu et al. 2025, "DAPO", §3.2; verl's ``algorithm.filter_groups`` with
``max_num_gen_batches``). Every decoded token counts, the dropped groups' too, so a run under
``rl.decoded_tokens`` spends the same tokens as any other method. Pure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ibtpo_core.algo.tree import Tree


@dataclass(frozen=True)
class FilterSpec:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    enabled: bool = False
    max_draws: int = 4  # draws of prompts per iteration, the first included

    def __post_init__(self):
        if self.max_draws < 1:
            raise ValueError(f"max_draws must be >= 1 (got {self.max_draws}): the first draw is "
                             f"the iteration's own prompts")


def informative(tree: Tree) -> bool:
    """Whether a tree's leaves have more than one reward (a group-relative advantage is not all
    zero)."""
    rewards = {leaf.reward for leaf in tree.leaves()}
    return len(rewards) > 1


def next_draw_size(need: int, kept: int, drawn: int) -> int:
    """Prompts to draw for ``need`` more informative groups, given ``kept`` of ``drawn`` so far
    were informative: need / keep-rate, the rate taken as at least 1 / 4 (so one draw is at
    most 4x the need; DAPO's generation batch is 3x its training batch) and as 1 before the
    first draw."""
    rate = max(kept / drawn, 1 / 4) if drawn and kept else (1 / 4 if drawn else 1.0)
    return max(need, math.ceil(need / rate))
