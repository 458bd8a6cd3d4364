"""The peers' methods (method.md §6) on hand-worked examples: TreeRL's token-level forks and
advantage, TreePO's segment tree and subgroup advantage, DAPO's overlong penalty and dynamic
sampling, the loss aggregations (Dr. GRPO's constant normaliser), each beside GRPO's."""

import math

import pytest
import torch

from ibtpo_core.algo.advantages import AdvantageSpec, compute_advantages
from ibtpo_core.algo.eptree import fork_candidates, make_forks
from ibtpo_core.algo.filter_groups import FilterSpec, informative, next_draw_size
from ibtpo_core.algo.ib_score import Forest, compute_stats
from ibtpo_core.algo.losses import LossSpec, agg_units, aggregate
from ibtpo_core.algo.reward_shaping import RewardSpec, overlong_penalty, shaped_reward
from ibtpo_core.algo.samplers import sample
from ibtpo_core.algo.sampling import TreeSpec
from ibtpo_core.algo.tree import Tree, training_sequences
from ibtpo_core.algo.treepo import widths
from ibtpo_core.engines.base import StopConditions
from ibtpo_core.rl import grow_informative
from tests.test_selection_sampling import EOS, NL, RepetitiveEngine, ScriptedEngine, score_even


def three_leaves() -> Tree:
    """root -> a (-> l1 r=1, l2 r=0), root -> l3 r=0."""
    t = Tree([9])
    a = t.add_node(0, [10, NL], [-0.1, -0.1])
    t.add_node(a, [11, EOS], [-0.1, -0.1], reward=1.0, final=True)
    t.add_node(a, [12, EOS], [-0.1, -0.1], reward=0.0, final=True)
    t.add_node(0, [13, NL, 14, EOS], [-0.1] * 4, reward=0.0, final=True)
    return t


def advantages(tree: Tree, name: str) -> list[float]:
    f = Forest.from_trees([tree])
    stats = compute_stats(f, entropy_estimator="surprisal")
    return compute_advantages(f, stats, AdvantageSpec(name=name)).tolist()


def test_hand_worked_treerl_advantage_is_tree_entropys_scaled_by_n_over_n_minus_1():
    # leave-one-out: r' = 1 - 0 = 1, 0 - 0.5 = -0.5, 0 - 0.5 = -0.5;  V'(a) = 0.25, V'(root) = 0
    # A(a) = ((0.25 - 0) + 0.25) / sqrt 2;  A(l1) = (1 - 0.25) + 1 = 1.75;  A(l2) = -1.25;
    # A(l3) = (-0.5 - 0) - 0.5 = -1
    got = advantages(three_leaves(), "treerl")
    assert got == pytest.approx([0.0, 0.5 / math.sqrt(2), 1.75, -1.25, -1.0])
    # tree_entropy (V = 1/3 at the root): the same times (n - 1) / n = 2/3
    assert advantages(three_leaves(), "tree_entropy") == pytest.approx([g * 2 / 3 for g in got])
    # GRPO on the same leaves: one group, every leaf against mean 1/3 and std sqrt(1/3)
    grpo = advantages(three_leaves(), "grpo")
    assert grpo[4] == pytest.approx((0 - 1 / 3) / math.sqrt(1 / 3), abs=1e-5)
    assert grpo[4] == pytest.approx(grpo[3])  # l2 and l3: one reward, one GRPO advantage,
    assert got[3] != pytest.approx(got[4])  # but not one TreeRL advantage (l2's parent won)


def test_hand_worked_treepo_advantage_averages_the_subgroups():
    # subgroups: the root's (mean 1/3) and a's (mean 1/2; a branches)
    # l1: ((1 - 1/3) + (1 - 1/2)) / 2 = 7/12;  l2: ((0 - 1/3) + (0 - 1/2)) / 2 = -5/12;
    # l3: (0 - 1/3) / 1 = -1/3; divided by their population std over the batch
    raw = [7 / 12, -5 / 12, -1 / 3]
    std = torch.tensor(raw, dtype=torch.float64).std(unbiased=False).item()
    got = advantages(three_leaves(), "treepo")
    leaves = [r / std for r in raw]
    assert got == pytest.approx([0.0, (leaves[0] + leaves[1]) / 2, *leaves])
    assert std == pytest.approx(0.45305, abs=1e-5)
    # GRPO gives l2 and l3 one advantage (one reward, one group); the subgroups tell them apart
    assert got[3] < got[4]


def test_split_cuts_a_step_before_a_token_and_keeps_every_path():
    t = three_leaves()
    paths = sorted(tuple(t.response_tokens(leaf.id)) for leaf in t.leaves())
    head, remap = t.split(4, 2)  # l3 = [13, NL, 14, EOS] -> [13, NL] + [14, EOS]
    assert t.nodes[head].tokens == [13, NL] and t.nodes[head].reward is None
    tail = t.nodes[t.nodes[head].children[0]]
    assert tail.tokens == [14, EOS] and tail.reward == 0.0 and tail.final
    assert all(n.parent is None or n.parent < n.id for n in t.nodes)  # parents first
    assert sorted(tuple(t.response_tokens(leaf.id)) for leaf in t.leaves()) == paths
    assert remap[1] == 1 and len(t.nodes) == 6
    with pytest.raises(ValueError, match="inside node"):
        t.split(head, 0)


def test_fork_candidates_take_the_most_surprising_tokens_of_each_response():
    t = Tree([9])
    a = t.add_node(0, [10, 11, NL], [-0.2, -2.0, -0.1])
    t.add_node(a, [12, EOS], [-3.0, -0.1], reward=1.0, final=True)  # final: never forked
    b = t.add_node(0, [13, 14, NL], [-5.0, -0.3, -1.0])  # -5.0: a response's first token
    t.add_node(b, [15, 16, NL, 17, EOS], [-0.1, -0.9, -0.1, -0.1, -0.1], reward=0.0)
    got = [(round(s, 2), n.id, j) for s, n, j, _ in fork_candidates(t, top_n=2)]
    # chain a: 11 (2.0) and its NL (0.1) -- 10 is its first token, 12 in the final step;
    # chain b: the NL after 14 (1.0) and 16 (0.9) -- 15 may fork (b has one child), but at 0.1
    assert got == [(2.0, 1, 1), (1.0, 3, 2), (0.9, 4, 1), (0.1, 1, 2)]
    hangs = make_forks(t, [(n, j) for _, n, j, _ in fork_candidates(t, top_n=2)])
    # each fork hangs from the prefix ending just before its token
    assert [t.response_tokens(h.id) for h in hangs] == [[10], [13, 14], [13, 14, NL, 15],
                                                        [10, 11]]


def test_two_forks_in_one_node_hang_from_the_right_pieces():
    t = Tree([9])
    a = t.add_node(0, [10, 11, 12, 13, EOS], [-1.0] * 5, reward=1.0, final=False)
    node = t.nodes[a]
    hangs = make_forks(t, [(node, 3), (node, 1)])
    assert [t.response_tokens(h.id) for h in hangs] == [[10, 11, 12], [10]]
    assert [n.tokens for n in t.nodes[1:]] == [[10], [11, 12], [13, EOS]]


class Surprising(RepetitiveEngine):
    def token_logprob(self, token):
        return -0.1 * (token % 7) - 0.05


def test_eptree_forks_within_its_budget_and_beside_grpo():
    stop = StopConditions((EOS,), (NL,))
    prompts = [[100 + k] for k in range(8)]
    spec = TreeSpec(sampler="eptree", G=8, C=2)
    r = sample("eptree", Surprising(), prompts, spec, score_even, stop, 32, 1.0, 0)
    g = sample("independent", Surprising(), prompts, TreeSpec(sampler="independent", G=8),
               score_even, stop, 32, 1.0, 0)
    m = r.metrics
    # the forks share prefixes: more leaves than GRPO's 8 at about its tokens
    assert m["tree/num_leaves"] > 8 and m["tree/shared_prefix_frac"] > 0
    assert m["tree/decoded_tokens"] == pytest.approx(g.metrics["tree/decoded_tokens"], rel=0.2)
    for t in r.trees:
        assert all(n.parent is None or n.parent < n.id for n in t.nodes)
        assert t.meta["picks"] and all(rnd == 2 for rnd, _ in t.meta["picks"])  # L = C - 1
        for seq in training_sequences(t, [0.0] * len(t.nodes)):
            assert len(seq.tokens) <= 32


def test_treepo_widths_branch_while_the_tree_has_room():
    assert widths(3, 0, 8, 2) == [2, 2, 2]
    assert widths(4, 1, 8, 2) == [2, 2, 2, 1]
    assert widths(8, 0, 8, 2) == [1] * 8


def test_treepo_grows_segments_up_to_g_leaves_then_fills():
    stop = StopConditions((EOS,), (NL,))
    spec = TreeSpec(sampler="treepo", G=8, M=2, segment_tokens=3, fill_budget=False)
    r = sample("treepo", ScriptedEngine(), [[100 + k] for k in range(4)], spec, score_even, stop,
               32, 1.0, 0)
    for t in r.trees:
        assert len(t.leaves()) <= 8
        assert all(len(n.tokens) <= 3 for n in t.nodes[1:])
        assert len(t.root.children) == 2
    assert r.metrics["tree/shared_prefix_frac"] > 0.3
    filled = sample("treepo", ScriptedEngine(), [[100 + k] for k in range(4)],
                    TreeSpec(sampler="treepo", G=8, M=2, segment_tokens=3), score_even, stop, 32,
                    1.0, 0)
    assert filled.metrics["tree/decoded_per_budget"] == pytest.approx(1.0, abs=0.15)


def test_treepo_stops_a_path_whose_segment_repeats():
    class Repeats(ScriptedEngine):
        def step_token(self, depth):
            return 20  # every step "20 NL": the second segment repeats the first

    stop = StopConditions((EOS,), (NL,))
    spec = TreeSpec(sampler="treepo", G=4, M=1, segment_tokens=2, fill_budget=False)
    r = sample("treepo", Repeats(), [[100]], spec, score_even, stop, 32, 1.0, 0)
    assert r.metrics["tree/repetition_stops"] > 0
    assert max(len(r.trees[0].response_tokens(leaf.id)) for leaf in r.trees[0].leaves()) == 4


def test_hand_worked_overlong_penalty():
    # L = 40, B = 8: no penalty up to 32 tokens, then linear down to -1 at 40
    assert [overlong_penalty(n, 40, 8) for n in (20, 32, 36, 40, 41)] == [0, 0, -0.5, -1, -1]
    assert overlong_penalty(40, 40, 0) == 0.0
    spec = RewardSpec(overlong_buffer_frac=0.2, overlong_factor=0.5)
    assert shaped_reward(1.0, 38, 40, spec) == pytest.approx(1.0 - 0.5 * 0.75)
    with pytest.raises(ValueError, match="overlong_buffer_frac"):
        RewardSpec(overlong_buffer_frac=1.5)


def test_hand_worked_loss_aggregations():
    pg = torch.tensor([[2.0, 9.0, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    assert float(aggregate(pg, mask, LossSpec())) == pytest.approx(5 / 4)  # token mean
    assert float(aggregate(pg, mask, LossSpec(agg="seq_mean_token_mean"))) == pytest.approx(1.5)
    # Dr. GRPO: the token sum over B x a constant, 2 x 4
    spec = LossSpec(agg="seq_sum_norm", agg_tokens=4)
    assert float(aggregate(pg, mask, spec)) == pytest.approx(5 / 8)
    assert agg_units([1, 3, 0], LossSpec()) == 4 and agg_units([1, 3, 0], spec) == 2
    with pytest.raises(ValueError, match="agg_tokens"):
        aggregate(pg, mask, LossSpec(agg="seq_sum_norm"))


def test_dr_grpo_constant_normaliser_keeps_long_answers_weight():
    """Under the token mean a token of the long response weighs as much as the short one's; under
    GRPO's per-sequence mean the short response's one token weighs 3x; Dr. GRPO's constant
    gives every token 1 / (B x L), whatever the lengths."""
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.ones(2, 3)
    grads = {}
    for agg in ("token_mean", "seq_mean_token_mean", "seq_sum_norm"):
        logp.grad = None
        spec = LossSpec(name="cispo", agg=agg, agg_tokens=3)
        from ibtpo_core.algo.losses import policy_loss

        value, _ = policy_loss(logp, logp.detach(), adv, mask, spec)
        value.backward()
        grads[agg] = (-logp.grad[0, 0].item(), -logp.grad[1, 0].item())
    assert grads["token_mean"] == pytest.approx((1 / 4, 1 / 4))
    assert grads["seq_mean_token_mean"] == pytest.approx((1 / 2, 1 / 6))
    assert grads["seq_sum_norm"] == pytest.approx((1 / 6, 1 / 6))


def tree_with(rewards: list[float]) -> Tree:
    t = Tree([9])
    for r in rewards:
        t.add_node(0, [10, EOS], [-0.1, -0.1], reward=r, final=True)
    return t


def test_informative_groups_and_draw_sizes():
    assert informative(tree_with([0.0, 1.0])) and not informative(tree_with([1.0, 1.0]))
    assert next_draw_size(8, 0, 0) == 8
    assert next_draw_size(6, 2, 8) == 24  # a keep rate of 1/4: 6 / 0.25
    assert next_draw_size(6, 0, 8) == 24  # none kept yet: at most 4x
    assert next_draw_size(4, 6, 8) == 6  # 4 / 0.75, rounded up


def test_dynamic_sampling_refills_uniform_groups_and_counts_every_token():
    """Draw 1: 4 prompts, half informative; draw 2 asks for 2 / 0.5 = 4 more. Every draw's tokens
    count, the dropped groups' too."""
    rows = [{"id": i} for i in range(100)]
    calls = []

    def grow(batch, draw):
        calls.append(len(batch))
        trees = [tree_with([0.0, 1.0] if (draw + i) % 2 == 0 else [1.0, 1.0])
                 for i in range(len(batch))]
        return trees, {"tree/decoded_tokens": 10.0 * len(batch), "reward": 0.5}

    trees, kept_rows, m = grow_informative(grow, rows, 3, 4, 0, FilterSpec(enabled=True))
    assert calls == [4, 4] and len(trees) == 4 and all(informative(t) for t in trees)
    assert m["tree/decoded_tokens"] == 80.0 and m["filter/draws"] == 2
    assert m["filter/dropped_frac"] == 0.5 and len(kept_rows) == 4
    assert [t.meta["prompt_index"] for t in trees] == [0, 1, 2, 3]
    # a token cap stops the refills: the first draw already spent it
    calls.clear()
    trees, _, m = grow_informative(grow, rows, 3, 4, 0, FilterSpec(enabled=True), token_cap=40)
    assert calls == [4] and len(trees) == 2 and m["tree/decoded_tokens"] == 40.0


def test_nothing_informative_keeps_the_first_draw():
    def grow(batch, draw):
        return [tree_with([1.0, 1.0]) for _ in batch], {"tree/decoded_tokens": 1.0}

    trees, rows, m = grow_informative(grow, [{"id": 0}], 0, 2, 0, FilterSpec(True, max_draws=3))
    assert len(trees) == 2 and m["filter/draws"] == 3 and m["filter/kept_groups"] == 0
