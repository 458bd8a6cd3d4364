"""Advantage estimators (method.md §4 and §6), registered by name, one signature:

    fn(forest: Forest, stats: TreeStats, spec: AdvantageSpec) -> (N,) float64 per-node advantage

Every token of step s gets the advantage of node s; roots get 0.

``ibtpo``: for a non-root node s with parent p and root r
    A_GL(s) = V(s) - V(r)
    A_IB(s), by ``local_advantage`` (registered in LOCAL_ADVANTAGES):
      log_ratio          clip(log(V(s) / V(p)), -2, 2)   (V(p) = 0 -> 0;  V(s) = 0 < V(p) -> -2)
      log_ratio_centred  log_ratio minus its leaf-weighted mean over the children of p,
                         sum_k n(k) A_IB(k) / n(p): sums to zero under p, as A_GL does. (The
                         plain log ratio's weighted mean is negative, by Jensen: a flat group with
                         rewards 1,0,0,0 gets per-leaf advantages summing to -4.61, a push down
                         on every sampled token.)
      diff               V(s) - V(p)  (TreeRL's local term)
      ib_info            i(s) - I(p), with i(s) = (V(s) / V(p)) log(V(s) / V(p)) the step's own term
                         of the relevance I(p) = sum_k w_k i(k) (method.md §2; 0 where V(p) = 0):
                         what the step tells about success, centred so that it sums to zero
                         (leaf-weighted) under p
      ib_trade           (h(s) - H_n(p)) + ib_beta (i(s) - I(p)): the step's centred share of
                         IB(p) = H(p) + beta I(p), h(s) its mean per-token entropy and H_n(p) the
                         leaf-weighted mean of its siblings' (H(p) weighs them alike); diversity
                         against information, both summing to zero (leaf-weighted) under p
    A(s)    = (A_GL(s) + alpha * A_IB(s)) / sqrt(n(s))
``tree_entropy`` (TreeRL-like): the same with local_advantage forced to ``diff``.
``grpo``: each leaf gets (r - mean) / (std + eps) over the leaves of its tree (its group; std
    is the unbiased sample std, as in verl); an internal node gets the mean of the leaves below
    it (GRPO trees are flat: root -> G leaves, so this only matters for probe trees).
``dr_grpo``: the same without the division by std (Dr. GRPO): r - mean.
``treerl`` (TreeRL's, Hou et al. 2025 §3.2): leaf rewards get a leave-one-out baseline within
    their tree, r'_i = r_i - mean_{j != i} r_j; V'(s) = the mean of r' over the leaves below s;
    A(s) = ((V'(s) - V'(p)) + V'(s)) / sqrt(n(s)). Since r'_i = n/(n-1) (r_i - mean) for a
    tree of n leaves, this is ``tree_entropy``'s A_GL + A_local scaled by n/(n-1).
``treepo`` (TreePO's subgroup advantage, Li et al. 2025 §3.3): a leaf i's advantage is the mean,
    over the subgroups it belongs to -- the leaves below the root and below each ancestor that
    branches (two or more children) -- of r_i minus the subgroup's mean reward; then divided
    by the std of the leaves' advantages over the whole batch (REINFORCE++ with a baseline, the
    reference's ``tree_reinforce_plus_plus_baseline``); an internal node gets the mean of the
    leaves below it, as ``grpo``'s.
``normalize: tree_std`` divides each tree's non-root advantages by their std (zeros if ~0).
A tree whose leaves all share one reward gets all-zero advantages under every estimator.
Pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ibtpo_core.algo.ib_score import Forest, TreeStats, group_mean_std, subtree_sum, values
from ibtpo_core.registry import Registry

ADVANTAGES: Registry[Callable] = Registry("advantage")
LOCAL_ADVANTAGES: Registry[Callable] = Registry("local_advantage")
A_IB_CLIP = 2.0
EPS = 1e-6


@dataclass(frozen=True)
class AdvantageSpec:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    name: str = "ibtpo"
    # diff (V(s) - V(p)), not SPEC's log-ratio: chosen on the validation split
    # (docs/results/local_term.md); every config and the tree-score command read this default
    local_advantage: Literal["log_ratio", "log_ratio_centred", "diff", "ib_info",
                             "ib_trade"] = "diff"
    alpha: float = 1.0
    ib_beta: float = 1.0  # ib_trade: the weight of the information term against diversity
    normalize: Literal["none", "tree_std"] = "none"

    def __post_init__(self):
        ADVANTAGES.get(self.name)  # an unknown name fails here, listing the valid ones


def global_advantage(f: Forest, V: torch.Tensor) -> torch.Tensor:
    """A_GL(s) = V(s) - V(root); 0 for roots."""
    return torch.where(f.parent >= 0, V - V[f.root], torch.zeros_like(V))


@dataclass(frozen=True)
class LocalContext:
    """What the IB variants read beyond V and n: the forest's statistics and ib_beta."""

    stats: TreeStats | None = None
    ib_beta: float = 1.0


@LOCAL_ADVANTAGES.register("diff")
def _diff(f: Forest, V: torch.Tensor, Vp: torch.Tensor, n: torch.Tensor,
          ctx: LocalContext) -> torch.Tensor:
    return V - Vp


@LOCAL_ADVANTAGES.register("log_ratio")
def _log_ratio(f: Forest, V: torch.Tensor, Vp: torch.Tensor, n: torch.Tensor,
               ctx: LocalContext | None = None) -> torch.Tensor:
    safe = torch.log(V.clamp(min=1e-300) / Vp.clamp(min=1e-300)).clamp(-A_IB_CLIP, A_IB_CLIP)
    return torch.where(Vp <= 0, torch.zeros_like(V), torch.where(V <= 0, -A_IB_CLIP, safe))


def _centred(f: Forest, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``a`` minus its ``weight``-weighted mean over the children of each node's parent."""
    nonroot = f.parent >= 0
    a = torch.where(nonroot, a, torch.zeros_like(a))
    p = f.parent.clamp(min=0)
    num = torch.zeros_like(a).index_add(0, p, torch.where(nonroot, weight * a, 0.0))
    den = torch.zeros_like(a).index_add(0, p, torch.where(nonroot, weight, 0.0))
    return a - num[p] / den[p].clamp(min=1e-300)


@LOCAL_ADVANTAGES.register("log_ratio_centred")
def _log_ratio_centred(f: Forest, V: torch.Tensor, Vp: torch.Tensor, n: torch.Tensor,
                       ctx: LocalContext) -> torch.Tensor:
    # leaf-weighted mean over the children of each parent: sum_k n(k) a(k) / sum_k n(k)
    return _centred(f, _log_ratio(f, V, Vp, n), n)


def _info_term(V: torch.Tensor, Vp: torch.Tensor) -> torch.Tensor:
    """i(s) = (V(s) / V(p)) log(V(s) / V(p)); 0 where V(p) = 0 or V(s) = 0 (0 log 0 = 0)."""
    ratio = torch.where(Vp > 0, V / Vp.clamp(min=1e-300), torch.zeros_like(V))
    return torch.where(ratio > 0, ratio * torch.log(ratio.clamp(min=1e-300)),
                       torch.zeros_like(V))


@LOCAL_ADVANTAGES.register("ib_info")
def _ib_info(f: Forest, V: torch.Tensor, Vp: torch.Tensor, n: torch.Tensor,
             ctx: LocalContext) -> torch.Tensor:
    return _centred(f, _info_term(V, Vp), n)  # the leaf-weighted mean of i over p's children: I(p)


@LOCAL_ADVANTAGES.register("ib_trade")
def _ib_trade(f: Forest, V: torch.Tensor, Vp: torch.Tensor, n: torch.Tensor,
              ctx: LocalContext) -> torch.Tensor:
    if ctx.stats is None:
        raise ValueError("local_advantage ib_trade needs the tree statistics (step entropies)")
    h = torch.nan_to_num(ctx.stats.step_entropy, nan=0.0)
    has = (~torch.isnan(ctx.stats.step_entropy)).to(V.dtype)
    diversity = _centred(f, h, has * n)  # h(s) - H_n(p), so that it sums to zero under p
    return diversity * has + ctx.ib_beta * _ib_info(f, V, Vp, n, ctx)


def local_advantage(f: Forest, V: torch.Tensor, kind: str, n: torch.Tensor,
                    stats: TreeStats | None = None, ib_beta: float = 1.0) -> torch.Tensor:
    """A_IB(s) of ``kind`` (a name in LOCAL_ADVANTAGES); 0 for roots. ``n``: leaves below each
    node (``TreeStats.n``; the centred terms weight by it); ``stats``: what ``ib_trade`` reads
    (the step entropies)."""
    fn = LOCAL_ADVANTAGES.get(kind)
    Vp = V[f.parent.clamp(min=0)]
    out = fn(f, V, Vp, n.to(V.dtype), LocalContext(stats, ib_beta))
    return torch.where(f.parent >= 0, out, torch.zeros_like(V))


def _tree_std_normalize(f: Forest, A: torch.Tensor) -> torch.Tensor:
    _, std = group_mean_std(A, f.tree, f.parent >= 0)
    return torch.where(std > EPS, A / std.clamp(min=EPS), torch.zeros_like(A))


def _tree_advantage(f: Forest, stats: TreeStats, local: str, spec: AdvantageSpec) -> torch.Tensor:
    A = global_advantage(f, stats.V) + spec.alpha * local_advantage(f, stats.V, local, stats.n,
                                                                    stats, spec.ib_beta)
    A = A / stats.n.clamp(min=1).sqrt()
    A = torch.where(f.parent >= 0, A, torch.zeros_like(A))
    return _tree_std_normalize(f, A) if spec.normalize == "tree_std" else A


@ADVANTAGES.register("ibtpo")
def ibtpo_advantage(f: Forest, stats: TreeStats, spec: AdvantageSpec) -> torch.Tensor:
    return _tree_advantage(f, stats, spec.local_advantage, spec)


@ADVANTAGES.register("tree_entropy")
def tree_entropy_advantage(f: Forest, stats: TreeStats, spec: AdvantageSpec) -> torch.Tensor:
    return _tree_advantage(f, stats, "diff", spec)


def _group_relative(f: Forest, stats: TreeStats, spec: AdvantageSpec, by_std: bool
                    ) -> torch.Tensor:
    """Each leaf's reward minus its group's (tree's) mean, divided by the group's sample std when
    ``by_std`` (0 where the rewards are all equal); an internal node gets the mean over the
    leaves below it."""
    leaf = f.is_leaf
    r = torch.where(leaf, f.reward, torch.zeros_like(f.reward))
    mean, std = group_mean_std(r, f.tree, leaf, ddof=1)
    if by_std:
        a_leaf = torch.where(leaf & (std > EPS), (r - mean) / (std + EPS), torch.zeros_like(r))
    else:
        a_leaf = torch.where(leaf, r - mean, torch.zeros_like(r))
    A = torch.where(leaf, a_leaf, subtree_sum(f, a_leaf) / stats.n.clamp(min=1))
    A = torch.where(f.parent >= 0, A, torch.zeros_like(A))
    return _tree_std_normalize(f, A) if spec.normalize == "tree_std" else A


@ADVANTAGES.register("grpo")
def grpo_advantage(f: Forest, stats: TreeStats, spec: AdvantageSpec) -> torch.Tensor:
    return _group_relative(f, stats, spec, by_std=True)


@ADVANTAGES.register("dr_grpo")
def dr_grpo_advantage(f: Forest, stats: TreeStats, spec: AdvantageSpec) -> torch.Tensor:
    """Dr. GRPO's advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training"): GRPO's
    without the division by the group's std, which up-weights groups that are nearly all
    right or all wrong."""
    return _group_relative(f, stats, spec, by_std=False)


@ADVANTAGES.register("treerl")
def treerl_advantage(f: Forest, stats: TreeStats, spec: AdvantageSpec) -> torch.Tensor:
    leaf = f.is_leaf
    r = torch.where(leaf, f.reward, torch.zeros_like(f.reward))
    ones = torch.where(leaf, 1.0, 0.0).double()
    total = torch.zeros(f.num_trees, dtype=torch.float64).index_add(0, f.tree, r)[f.tree]
    count = torch.zeros(f.num_trees, dtype=torch.float64).index_add(0, f.tree, ones)[f.tree]
    loo = torch.where(leaf & (count > 1), r - (total - r) / (count - 1).clamp(min=1),
                      torch.zeros_like(r))
    V = subtree_sum(f, loo) / stats.n.clamp(min=1)
    Vp = V[f.parent.clamp(min=0)]
    A = ((V - Vp) + V) / stats.n.clamp(min=1).sqrt()
    A = torch.where(f.parent >= 0, A, torch.zeros_like(A))
    return _tree_std_normalize(f, A) if spec.normalize == "tree_std" else A


@ADVANTAGES.register("treepo")
def treepo_advantage(f: Forest, stats: TreeStats, spec: AdvantageSpec) -> torch.Tensor:
    leaf = f.is_leaf
    r = torch.where(leaf, f.reward, torch.zeros_like(f.reward))
    mean = subtree_sum(f, r) / stats.n.clamp(min=1)  # each node's subgroup mean
    groups = (f.parent < 0) | (stats.num_children >= 2)  # the root and the branching nodes
    # top-down: over each node's strict ancestors that define a subgroup, sum of their means
    # and their count
    s_mean = torch.zeros_like(r)
    s_cnt = torch.zeros_like(r)
    for d in range(1, int(f.depth.max()) + 1 if f.num_nodes else 0):
        rows = (f.depth == d).nonzero().squeeze(1)
        p = f.parent[rows]
        g = groups[p].double()
        s_mean[rows] = s_mean[p] + g * mean[p]
        s_cnt[rows] = s_cnt[p] + g
    a_leaf = torch.where(leaf, (r * s_cnt - s_mean) / s_cnt.clamp(min=1), torch.zeros_like(r))
    std = a_leaf[leaf].std(unbiased=False) if bool(leaf.any()) else torch.tensor(0.0)
    a_leaf = a_leaf / std if float(std) > EPS else torch.zeros_like(a_leaf)
    A = torch.where(leaf, a_leaf, subtree_sum(f, a_leaf) / stats.n.clamp(min=1))
    A = torch.where(f.parent >= 0, A, torch.zeros_like(A))
    return _tree_std_normalize(f, A) if spec.normalize == "tree_std" else A


def compute_advantages(f: Forest, stats: TreeStats, spec: AdvantageSpec) -> torch.Tensor:
    return ADVANTAGES.get(spec.name)(f, stats, spec)


def eff_rate(f: Forest) -> float:
    """Share of trees whose leaves do not all have the same reward (method.md §6)."""
    if f.num_trees == 0:
        return 0.0
    num_trees = f.num_trees
    big = torch.where(f.is_leaf, f.reward, torch.full_like(f.reward, -1e300))
    small = torch.where(f.is_leaf, f.reward, torch.full_like(f.reward, 1e300))
    hi = torch.full((num_trees,), -1e300, dtype=torch.float64).scatter_reduce(
        0, f.tree, big, "amax"
    )
    lo = torch.full((num_trees,), 1e300, dtype=torch.float64).scatter_reduce(
        0, f.tree, small, "amin"
    )
    return float(((hi - lo) > 0).double().mean())


__all__ = ["ADVANTAGES", "LOCAL_ADVANTAGES", "AdvantageSpec", "compute_advantages", "eff_rate",
           "values"]
