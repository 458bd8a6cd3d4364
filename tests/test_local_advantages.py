"""The local advantage variants on hand-worked groups: sums, signs, and the same group under
GRPO (issue 12, item 3)."""
from __future__ import annotations

import math

import pytest
import torch

from ibtpo_core.algo.advantages import LOCAL_ADVANTAGES, AdvantageSpec, compute_advantages
from ibtpo_core.algo.ib_score import Forest, compute_stats
from ibtpo_core.algo.tree import Tree

LN4 = math.log(4.0)


def flat_group(rewards: list[float]) -> Tree:
    """root -> one one-step leaf per reward (a GRPO group, or a tree's first round)."""
    t = Tree([9])
    for k, r in enumerate(rewards):
        t.add_node(0, [10 + k], [-0.1], [0.5], reward=r, final=True)
    return t


def leaf_advantages(tree: Tree, name: str, local: str = "log_ratio") -> list[float]:
    f = Forest.from_trees([tree])
    A = compute_advantages(f, compute_stats(f), AdvantageSpec(name, local))
    return [float(A[leaf.id]) for leaf in tree.leaves()]


# rewards 1,0,0,0: V(root) = 0.25; A_GL = 0.75, -0.25, -0.25, -0.25; n = 1 for every leaf
#   log_ratio:  A_IB = ln(1/0.25) = ln 4 = 1.3863 for the right leaf, -2 (clip) for the others
#               A = 0.75 + 1.3863 = 2.1363 and -0.25 - 2 = -2.25 (x3); sum = 2.1363 - 6.75 = -4.6137
#   centred:    weighted mean of A_IB = (1.3863 - 6) / 4 = -1.1534; A_IB - mean = 2.5397, -0.8466
#               A = 0.75 + 2.5397 = 3.2897 and -0.25 - 0.8466 = -1.0966 (x3); sum = 0
#   diff:       A_IB = V - V(p) = A_GL; A = 1.5 and -0.5 (x3); sum = 0
#   grpo:       mean 0.25, unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5;
#               A = 0.75 / 0.5 = 1.5 and -0.25 / 0.5 = -0.5 (x3); sum = 0
@pytest.mark.parametrize("name,local,expected", [
    ("ibtpo", "log_ratio", [0.75 + LN4] + [-2.25] * 3),
    ("ibtpo", "log_ratio_centred", [0.75 + LN4 - (LN4 - 6) / 4] + [-0.25 - 2 - (LN4 - 6) / 4] * 3),
    ("ibtpo", "diff", [1.5, -0.5, -0.5, -0.5]),
    ("grpo", "log_ratio", [1.5, -0.5, -0.5, -0.5]),
])
def test_a_flat_group_with_one_success(name, local, expected):
    got = leaf_advantages(flat_group([1, 0, 0, 0]), name, local)
    assert got == pytest.approx(expected, abs=1e-5)  # grpo divides by std + 1e-6


def test_sums_and_signs_on_the_same_group():
    g = flat_group([1, 0, 0, 0])
    sums = {local: sum(leaf_advantages(g, "ibtpo", local)) for local in LOCAL_ADVANTAGES.names()}
    assert sums["log_ratio"] == pytest.approx(
        0.75 + LN4 - 6.75, abs=1e-6
    )  # -4.6137: a net push down
    assert sums["log_ratio_centred"] == pytest.approx(0.0, abs=1e-9)
    assert sums["diff"] == pytest.approx(0.0, abs=1e-9)
    assert sum(leaf_advantages(g, "grpo")) == pytest.approx(0.0, abs=1e-9)
    # every variant rewards the right answer and penalises the wrong ones, as GRPO does
    for local in LOCAL_ADVANTAGES.names():
        a = leaf_advantages(g, "ibtpo", local)
        assert a[0] > 0 and all(x < 0 for x in a[1:]), local


def test_centred_sums_to_zero_under_every_parent_of_a_deep_tree():
    """root -> a (leaves r=1, r=0), b (leaf r=0 via one step): the local term weighted by leaves
    sums to zero over the children of the root and of a."""
    t = Tree([9])
    a = t.add_node(0, [10, 3], [-0.1, -0.1], [0.5, 0.5])
    t.add_node(a, [11, 1], [-0.1, -0.1], [0.5, 0.5], reward=1.0, final=True)
    t.add_node(a, [12, 1], [-0.1, -0.1], [0.5, 0.5], reward=0.0, final=True)
    b = t.add_node(0, [13, 3], [-0.1, -0.1], [0.5, 0.5])
    t.add_node(b, [14, 1], [-0.1, -0.1], [0.5, 0.5], reward=0.0, final=True)
    f = Forest.from_trees([t])
    stats = compute_stats(f)
    from ibtpo_core.algo.advantages import local_advantage

    loc = local_advantage(f, stats.V, "log_ratio_centred", stats.n)
    for p in (0, a):
        kids = t.nodes[p].children
        assert sum(float(stats.n[k]) * float(loc[k]) for k in kids) == pytest.approx(0.0, abs=1e-9)
    # V(root) = 1/3, V(a) = 1/2, V(b) = 0: raw log ratios ln(1.5) = 0.4055 and -2, weights 2, 1
    # mean = (2 * 0.4055 - 2) / 3 = -0.3963; centred: 0.8018 and -1.6037
    assert float(loc[a]) == pytest.approx(math.log(1.5) - (2 * math.log(1.5) - 2) / 3, abs=1e-9)
    assert float(loc[b]) == pytest.approx(-2 - (2 * math.log(1.5) - 2) / 3, abs=1e-9)


@pytest.mark.parametrize("rewards", [[0, 0, 0, 0], [1, 1, 1, 1]])
def test_all_equal_rewards_give_zero_under_every_variant(rewards):
    for local in LOCAL_ADVANTAGES.names():
        assert leaf_advantages(flat_group(rewards), "ibtpo", local) == [0.0] * 4, local


def test_an_unknown_variant_lists_the_valid_ones():
    from ibtpo_core.algo.advantages import local_advantage

    f = Forest.from_trees([flat_group([1, 0])])
    with pytest.raises(ValueError, match="diff, ib_info, ib_trade, log_ratio, log_ratio_centred"):
        local_advantage(f, torch.zeros(3, dtype=torch.float64), "log_ratios", compute_stats(f).n)


def test_tree_score_names_the_valid_variants_for_a_misspelt_one(tmp_path, capsys):
    import json

    from ibtpo.cli import main

    path = tmp_path / "tree.json"
    path.write_text(json.dumps(flat_group([1, 0, 0, 0]).to_json()))
    assert main(["tree-score", str(path), "--local-advantage", "log_ratio_centered"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "diff, ib_info, ib_trade, log_ratio, log_ratio_centred" in captured.err
    assert main(["tree-score", str(path), "--local-advantage", "log_ratio_centred"]) == 0


def test_grpo_advantage_on_a_tree_by_hand():
    # root -> a -> {l1 r=1, l2 r=0}; root -> l3 r=0 (the ablation's GRPO advantage on trees)
    # leaves 1, 0, 0: mean 1/3, unbiased std = sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.57735
    # l1 = (2/3) / 0.57735 = 1.1547, l2 = l3 = -(1/3) / 0.57735 = -0.57735
    # a: the mean over the leaves below it = (1.1547 - 0.57735) / 2 = 0.28868
    t = Tree([9])
    a = t.add_node(0, [10], [-0.1], [0.5])
    l1 = t.add_node(a, [11], [-0.1], [0.5], reward=1.0, final=True)
    l2 = t.add_node(a, [12], [-0.1], [0.5], reward=0.0, final=True)
    l3 = t.add_node(0, [13], [-0.1], [0.5], reward=0.0, final=True)
    f = Forest.from_trees([t])
    A = compute_advantages(f, compute_stats(f), AdvantageSpec("grpo"))
    assert float(A[l1]) == pytest.approx(1.1547, abs=1e-4)
    assert float(A[l2]) == float(A[l3]) == pytest.approx(-0.57735, abs=1e-4)
    assert float(A[a]) == pytest.approx(0.28868, abs=1e-4) and float(A[0]) == 0.0


def ib_tree() -> Tree:
    """root -> a (h 0.1) -> {l1 r=1 (h 0.2), l2 r=0 (h 0.4)};  root -> l3 r=0 (h 0.5)."""
    t = Tree([9])
    a = t.add_node(0, [10, 3], [-0.1, -0.1], [0.1, 0.1])
    t.add_node(a, [11, 1], [-0.1, -0.1], [0.2, 0.2], reward=1.0, final=True)
    t.add_node(a, [12, 1], [-0.1, -0.1], [0.4, 0.4], reward=0.0, final=True)
    t.add_node(0, [13, 3, 14, 1], [-0.1] * 4, [0.5] * 4, reward=0.0, final=True)
    return t


# V(root) = 1/3, V(a) = 1/2, V(l1) = 1, V(l2) = V(l3) = 0; nodes in order root, a, l1, l2, l3
#   i(s) = (V(s)/V(p)) ln(V(s)/V(p)):  i(a) = 1.5 ln 1.5 = 0.608198, i(l3) = 0,
#                                      i(l1) = 2 ln 2 = 1.386294, i(l2) = 0
#   I(root) = (2/3) 0.608198 = 0.405465;  I(a) = (1/2) 1.386294 = 0.693147
#   ib_info = i - I(p):  a 0.202733, l3 -0.405465, l1 0.693147, l2 -0.693147
#   h - H_n(p), leaf-weighted: H_n(root) = (2 x 0.1 + 0.5) / 3 = 0.233333, H_n(a) = 0.3:
#             a -0.133333, l3 +0.266667, l1 -0.1, l2 +0.1
#   ib_trade (ib_beta 1): a 0.069400, l3 -0.138798, l1 0.593147, l2 -0.593147
#   diff = V(s) - V(p): a 1/6, l3 -1/3, l1 1/2, l2 -1/2
IB_LOCAL = {
    "ib_info": [0.0, 0.202733, 0.693147, -0.693147, -0.405465],
    "ib_trade": [0.0, 0.069400, 0.593147, -0.593147, -0.138798],
    "diff": [0.0, 1 / 6, 0.5, -0.5, -1 / 3],
}


@pytest.mark.parametrize("local", list(IB_LOCAL))
def test_hand_worked_ib_objective_local_terms(local):
    from ibtpo_core.algo.advantages import local_advantage

    f = Forest.from_trees([ib_tree()])
    stats = compute_stats(f)
    got = local_advantage(f, stats.V, local, stats.n, stats).tolist()
    assert got == pytest.approx(IB_LOCAL[local], abs=1e-6)
    # every variant sums to zero under each parent, leaf-weighted (n(a) = 2)
    assert 2 * got[1] + got[4] == pytest.approx(0.0, abs=1e-6)
    assert got[2] + got[3] == pytest.approx(0.0, abs=1e-6)
    # the full advantage: (A_GL + A_IB) / sqrt(n); l1's A_GL = 2/3
    A = compute_advantages(f, stats, AdvantageSpec("ibtpo", local))
    assert float(A[2]) == pytest.approx(2 / 3 + IB_LOCAL[local][2], abs=1e-6)


def test_ib_trade_weighs_information_against_diversity():
    """ib_beta 0 leaves the diversity term alone: the high-entropy step wins although it failed;
    a large ib_beta makes the information term decide."""
    from ibtpo_core.algo.advantages import local_advantage

    f = Forest.from_trees([ib_tree()])
    stats = compute_stats(f)
    only_h = local_advantage(f, stats.V, "ib_trade", stats.n, stats, ib_beta=0.0).tolist()
    assert only_h[3] > only_h[2] and only_h[3] == pytest.approx(0.1)
    mostly_i = local_advantage(f, stats.V, "ib_trade", stats.n, stats, ib_beta=10.0).tolist()
    assert mostly_i[2] > 0 > mostly_i[3]
    with pytest.raises(ValueError, match="tree statistics"):
        local_advantage(f, stats.V, "ib_trade", stats.n)
