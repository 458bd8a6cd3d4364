"""IB-guided selection (method.md §3): which nodes of each tree get a new branch.

Candidates: nodes with children that are not final (the final-answer step and what follows it
never branch) and have fewer than ``B_max`` children; a root while it has fewer than ``B_root``
children (a new child of the root is an extra independent sample); optionally not the nodes
with a forced next step (``min_branch_entropy``) or whose children already cover most of
pi_old's next step (``max_branch_cover``, ``covered_mass``). Each candidate is scored by
the registered ``select_by`` rule (``ib``: IB-Score, ``entropy``: H, ``relevance``: I,
``random``: uniform), then each tree ranks its candidates, best first (``greedy``; ties to the
lower node id) or in the order of a draw without replacement from softmax(score / temperature)
(``softmax``, by the Gumbel-top-k trick); the sampler takes a prefix of the ranking. Pure torch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ibtpo_core.algo.ib_score import ENTROPY_ESTIMATORS, Forest, TreeStats, _scatter_sum
from ibtpo_core.algo.tree import Tree
from ibtpo_core.registry import Registry

SELECT_BY: Registry[Callable] = Registry("select_by")
PICK: Registry[Callable] = Registry("select")


@SELECT_BY.register("ib")
def _by_ib(stats: TreeStats, gen: torch.Generator) -> torch.Tensor:
    return stats.IB


@SELECT_BY.register("entropy")
def _by_entropy(stats: TreeStats, gen: torch.Generator) -> torch.Tensor:
    return stats.H


@SELECT_BY.register("relevance")
def _by_relevance(stats: TreeStats, gen: torch.Generator) -> torch.Tensor:
    return stats.I


@SELECT_BY.register("random")
def _by_random(stats: TreeStats, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(stats.n.shape, generator=gen, dtype=torch.float64)


def branch_entropy(f: Forest, estimator: str = "token_entropy") -> torch.Tensor:
    """(N,) float64: the mean over a node's children of the entropy at each child's first token
    (the choice made at the node; ``surprisal``: -log pi_old of that token, and where the engine
    gave no entropies); NaN for nodes without children."""
    N = f.num_nodes
    counts = torch.bincount(f.tok_node, minlength=N)  # (N,) tokens of each node's step
    starts = torch.cumsum(counts, 0) - counts  # (N,) row of each node's first token
    has_tok = counts > 0
    first = starts.clamp(max=max(0, f.tok_node.numel() - 1))
    none = torch.zeros(N, dtype=torch.float64)
    ent_first = f.tok_entropy[first] if f.tok_node.numel() else none  # (N,)
    logp_first = f.tok_logprob[first] if f.tok_node.numel() else none  # (N,)
    ent = ENTROPY_ESTIMATORS.get(estimator)(ent_first, logp_first)
    ent = torch.where(torch.isnan(ent), -logp_first, ent)  # no entropy from the engine: surprisal
    child = (f.parent >= 0) & has_tok
    p = f.parent.clamp(min=0)
    total = _scatter_sum(p, torch.where(child, ent, 0.0), N)
    num = _scatter_sum(p, child.double(), N)
    return torch.where(num > 0, total / num.clamp(min=1), torch.full_like(total, float("nan")))


def covered_mass(trees: list[Tree]) -> torch.Tensor:
    """(N,) float64, rows as ``Forest.from_trees(trees)``: the probability under pi_old that a new
    continuation from a node begins with a step one of its children already has, i.e. that a
    branch there repeats a sibling. It is the sum over the children of exp(sum of the step's
    log-probs); a child whose step extends a sibling's (a final step keeps its EOS merged,
    ``[a, NL, EOS]`` beside ``[a, NL]``) lies inside that sibling's event and is not added again.
    0 for nodes without children. Exact when the trees hold one policy's samples at the
    temperature their log-probs were taken at (one sampling call)."""
    out: list[float] = []
    for tree in trees:
        for node in tree.nodes:
            steps = [tree.nodes[c] for c in node.children]
            out.append(sum(
                math.exp(sum(ch.logprobs)) for ch in steps
                if not any(o is not ch and len(o.tokens) < len(ch.tokens)
                           and ch.tokens[:len(o.tokens)] == o.tokens for o in steps)))
    return torch.tensor(out, dtype=torch.float64)


def candidate_mask(
    f: Forest,
    stats: TreeStats,
    B_max: int,
    B_root: int,
    min_branch_entropy: float = 0.0,
    estimator: str = "token_entropy",
    covered: torch.Tensor | None = None,
    max_branch_cover: float = 1.0,
) -> torch.Tensor:
    """(N,) bool: nodes that may receive a new child this iteration. With ``min_branch_entropy``
    > 0, an inner node whose children's first tokens had a mean entropy below it (a forced next
    step: a new branch would repeat its sibling) is no candidate; with ``max_branch_cover`` < 1,
    neither is one whose children already cover at least that share of pi_old's next step
    (``covered``, from ``covered_mass``). The root always may be (below ``B_root``)."""
    is_root = f.parent < 0
    inner = (stats.num_children > 0) & ~f.final & ~is_root & (stats.num_children < B_max)
    if min_branch_entropy > 0:
        inner = inner & (branch_entropy(f, estimator) >= min_branch_entropy)
    if max_branch_cover < 1:
        if covered is None:
            raise ValueError("max_branch_cover < 1 needs covered (selection.covered_mass)")
        inner = inner & (covered < max_branch_cover)
    return inner | (is_root & (stats.num_children < B_root))


@PICK.register("greedy")
def pick_greedy(scores: torch.Tensor, gen: torch.Generator, temperature: float) -> torch.Tensor:
    """Rank keys: the scores (NaN last)."""
    return scores.nan_to_num(nan=float("-inf"))


@PICK.register("softmax")
def pick_softmax(scores: torch.Tensor, gen: torch.Generator, temperature: float) -> torch.Tensor:
    """Rank keys: score / temperature plus Gumbel noise, so the first k of the ranking are k
    draws without replacement from softmax(score / temperature)."""
    if temperature <= 0:
        raise ValueError(
            f"select_temperature must be > 0 for softmax selection (got {temperature})"
        )
    u = torch.rand(scores.shape, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    return scores.nan_to_num(nan=0.0) / temperature + gumbel


def rank_candidates(f: Forest, stats: TreeStats, cand: torch.Tensor, select_by: str, select: str,
                    temperature: float, gen: torch.Generator,
                    penalty: torch.Tensor | None = None) -> list[list[int]]:
    """Per tree, its candidate rows (``cand``, from ``candidate_mask``) best first: by the
    ``select_by`` score less ``penalty`` (per row, e.g. a cost; ``greedy``: ties to the lower
    row) or in the order of a draw without replacement (``softmax``)."""
    scores = SELECT_BY.get(select_by)(stats, gen)
    if penalty is not None:
        scores = scores - penalty
    keys = PICK.get(select)(scores, gen, temperature)
    order = torch.sort(-keys, stable=True).indices.tolist()
    ranked: list[list[int]] = [[] for _ in range(f.num_trees)]
    cand_l, tree_l = cand.tolist(), f.tree.tolist()
    for row in order:
        if cand_l[row]:
            ranked[tree_l[row]].append(row)
    return ranked
