"""Values and the IB-Score of every node of a batch of trees (method.md §2), vectorised.

A batch of trees is flattened into a ``Forest``: one row per node (N), one row per step token
(T), parent links as indices. Every quantity is computed for all trees at once with
``scatter_add`` passes, bottom-up by depth:

    n(s)  leaves below s                      c(s)  correct leaves below s (sum of rewards)
    V(s)  = c(s) / n(s)                       w_k   = n(c_k) / sum_j n(c_j)   (children of s)
    H(s)  = mean over children k of the mean per-token entropy of k's step
            (entropy_estimator: token_entropy = exact entropy from logits,
                                surprisal     = -log pi_old(token))
    I(s)  = sum_k w_k (V_k / V(s)) log(V_k / V(s))   (0 if < 2 children or V(s) = 0; 0 log 0 = 0)
    IB(s) by ib_form:  h_plus_bi   H + beta I
                       i_minus_bh  I - beta H
                       zscore      z(H) + beta z(I), z over the given candidate set of each tree

I(s) is the KL divergence from the children's weights to their weights given a correct outcome
(w_k V_k / V(s) is P(child k | correct)), so I >= 0. H, I and IB are defined for nodes with
children (NaN elsewhere). Pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ibtpo_core.algo.tree import Tree
from ibtpo_core.registry import Registry

IB_FORMS: Registry[Callable] = Registry("ib_form")
# How a token's uncertainty is estimated: fn(entropy, logprob) -> per-token estimate, (T,) each;
# NaN where the engine gave no entropy (the callers decide whether that is an error).
ENTROPY_ESTIMATORS: Registry[Callable] = Registry("entropy_estimator")


@ENTROPY_ESTIMATORS.register("token_entropy")
def _token_entropy(entropy: torch.Tensor, logprob: torch.Tensor) -> torch.Tensor:
    return entropy


@ENTROPY_ESTIMATORS.register("surprisal")
def _surprisal(entropy: torch.Tensor, logprob: torch.Tensor) -> torch.Tensor:
    return -logprob


@dataclass(frozen=True)
class ScoreSpec:
    """What the IB-Score of a node reads (method.md §2): the sampler ranks candidates by it and
    the scoring stage reports it. ``entropy_estimator: token_entropy`` falls back to surprisal
    on trees without full entropies (``usable_estimator``)."""

    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    beta: float = 1.0
    ib_form: str = "h_plus_bi"
    entropy_estimator: str = "token_entropy"  # a name in ENTROPY_ESTIMATORS

    def __post_init__(self):
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (got {self.beta})")
        IB_FORMS.get(self.ib_form)
        ENTROPY_ESTIMATORS.get(self.entropy_estimator)


@dataclass
class Forest:
    """A batch of trees flattened to index tensors. Node rows follow each tree's node order."""

    parent: torch.Tensor  # (N,) long, -1 for roots
    tree: torch.Tensor  # (N,) long, tree index of each node
    root: torch.Tensor  # (N,) long, row of each node's root
    depth: torch.Tensor  # (N,) long, 0 for roots
    reward: torch.Tensor  # (N,) float, NaN where not a leaf
    is_leaf: torch.Tensor  # (N,) bool
    final: torch.Tensor  # (N,) bool
    tok_node: torch.Tensor  # (T,) long, node row of each step token (roots' prompt excluded)
    tok_entropy: torch.Tensor  # (T,) float, NaN where the engine gave none
    tok_logprob: torch.Tensor  # (T,) float
    offsets: list[int]  # first row of each tree
    num_trees: int

    @property
    def num_nodes(self) -> int:
        return self.parent.numel()

    @classmethod
    def from_trees(cls, trees: list[Tree]) -> "Forest":
        parent, depth, reward, leaf, final, tree_i, root, offsets = [], [], [], [], [], [], [], []
        n_tok, lps, ents = [], [], []
        nan = float("nan")
        for t, tr in enumerate(trees):
            off = len(parent)
            offsets.append(off)
            nodes = tr.nodes
            d = [0] * len(nodes)
            for n in nodes[1:]:
                d[n.id] = d[n.parent] + 1
            depth += d
            parent += [-1] + [off + n.parent for n in nodes[1:]]
            tree_i += [t] * len(nodes)
            root += [off] * len(nodes)
            for n in nodes:
                is_leaf = n.is_leaf
                leaf.append(is_leaf)
                final.append(n.final)
                reward.append(float(n.reward) if is_leaf else nan)
            n_tok += [0] + [len(n.tokens) for n in nodes[1:]]
            for n in nodes[1:]:
                lps += n.logprobs
                ents += n.entropies if n.entropies is not None else [nan] * len(n.tokens)
        tok_node = torch.repeat_interleave(torch.arange(len(parent)), _long(n_tok))
        return cls(_long(parent), _long(tree_i), _long(root), _long(depth), _f64(reward),
                   _bool(leaf), _bool(final), tok_node, _f64(ents), _f64(lps), offsets, len(trees))


# numpy converts long Python lists to arrays several times faster than torch.tensor does
def _long(x: list) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.int64).reshape(-1))


def _f64(x: list) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1))


def _bool(x: list) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.bool_).reshape(-1))


@dataclass
class TreeStats:
    """Per-node quantities of a forest, each (N,) float64 (NaN where undefined)."""

    n: torch.Tensor
    c: torch.Tensor
    V: torch.Tensor
    num_children: torch.Tensor  # (N,) long
    step_entropy: torch.Tensor  # mean per-token entropy (or surprisal) of the node's own step
    H: torch.Tensor
    I: torch.Tensor
    IB: torch.Tensor


def _scatter_sum(index: torch.Tensor, src: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=src.dtype).scatter_add_(0, index, src)


def subtree_sum(f: Forest, x: torch.Tensor) -> torch.Tensor:
    """(N,) the sum of ``x`` over each node and every node below it, pushed up depth by depth."""
    for d in range(int(f.depth.max()) if f.num_nodes else 0, 0, -1):
        rows = (f.depth == d).nonzero().squeeze(1)
        x = x.index_add(0, f.parent[rows], x[rows])
    return x


def group_mean_std(x: torch.Tensor, group: torch.Tensor, mask: torch.Tensor,
                   ddof: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of ``x`` over the ``mask``ed rows of each group (a tree),
    returned per row; ``ddof`` 1 for the sample standard deviation. A group with no masked row
    has mean 0; one with ``ddof`` or fewer rows, std 0."""
    num_groups = int(group.max()) + 1 if group.numel() else 0
    cnt = _scatter_sum(group, mask.double(), num_groups)
    mean = _scatter_sum(group, torch.where(mask, x, torch.zeros_like(x)), num_groups) / cnt.clamp(
        min=1)
    sq = torch.where(mask, (x - mean[group]) ** 2, torch.zeros_like(x))
    var = _scatter_sum(group, sq, num_groups) / (cnt - ddof).clamp(min=1)
    return mean[group], var.sqrt()[group]


def values(f: Forest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, c, V)``: leaves, correct leaves and V = c / n below every node, bottom-up."""
    n = subtree_sum(f, f.is_leaf.double())
    c = subtree_sum(f, torch.where(f.is_leaf, f.reward, torch.zeros_like(f.reward)))
    V = torch.where(n > 0, c / n.clamp(min=1), torch.zeros_like(n))
    return n, c, V


def usable_estimator(f: Forest, estimator: str) -> str:
    """``estimator``, or ``surprisal`` where it is ``token_entropy`` and some token of ``f`` has
    no entropy (an engine that returns log-probs only, GRPO's flat groups from vLLM)."""
    if estimator == "token_entropy" and torch.isnan(f.tok_entropy).any():
        return "surprisal"
    return estimator


def step_entropy(f: Forest, estimator: str) -> torch.Tensor:
    """(N,) mean per-token entropy of each node's own step; NaN for nodes with no tokens."""
    per_tok = ENTROPY_ESTIMATORS.get(estimator)(f.tok_entropy, f.tok_logprob)  # (T,)
    if torch.isnan(per_tok).any():
        raise ValueError(f"entropy_estimator {estimator} needs per-token entropies on every "
                         f"node; this tree lacks some: use entropy_estimator: surprisal")
    N = f.num_nodes
    total = _scatter_sum(f.tok_node, per_tok, N)
    count = _scatter_sum(f.tok_node, torch.ones_like(per_tok), N)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def compute_stats(f: Forest, beta: float = 1.0, ib_form: str = "h_plus_bi",
                  entropy_estimator: str = "token_entropy",
                  candidates: torch.Tensor | None = None) -> TreeStats:
    """Every method.md §2 quantity for every node of ``f``.

    ``candidates`` (N,) bool restricts the z-scoring of ``ib_form: zscore``; default: all nodes
    with children.
    """
    N = f.num_nodes
    n, c, V = values(f)
    child = (f.parent >= 0).nonzero().squeeze(1)  # rows that have a parent
    par = f.parent[child]
    num_children = torch.zeros(N, dtype=torch.long).index_add_(0, par, torch.ones_like(par))
    has_children = num_children > 0
    # H: mean over children (that have tokens) of their step's mean entropy
    se = step_entropy(f, entropy_estimator)
    ok = ~torch.isnan(se[child])
    h_sum = _scatter_sum(par[ok], se[child][ok], N)
    h_cnt = _scatter_sum(par[ok], torch.ones_like(se[child][ok]), N)
    nan = torch.full((N,), float("nan"), dtype=torch.float64)
    H = torch.where(has_children, torch.where(h_cnt > 0, h_sum / h_cnt.clamp(min=1), 0.0), nan)
    # I: sum_k w_k (V_k / V) log(V_k / V), w_k = n_k / sum_j n_j
    Vp = V[par]
    ratio = torch.where(Vp > 0, V[child] / Vp.clamp(min=1e-300), torch.zeros_like(Vp))
    xlogx = torch.where(
        ratio > 0, ratio * torch.log(ratio.clamp(min=1e-300)), torch.zeros_like(ratio)
    )
    n_sum = _scatter_sum(par, n[child], N)
    w = n[child] / n_sum[par].clamp(min=1e-300)
    I = _scatter_sum(par, w * xlogx, N)
    I = torch.where((num_children >= 2) & (V > 0), I.clamp(min=0.0), torch.zeros_like(I))
    I = torch.where(has_children, I, nan)
    cand = has_children if candidates is None else candidates & has_children
    IB = IB_FORMS.get(ib_form)(H, I, beta, f.tree, cand)
    IB = torch.where(has_children, IB, nan)
    return TreeStats(n, c, V, num_children, se, H, I, IB)


@IB_FORMS.register("h_plus_bi")
def _h_plus_bi(H, I, beta, tree, cand):
    return H + beta * I


@IB_FORMS.register("i_minus_bh")
def _i_minus_bh(H, I, beta, tree, cand):
    return I - beta * H


@IB_FORMS.register("zscore")
def _zscore(H, I, beta, tree, cand):
    """z(H) + beta z(I); mean and (population) std over the candidates of the same tree."""
    return _z(H, tree, cand) + beta * _z(I, tree, cand)


def _z(x: torch.Tensor, tree: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean, std = group_mean_std(x, tree, mask)
    return torch.where(std > 1e-12, (x - mean) / std.clamp(min=1e-12), torch.zeros_like(x))
