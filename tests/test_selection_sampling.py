"""Candidate rule, selection and the IBTree loop against a scripted engine."""

import math

import pytest
import torch

from ibtpo_core.algo.ib_score import Forest, compute_stats
from ibtpo_core.algo.samplers import sample
from ibtpo_core.algo.sampling import TreeSpec, within_budget
from ibtpo_core.algo.selection import candidate_mask, covered_mass, rank_candidates
from ibtpo_core.algo.tree import Tree
from ibtpo_core.engines.base import Completion, RolloutEngine, StopConditions

NL, EOS = 3, 1


def tree_for_selection() -> Tree:
    """
    0 root: children 1, 2 (B_root decides whether it may grow)
    1 (H from children 3, 4): children 3 (r=1), 4 (r=0)   -> I = ln 2, two children
    2: one child 5 (r=1)                                    -> I = 0
    """
    t = Tree([9])
    t.add_node(0, [10, NL], [-0.1, -0.1], [0.1, 0.1])
    t.add_node(0, [11, NL], [-0.1, -0.1], [0.1, 0.1])
    t.add_node(1, [12, EOS], [-0.1, -0.1], [0.2, 0.2], reward=1.0, final=True)
    t.add_node(1, [13, EOS], [-0.1, -0.1], [0.4, 0.4], reward=0.0, final=True)
    t.add_node(2, [14, EOS], [-0.1, -0.1], [2.0, 2.0], reward=1.0, final=True)
    return t


def test_candidates_follow_b_max_b_root_and_final():
    f = Forest.from_trees([tree_for_selection()])
    s = compute_stats(f)
    assert candidate_mask(f, s, B_max=3, B_root=8).tolist() == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    assert candidate_mask(f, s, B_max=2, B_root=2).tolist() == [
        False,
        False,
        True,
        False,
        False,
        False,
    ]


def test_select_by_each_rule():
    f = Forest.from_trees([tree_for_selection()])
    s = compute_stats(f)
    g = torch.Generator().manual_seed(0)
    cand = candidate_mask(f, s, 3, 8)
    # H(1) = mean(0.2, 0.4) = 0.3, I(1) = ln 2 -> IB 0.993;  H(2) = 2.0, I(2) = 0 -> IB 2.0
    # H(0) = mean(0.1, 0.1) = 0.1, I(0) = w(2/3)(0.5/(2/3))ln(0.75)+(1/3)(1.5)ln 1.5 -> small
    def pick(by, k=1, select="greedy", temperature=1.0):  # the tree's k best, in row order
        return sorted(rank_candidates(f, s, cand, by, select, temperature, g)[0][:k])

    assert pick("ib") == [2]
    assert pick("entropy") == [2]
    assert pick("relevance") == [1]
    assert pick("ib", k=2) == [1, 2]
    assert len(pick("random", k=2)) == 2
    many = {tuple(pick("ib", select="softmax", temperature=100.0)) for _ in range(50)}
    assert len(many) > 1  # a hot softmax explores
    with pytest.raises(ValueError, match="Valid names: entropy, ib, random, relevance"):
        pick("ibb")


class ScriptedEngine(RolloutEngine):
    """Emits steps '<a> NL' then EOS; the step token depends on the prefix length and a counter
    so branches differ. Records every request."""

    def __init__(self):
        self.calls = []
        self.count = 0

    @property
    def max_context(self):
        return 512

    def load_weights(self, path):
        pass

    def begin_call(self, seed):
        """Called once per engine call (a seeded policy reseeds here)."""

    def step_token(self, depth):
        return 20 + (self.count + depth) % 5

    def _generate(self, prefixes, num_samples, temperature, limits, stop, seed):
        self.calls.append((prefixes, num_samples, limits, stop.stop_at_step_end))
        self.begin_call(seed)
        out = []
        for i, (p, lim) in enumerate(zip(prefixes, limits)):
            for _ in range(num_samples):
                self.count += 1
                toks = []
                while len(toks) < lim:
                    depth = sum(1 for x in p + toks if x == NL)
                    if depth >= 3:
                        toks.append(EOS)
                        break
                    toks += [self.step_token(depth), NL]
                    if stop.stop_at_step_end:
                        break
                toks = toks[:lim]
                reason = (
                    "eos"
                    if toks and toks[-1] == EOS
                    else ("step_end" if stop.stop_at_step_end else "length")
                )
                out.append(Completion(i, toks, [self.token_logprob(x) for x in toks],
                                      [1.0] * len(toks), reason))
        return out

    def token_logprob(self, token):
        """The log-prob reported for a sampled token (a made-up constant here)."""
        return -0.5


def score_even(i, toks):
    return float(sum(toks) % 2 == 0)


def test_ibtree_spends_the_budget_and_reports_accounting():
    eng = ScriptedEngine()
    stop = StopConditions((EOS,), (NL,))
    prompts = [[100 + k] for k in range(4)]
    spec = TreeSpec(G=8)
    r = sample("ibtree", eng, prompts, spec, score_even, stop, 32, 1.0, 0)
    m = r.metrics
    # iteration 1: M = G/2 = 4 samples a prompt, each 3 steps of 2 tokens + EOS = 7 tokens
    assert eng.calls[0][1] == 4 and m["tree/mean_response_tokens"] == 7.0
    assert m["tree/budget_tokens"] == 8 * 7
    assert 1 < m["tree/iterations"] <= 4
    # tokens held by the trees: each decoded token at most once (a repeated step merges into
    # its twin, decoded but not stored), so never more than what was decoded
    stored = sum(len(n.tokens) for t in r.trees for n in t.nodes[1:])
    assert 0 < stored <= m["tree/decoded_tokens"]
    # the rounds and the budget fill together spend the budget: within 5% of 4 x 8 x 7 tokens
    assert m["tree/decoded_tokens"] == pytest.approx(4 * 56, rel=0.05)
    assert m["tree/leaves_per_budget"] >= 1.0
    for t in r.trees:
        assert all(len(n.children) <= 3 for n in t.nodes[1:])
    # branches start from prefixes of existing paths, and their limits shrink with depth
    for _prefixes, n, limits, _ in eng.calls[1:]:
        assert n == 1 and all(lim <= 32 for lim in limits)
    assert 0 < m["tree/shared_prefix_frac"] < 1
    assert m["tree/num_leaves"] > 4
    # where the rounds branched, by depth: shares that add up to one, and their mean
    shares = [m[f"tree/pick_depth_{k}"] for k in ("0", "1", "2plus")]
    assert sum(shares) == pytest.approx(1.0)
    picks = [(t, node) for t in r.trees for _, node in t.meta["picks"]]
    depth = [len(t.path(node)) for t, node in picks]  # the root's path is empty: depth 0
    assert m["tree/pick_depth_mean"] == pytest.approx(sum(depth) / len(depth))
    assert m["tree/pick_depth_0"] == pytest.approx(depth.count(0) / len(depth))


def test_independent_sampler_builds_flat_groups():
    eng = ScriptedEngine()
    stop = StopConditions((EOS,), (NL,))
    r = sample("independent", eng, [[100], [101]], TreeSpec(sampler="independent", G=6), score_even,
               stop, 32, 1.0, 0)
    assert all(len(t.root.children) == 6 and len(t.leaves()) == 6 for t in r.trees)
    assert r.metrics["tree/leaves_per_budget"] == pytest.approx(1.0)
    assert r.metrics["tree/decoded_per_budget"] == pytest.approx(1.0)
    assert r.metrics["tree/shared_prefix_frac"] == 0.0


class RepetitiveEngine(ScriptedEngine):
    """A confident policy: each step is token 20 with probability 0.6, else one of 21..24
    (seeded per call), then NL; EOS after three steps. Branches often repeat a sibling's first
    step."""

    def begin_call(self, seed):
        import random

        self.rng = random.Random(seed)

    def step_token(self, depth):
        return 20 if self.rng.random() < 0.6 else self.rng.randint(21, 24)


def test_dedup_siblings_makes_branches_differ_from_their_siblings():
    stop = StopConditions((EOS,), (NL,))
    frac = {}
    for dedup in (False, True):
        eng = RepetitiveEngine()
        spec = TreeSpec(G=8, dedup_siblings=dedup, max_resamples=6)
        r = sample(
            "ibtree", eng, [[100 + k] for k in range(16)], spec, score_even, stop, 32, 1.0, 0
        )
        frac[dedup] = r.metrics["tree/identical_sibling_frac"]
        if dedup:
            assert any(step for *_, step in eng.calls[1:])  # first steps sampled to the step end
    # without dedup most branches repeat a sibling's first step (0.6 of the mass on one token)
    assert frac[False] > 0.4
    # with it, only those still duplicates after 6 resamples (under 0.9^7 = 0.48 for a node
    # whose siblings cover 0.9 of the mass, far less for most)
    assert frac[True] < 0.5 * frac[False]


class OneStepEngine(ScriptedEngine):
    """Answers in one step: a token then EOS, no step delimiter (short arithmetic answers)."""

    def _generate(self, prefixes, num_samples, temperature, limits, stop, seed):
        self.calls.append((prefixes, num_samples, limits, stop.stop_at_step_end))
        out = []
        for i, _ in enumerate(prefixes):
            for _ in range(num_samples):
                self.count += 1
                toks = [20 + self.count % 5, EOS]
                out.append(Completion(i, toks, [-0.5, -0.1], [1.0, 0.1], "eos"))
        return out


@pytest.mark.parametrize("kwargs", [dict(), dict(B_root=4, dedup_siblings=True)])
def test_one_step_answers_still_spend_the_budget(kwargs):
    """No inner node to branch from: the root's B_root caps the rounds (at 4 leaves with the old
    ibtpo preset) and the budget fill draws the rest from the root, as GRPO would."""
    stop = StopConditions((EOS,), (NL,))
    prompts = [[100 + k] for k in range(4)]
    r = sample(
        "ibtree", OneStepEngine(), prompts, TreeSpec(G=8, **kwargs), score_even, stop, 32, 1.0, 0
    )
    g = sample("independent", OneStepEngine(), prompts, TreeSpec(sampler="independent", G=8),
               score_even, stop, 32, 1.0, 0)
    assert all(len(t.leaves()) == 8 for t in r.trees)
    assert r.metrics["tree/leaves_per_budget"] == pytest.approx(1.0)
    assert r.metrics["tree/decoded_tokens"] == pytest.approx(
        g.metrics["tree/decoded_tokens"], rel=0.05
    )
    # without the fill: B_root 4 stops at 4 leaves; B_root 8 at 7, as the last round rounds
    # 8 tokens left / (3 rounds x 2 tokens) down to one pick a round
    short = 4 if kwargs else 7
    unfilled = sample(
        "ibtree",
        OneStepEngine(),
        prompts,
        TreeSpec(G=8, fill_budget=False, **kwargs),
        score_even,
        stop,
        32,
        1.0,
        0,
    )
    assert all(len(t.leaves()) == short for t in unfilled.trees)
    assert unfilled.metrics["tree/leaves_per_budget"] == pytest.approx(short / 8)
    assert r.metrics["tree/fill_samples"] == 8 - short


def test_tree_and_independent_sampling_decode_the_same_tokens():
    stop = StopConditions((EOS,), (NL,))
    prompts = [[100 + k] for k in range(8)]
    tree = sample("ibtree", ScriptedEngine(), prompts, TreeSpec(G=8), score_even, stop, 32, 1.0, 0)
    flat = sample("independent", ScriptedEngine(), prompts, TreeSpec(sampler="independent", G=8),
                  score_even, stop, 32, 1.0, 0)
    assert tree.metrics["tree/decoded_tokens"] == pytest.approx(
        flat.metrics["tree/decoded_tokens"], rel=0.05
    )


def test_min_branch_entropy_drops_forced_steps_from_the_candidates():
    """Node 1's children begin with entropies 0.2 and 0.4 (mean 0.3); node 2's child with 2.0.
    With min_branch_entropy 0.5, node 1 is no candidate (a forced next step), node 2 and the
    root still are."""
    from ibtpo_core.algo.selection import branch_entropy

    f = Forest.from_trees([tree_for_selection()])
    s = compute_stats(f)
    be = branch_entropy(f)
    assert be[0].item() == pytest.approx(0.1) and be[1].item() == pytest.approx(0.3)
    assert be[2].item() == pytest.approx(2.0) and torch.isnan(be[3])
    assert candidate_mask(f, s, 3, 8, min_branch_entropy=0.5).tolist() == [
        True,
        False,
        True,
        False,
        False,
        False,
    ]
    assert candidate_mask(f, s, 3, 8, min_branch_entropy=0.0).tolist() == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    # selection ranks only the candidates it is given: by relevance node 1 (I = ln 2) leads,
    # then the root (I = 0.059), then node 2 (I = 0); without node 1, the root leads
    g = torch.Generator().manual_seed(0)
    assert rank_candidates(f, s, candidate_mask(f, s, 3, 8), "relevance", "greedy", 1.0, g) == [
        [1, 0, 2]
    ]
    forced_out = candidate_mask(f, s, 3, 8, min_branch_entropy=0.5)
    assert rank_candidates(f, s, forced_out, "relevance", "greedy", 1.0, g) == [[0, 2]]
    # surprisal: -log pi_old of each child's first token (all -0.1 here): 0.1 < 0.5 everywhere
    assert candidate_mask(f, s, 3, 8, 0.5, "surprisal").tolist() == [
        True,
        False,
        False,
        False,
        False,
        False,
    ]


@pytest.mark.parametrize("kwargs,match", [
    (dict(G=1), "G must be >= 2"), (dict(B_max=1), "B_max must be >= 2"),
    (dict(select_by="ibb"), "Valid names"),
    (dict(budget_tokens=-5), "budget_tokens must be positive"),
    (dict(min_branch_entropy=-0.1), "min_branch_entropy must be >= 0"),
])
def test_bad_tree_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TreeSpec(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=-0.5), "beta must be >= 0"), (dict(ib_form="x"), "unknown ib_form 'x'"),
    (dict(entropy_estimator="entropy"), "unknown entropy_estimator 'entropy'"),
])
def test_bad_score_specs(kwargs, match):
    from ibtpo_core.algo.ib_score import ScoreSpec

    with pytest.raises(ValueError, match=match):
        ScoreSpec(**kwargs)


def test_forced_steps_are_never_branched_in_the_sampler():
    """The scripted policy's first tokens all have entropy 1.0: with min_branch_entropy 1.5 only
    the root may grow, so every branch, drawn at random among the candidates, is at the root
    (the candidates the picks are sized by are the ones they are drawn from)."""
    stop = StopConditions((EOS,), (NL,))
    spec = TreeSpec(G=8, min_branch_entropy=1.5, select_by="random")
    r = sample("ibtree", ScriptedEngine(), [[100 + k] for k in range(4)], spec, score_even, stop,
               32, 1.0, 0)
    picks = [node for t in r.trees for _round, node in t.meta["picks"]]
    assert picks and set(picks) == {0}
    assert r.metrics["tree/leaves_per_budget"] == pytest.approx(1.0)


def test_within_budget_rounds_to_the_nearest_pick_in_rank_order():
    """Picks in rank order while at most half of the next one falls beyond the round's share
    (remaining / rounds left); the first whenever half of it fits in all that is left."""
    cost = {10: 10.0, 11: 10.0, 12: 10.0, 13: 30.0, 14: 2.0}
    order = [10, 11, 12]
    # last round, 24 left: 10 (5 <= 24), 11 (10 + 5 <= 24), not 12 (20 + 5 > 24)
    assert within_budget(order, cost, 24.0, 1) == [10, 11]
    # 25 left: 12 too (20 + 5 <= 25): 30 tokens, over by half a pick
    assert within_budget(order, cost, 25.0, 1) == [10, 11, 12]
    # two rounds left, 24 tokens: a share of 12 holds one pick (10 + 5 > 12)
    assert within_budget(order, cost, 24.0, 2) == [10]
    # 4 left over 3 rounds: half a pick (5) does not fit, so none; 6 left: one
    assert within_budget(order, cost, 4.0, 3) == []
    assert within_budget(order, cost, 6.0, 3) == [10]
    # the best candidate is expensive: taken (15 <= 20), and nothing cheaper after it
    assert within_budget([13, 14], cost, 20.0, 1) == [13]
    assert within_budget([13, 14], cost, 14.0, 1) == []


@pytest.mark.parametrize("engine", [ScriptedEngine, RepetitiveEngine])
def test_trees_end_within_half_a_pick_of_their_budget(engine):
    """Continuation lengths are exact here (7 - 2 x depth tokens), so every tree ends within half
    its costliest pick (a root sample, 7 tokens) of its 56-token budget, over or under."""
    stop = StopConditions((EOS,), (NL,))
    r = sample("ibtree", engine(), [[100 + k] for k in range(16)], TreeSpec(G=8), score_even,
               stop, 32, 1.0, 0)
    assert r.metrics["tree/budget_tokens"] == 56
    assert all(abs(t.meta["decoded_tokens"] - 56) <= 3.5 for t in r.trees)
    decoded = sum(t.meta["decoded_tokens"] for t in r.trees)
    assert r.metrics["tree/decoded_tokens"] == decoded
    assert r.metrics["tree/decoded_per_budget"] == pytest.approx(decoded / (16 * 56))


def tree_for_cover() -> Tree:
    """Log-probs are those of a real policy here, so each child's step probability is exact:
    0 root: 1 A [10 NL] p 0.5, 2 B [11 NL] p 0.3 * 0.9 = 0.27          -> covered 0.77
    1 A: 3 [12 NL] p 0.6, 4 [12 NL EOS] p 0.6 * 0.5 (inside 3's event), 5 [13 EOS] p 0.2
                                                                        -> covered 0.8
    2 B: 6 [15 EOS] p 0.25                                              -> covered 0.25
    3: 7 [14 EOS] p 0.9                                                 -> covered 0.9
    """
    ln = math.log
    t = Tree([9])
    t.add_node(0, [10, NL], [ln(0.5), 0.0], [1.0, 0.0])
    t.add_node(0, [11, NL], [ln(0.3), ln(0.9)], [1.0, 0.3])
    t.add_node(1, [12, NL], [ln(0.6), 0.0], [0.9, 0.0])
    t.add_node(1, [12, NL, EOS], [ln(0.6), 0.0, ln(0.5)], [0.9, 0.0, 0.7], reward=1.0, final=True)
    t.add_node(1, [13, EOS], [ln(0.2), 0.0], [0.9, 0.0], reward=0.0, final=True)
    t.add_node(2, [15, EOS], [ln(0.25), 0.0], [1.2, 0.0], reward=1.0, final=True)
    t.add_node(3, [14, EOS], [ln(0.9), 0.0], [0.3, 0.0], reward=0.0, final=True)
    return t


def test_covered_mass_sums_the_childrens_step_probabilities_once():
    cov = covered_mass([tree_for_cover(), tree_for_selection()])
    # A's [12 NL EOS] extends [12 NL]: 0.6 + 0.2, not 0.6 + 0.3 + 0.2
    assert cov[:8].tolist() == pytest.approx([0.77, 0.8, 0.25, 0.9, 0, 0, 0, 0])
    assert cov.shape == (8 + 6,)  # rows as Forest.from_trees, the second tree after the first


def test_max_branch_cover_drops_nodes_whose_children_cover_the_next_step():
    f = Forest.from_trees([tree_for_cover()])
    s = compute_stats(f)
    cov = covered_mass([tree_for_cover()])
    base = [True, True, True, True, False, False, False, False]  # B_max 4: A (3 children) too
    assert candidate_mask(f, s, 4, 8).tolist() == base
    assert candidate_mask(f, s, 4, 8, covered=cov, max_branch_cover=1.0).tolist() == base
    # 0.85: node 3 (0.9) out, A (0.8) in; 0.8: A out as well; the root (0.77) always may grow
    assert candidate_mask(f, s, 4, 8, covered=cov, max_branch_cover=0.85).tolist() == [
        True, True, True, False, False, False, False, False]
    assert candidate_mask(f, s, 4, 8, covered=cov, max_branch_cover=0.8).tolist() == [
        True, False, True, False, False, False, False, False]
    assert candidate_mask(f, s, 4, 8, covered=cov, max_branch_cover=0.2).tolist() == [
        True, False, False, False, False, False, False, False]
    with pytest.raises(ValueError, match="covered_mass"):
        candidate_mask(f, s, 4, 8, max_branch_cover=0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="max_branch_cover must be in"):
            TreeSpec(max_branch_cover=bad)


class HonestRepetitiveEngine(RepetitiveEngine):
    """RepetitiveEngine's policy with its true log-probs: ln 0.6 for token 20, ln 0.1 for each of
    21..24, 0 for NL and EOS (they follow with probability 1)."""

    def token_logprob(self, token):
        return {20: math.log(0.6)}.get(token, math.log(0.1) if 21 <= token <= 24 else 0.0)


def test_expected_identical_frac_predicts_the_repeats_and_the_cover_rule_cuts_them():
    """With true log-probs, the picks' covered mass predicts the share of branches that repeat a
    sibling's first step (measured on 64 prompts); max_branch_cover 0.5 keeps branches off nodes
    whose children hold half the next step (any with the 0.6 token), so repeats fall, and the
    budget is still spent."""
    stop = StopConditions((EOS,), (NL,))
    prompts = [[100 + k] for k in range(64)]
    m = {}
    for cover in (1.0, 0.5):
        spec = TreeSpec(G=8, max_branch_cover=cover)
        m[cover] = sample("ibtree", HonestRepetitiveEngine(), prompts, spec, score_even, stop, 32,
                          1.0, 0).metrics
    off = m[1.0]
    assert off["tree/identical_sibling_frac"] > 0.4
    assert off["tree/expected_identical_frac"] == pytest.approx(
        off["tree/identical_sibling_frac"], abs=0.06)
    on = m[0.5]
    assert on["tree/identical_sibling_frac"] < off["tree/identical_sibling_frac"] - 0.1
    assert on["tree/expected_identical_frac"] < off["tree/expected_identical_frac"] - 0.1
    assert on["tree/leaves_per_budget"] >= 1.0
    assert on["tree/decoded_tokens"] == pytest.approx(off["tree/decoded_tokens"], rel=0.05)


def test_select_cost_moves_picks_from_the_root_to_cheaper_mid_path_nodes():
    """tree_for_selection: by IB, node 2 (IB 2.0) ranks before node 1 (0.993) and the root; a
    penalty of each row's cost reorders them, and in the sampler a positive select_cost takes
    picks deeper on average (a pick at the root costs a whole response)."""
    f = Forest.from_trees([tree_for_selection()])
    s = compute_stats(f)
    g = torch.Generator().manual_seed(0)
    cand = candidate_mask(f, s, 3, 8)
    assert rank_candidates(f, s, cand, "ib", "greedy", 1.0, g)[0] == [2, 1, 0]
    penalty = torch.tensor([0.0, 0.0, 1.5, 0, 0, 0], dtype=torch.float64)  # 2.0 - 1.5 < 0.993
    assert rank_candidates(f, s, cand, "ib", "greedy", 1.0, g, penalty)[0] == [1, 2, 0]
    stop = StopConditions((EOS,), (NL,))
    depth = {}
    for cost in (0.0, 5.0):
        r = sample("ibtree", RepetitiveEngine(), [[100 + k] for k in range(16)],
                   TreeSpec(G=8, select_cost=cost), score_even, stop, 32, 1.0, 0)
        depth[cost] = r.metrics["tree/pick_depth_mean"]
    assert depth[5.0] > depth[0.0]
    with pytest.raises(ValueError, match="select_cost"):
        TreeSpec(select_cost=-1.0)
