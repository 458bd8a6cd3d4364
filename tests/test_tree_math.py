"""Values, IB-Score and advantages: hand-worked trees, the vectorised code against a loop,
properties, degenerate and malformed input."""
import json
import math
import random

import pytest
import torch

from ibtpo_core.algo.advantages import AdvantageSpec, compute_advantages, eff_rate
from ibtpo_core.algo.ib_score import Forest, ScoreSpec, compute_stats
from ibtpo_core.algo.tree import Tree, split_steps, training_sequences
from ibtpo_core.algo.tree_score import score_tree
from tests.tree_reference import reference

LN15, LN2 = math.log(1.5), math.log(2.0)


def hand_tree() -> Tree:
    """
    0 root (prompt)
    ├── 1  entropies [0.5, 1.5] (mean 1.0)
    │   ├── 3  leaf r=1, entropies [0.2]       (mean 0.2)
    │   └── 4  leaf r=0, entropies [0.6, 1.0]  (mean 0.8)
    └── 2  entropies [2.0] (mean 2.0)
        └── 5  leaf r=0, entropies [1.0]
    """
    t = Tree([7, 8, 9])
    t.add_node(0, [10, 11], [-0.1, -0.2], [0.5, 1.5])
    t.add_node(0, [12], [-0.3], [2.0])
    t.add_node(1, [13], [-0.4], [0.2], reward=1.0, final=True)
    t.add_node(1, [14, 15], [-0.5, -0.7], [0.6, 1.0], reward=0.0, final=True)
    t.add_node(2, [16], [-1.0], [1.0], reward=0.0, final=True)
    return t


def test_hand_worked_values_and_ib_score():
    s = score_tree(hand_tree())["nodes"]
    # n: leaves below; c: correct leaves below; V = c / n
    assert [x["n"] for x in s] == [3, 2, 1, 1, 1, 1]
    assert [x["c"] for x in s] == [1, 1, 0, 1, 0, 0]
    assert [x["V"] for x in s] == pytest.approx([1 / 3, 0.5, 0.0, 1.0, 0.0, 0.0])
    # H(0) = mean(1.0, 2.0) = 1.5; H(1) = mean(0.2, 0.8) = 0.5; H(2) = 1.0 (one child)
    assert [s[i]["H"] for i in range(3)] == pytest.approx([1.5, 0.5, 1.0])
    # I(0): w = (2/3, 1/3), V_k / V = (0.5 / (1/3), 0) = (1.5, 0): 2/3 * 1.5 * ln 1.5 = ln 1.5
    # I(1): w = (1/2, 1/2), V_k / V = (2, 0): 1/2 * 2 * ln 2 = ln 2;   I(2) = 0 (one child)
    assert [s[i]["I"] for i in range(3)] == pytest.approx([LN15, LN2, 0.0])
    assert [s[i]["IB"] for i in range(3)] == pytest.approx([1.5 + LN15, 0.5 + LN2, 1.0])
    assert all(s[i][k] is None for i in (3, 4, 5) for k in ("H", "I", "IB"))


def test_hand_worked_ibtpo_advantages():
    s = score_tree(hand_tree(), adv=AdvantageSpec(local_advantage="log_ratio"))["nodes"]
    assert s[0]["A"] is None and s[0]["A_GL"] is None
    # node 1: A_GL = 0.5 - 1/3 = 1/6; A_IB = ln(0.5 / (1/3)) = ln 1.5; A = (1/6 + ln 1.5) / sqrt 2
    # node 2: A_GL = -1/3; V = 0 < V(p) -> A_IB = -2; A = -7/3
    # node 3: A_GL = 2/3; A_IB = ln(1 / 0.5) = ln 2; A = 2/3 + ln 2
    # node 4: A_GL = -1/3; A_IB = -2 (V = 0 < 0.5); A = -7/3
    # node 5: A_GL = -1/3; V(p) = 0 -> A_IB = 0; A = -1/3
    assert [s[i]["A_GL"] for i in range(1, 6)] == pytest.approx(
        [1 / 6, -1 / 3, 2 / 3, -1 / 3, -1 / 3]
    )
    assert [s[i]["A_IB"] for i in range(1, 6)] == pytest.approx([LN15, -2, LN2, -2, 0])
    assert [s[i]["A"] for i in range(1, 6)] == pytest.approx(
        [(1 / 6 + LN15) / math.sqrt(2), -7 / 3, 2 / 3 + LN2, -7 / 3, -1 / 3])


def test_hand_worked_diff_surprisal_beta_alpha():
    t = hand_tree()
    s = score_tree(t, ScoreSpec(beta=2.0, entropy_estimator="surprisal"),
                   AdvantageSpec(local_advantage="diff", alpha=0.5))["nodes"]
    # surprisal step means: node1 (0.1 + 0.2) / 2 = 0.15, node2 0.3, node3 0.4, node4 0.6, node5 1.0
    # H(0) = mean(0.15, 0.3) = 0.225; H(1) = mean(0.4, 0.6) = 0.5; H(2) = 1.0
    assert [s[i]["H"] for i in range(3)] == pytest.approx([0.225, 0.5, 1.0])
    assert [s[i]["IB"] for i in range(3)] == pytest.approx([0.225 + 2 * LN15, 0.5 + 2 * LN2, 1.0])
    # diff: node1 1/6 + 0.5 * (0.5 - 1/3) = 1/4, / sqrt 2; node3 2/3 + 0.5 * 0.5 = 11/12
    assert s[1]["A"] == pytest.approx(0.25 / math.sqrt(2))
    assert s[3]["A"] == pytest.approx(11 / 12)
    assert s[4]["A"] == pytest.approx(-1 / 3 + 0.5 * -0.5)


def test_ib_forms():
    f = Forest.from_trees([hand_tree()])
    a = compute_stats(f, beta=1.0, ib_form="i_minus_bh")
    assert a.IB[:3].tolist() == pytest.approx([LN15 - 1.5, LN2 - 0.5, 0.0 - 1.0])
    z = compute_stats(f, beta=1.0, ib_form="zscore")
    # z over the three internal nodes: H = (1.5, 0.5, 1.0) -> mean 1, pop. std sqrt(1/6)
    zh = [(h - 1.0) / math.sqrt(1 / 6) for h in (1.5, 0.5, 1.0)]
    i = [LN15, LN2, 0.0]
    mi = sum(i) / 3
    si = math.sqrt(sum((x - mi) ** 2 for x in i) / 3)
    assert z.IB[:3].tolist() == pytest.approx([a + (b - mi) / si for a, b in zip(zh, i)])
    with pytest.raises(ValueError, match="Valid names: h_plus_bi, i_minus_bh, zscore"):
        compute_stats(f, ib_form="h_plus_i")


def test_grpo_advantage_hand_worked():
    # flat group: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); A = +-0.5 / 0.57735
    t = Tree([1])
    for r in (1.0, 0.0, 0.0, 1.0):
        t.add_node(0, [2, 3], [-0.1, -0.1], [0.1, 0.1], reward=r)
    f = Forest.from_trees([t])
    A = compute_advantages(f, compute_stats(f), AdvantageSpec("grpo"))
    assert A.tolist() == pytest.approx([0, 0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    assert float(A.sum()) == pytest.approx(0.0, abs=1e-9)


def test_dr_grpo_drops_the_std_and_so_weighs_lopsided_groups_less():
    # group 1: rewards 1, 0, 0, 0 -> mean 0.25: A = 0.75, -0.25, -0.25, -0.25 (Dr. GRPO);
    # GRPO divides by the sample std sqrt(0.25) = 0.5: 1.5, -0.5, -0.5, -0.5.
    # group 2: rewards 1, 1, 0, 0 -> +-0.5 (Dr. GRPO); std sqrt(1/3): +-0.866 (GRPO).
    # So GRPO gives group 1's right answer 1.5 / 0.866 = 1.73x group 2's; Dr. GRPO 1.5x.
    trees = []
    for rewards in ((1.0, 0.0, 0.0, 0.0), (1.0, 1.0, 0.0, 0.0)):
        t = Tree([1])
        for r in rewards:
            t.add_node(0, [2], [-0.1], [0.1], reward=r)
        trees.append(t)
    f = Forest.from_trees(trees)
    dr = compute_advantages(f, compute_stats(f), AdvantageSpec("dr_grpo")).tolist()
    grpo = compute_advantages(f, compute_stats(f), AdvantageSpec("grpo")).tolist()
    assert dr == pytest.approx([0, 0.75, -0.25, -0.25, -0.25, 0, 0.5, 0.5, -0.5, -0.5])
    assert grpo == pytest.approx([0, 1.5, -0.5, -0.5, -0.5, 0, 0.866025, 0.866025, -0.866025,
                                  -0.866025], abs=1e-5)


def random_tree(rng: random.Random, max_depth=6, max_children=4) -> Tree:
    t = Tree([1, 2])
    frontier = [(0, 0)]
    while frontier:
        node, d = frontier.pop()
        k = rng.randint(1, max_children) if d < rng.randint(1, max_depth) else 0
        if node == 0:
            k = max(k, 1)
        for _ in range(k):
            n_tok = rng.randint(0 if d > 0 else 1, 4)
            child = t.add_node(node, [rng.randint(3, 50) for _ in range(n_tok)],
                               [-rng.random() * 3 for _ in range(n_tok)],
                               [rng.random() * 2 for _ in range(n_tok)])
            frontier.append((child, d + 1))
    for n in t.nodes:
        if n.is_leaf:
            n.reward = float(rng.random() < 0.4)
    return t


@pytest.mark.parametrize("estimator,local", [("token_entropy", "log_ratio"), ("surprisal", "diff")])
def test_vectorised_matches_the_loop_on_random_trees(estimator, local):
    rng = random.Random(0)
    trees = [random_tree(rng) for _ in range(300)]
    f = Forest.from_trees(trees)
    stats = compute_stats(f, beta=0.7, entropy_estimator=estimator)
    A = compute_advantages(f, stats, AdvantageSpec("ibtpo", local_advantage=local, alpha=1.3))
    exp = {k: [] for k in ("n", "c", "V", "H", "I", "IB", "A")}
    for t in trees:
        ref = reference(t, beta=0.7, estimator=estimator, local=local, alpha=1.3)
        for i in range(len(t.nodes)):
            for k in exp:
                v = ref[i][k]
                exp[k].append(float("nan") if v is None else (0.0 if k == "A" and v is None else v))
    exp["A"] = [0.0 if math.isnan(x) else x for x in exp["A"]]
    got = {
        "n": stats.n,
        "c": stats.c,
        "V": stats.V,
        "H": stats.H,
        "I": stats.I,
        "IB": stats.IB,
        "A": A,
    }
    assert max(len(t.nodes) for t in trees) > 20 and max(int(f.depth.max()), 0) >= 5
    for k in exp:
        torch.testing.assert_close(got[k], torch.tensor(exp[k], dtype=torch.float64),
                                   equal_nan=True, atol=1e-9, rtol=1e-9, msg=k)


def test_properties_on_random_trees():
    rng = random.Random(1)
    trees = [random_tree(rng) for _ in range(200)]
    f = Forest.from_trees(trees)
    s = compute_stats(f)
    inner = s.num_children > 0
    assert bool((s.I[inner] >= 0).all())
    assert bool((s.I[s.num_children == 1] == 0).all())
    # V(parent) = sum_k w_k V(child_k), w_k = n_k / n(parent)
    child = (f.parent >= 0).nonzero().squeeze(1)
    wsum = torch.zeros(f.num_nodes, dtype=torch.float64).index_add_(
        0, f.parent[child], s.n[child] * s.V[child])
    torch.testing.assert_close(wsum[inner] / s.n[inner], s.V[inner])
    # GRPO advantages of a group sum to 0 (flat trees)
    flat = []
    for _ in range(50):
        t = Tree([1])
        for _ in range(rng.randint(2, 8)):
            t.add_node(0, [5], [-0.2], [0.3], reward=float(rng.random() < 0.5))
        flat.append(t)
    ff = Forest.from_trees(flat)
    A = compute_advantages(ff, compute_stats(ff), AdvantageSpec("grpo"))
    sums = torch.zeros(len(flat), dtype=torch.float64).index_add_(0, ff.tree, A)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-9, rtol=0)


def test_i_is_zero_when_children_share_one_value():
    t = Tree([1])
    a = t.add_node(0, [2], [-0.1], [0.1])
    b = t.add_node(0, [3], [-0.1], [0.1])
    for p in (a, b):  # each child: one right, one wrong leaf -> V = 0.5 for both
        t.add_node(p, [4], [-0.1], [0.1], reward=1.0)
        t.add_node(p, [5], [-0.1], [0.1], reward=0.0)
    s = compute_stats(Forest.from_trees([t]))
    assert float(s.I[0]) == 0.0 and float(s.I[a]) == pytest.approx(math.log(2))


@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_all_rewards_equal_give_zero_advantage_and_no_effective_tree(reward):
    t = hand_tree()
    for n in t.nodes:
        if n.is_leaf:
            n.reward = reward
    f = Forest.from_trees([t])
    s = compute_stats(f)
    for name in ("ibtpo", "tree_entropy", "grpo"):
        for norm in ("none", "tree_std"):
            A = compute_advantages(f, s, AdvantageSpec(name, normalize=norm))
            assert A.abs().max() == 0.0, (name, norm)
    assert float(s.I.nan_to_num().abs().max()) == 0.0
    assert eff_rate(f) == 0.0
    assert eff_rate(Forest.from_trees([t, hand_tree()])) == 0.5


def test_one_leaf_tree_and_a_node_without_tokens():
    t = Tree([1, 2])
    mid = t.add_node(0, [], [], [])  # a node with no tokens
    t.add_node(mid, [3], [-0.5], [0.7], reward=1.0)
    s = score_tree(t)["nodes"]
    assert [x["n"] for x in s] == [1, 1, 1] and [x["V"] for x in s] == [1.0, 1.0, 1.0]
    assert s[0]["H"] == 0.0  # the only child has no tokens: no entropy to average
    assert s[1]["H"] == pytest.approx(0.7) and s[1]["I"] == 0.0
    assert [x["A"] for x in s[1:]] == [0.0, 0.0]
    seqs = training_sequences(t, [0.0, 0.0, 0.0])
    assert len(seqs) == 1 and seqs[0].tokens == [3] and seqs[0].step_ids == [2]


def test_tree_std_normalisation():
    f = Forest.from_trees([hand_tree()])
    s = compute_stats(f)
    raw = compute_advantages(f, s, AdvantageSpec("ibtpo"))
    norm = compute_advantages(f, s, AdvantageSpec("ibtpo", normalize="tree_std"))
    std = raw[1:].std(unbiased=False)
    torch.testing.assert_close(norm[1:], raw[1:] / std)
    assert float(norm[0]) == 0.0


def test_training_sequences_carry_step_advantages():
    t = hand_tree()
    adv = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    seqs = training_sequences(t, adv)
    assert [s.tokens for s in seqs] == [[10, 11, 13], [10, 11, 14, 15], [12, 16]]
    assert seqs[1].advantages == [0.1, 0.1, 0.4, 0.4] and seqs[1].step_ids == [1, 1, 4, 4]
    assert seqs[1].old_logprobs == [-0.1, -0.2, -0.5, -0.7] and seqs[1].reward == 0.0
    assert seqs[0].prompt == [7, 8, 9]


def test_split_steps():
    NL = 3
    # steps end at the newline; a 1-token trailing EOS (9) merges into the last step
    assert split_steps([5, 6, NL, 7, 8, NL, 9], {NL}, 2, 100) == [(0, 3), (3, 7)]
    # min_step_tokens 3: "5 NL" is too short and merges into the next step
    assert split_steps([5, NL, 6, 7, NL], {NL}, 3, 100) == [(0, 5)]
    # max_step_tokens 2 cuts long steps
    assert split_steps([1, 2, 4, 5, 6], {NL}, 1, 2) == [(0, 2), (2, 4), (4, 5)]
    assert split_steps([], {NL}, 1, 5) == []


def test_insert_merges_equal_steps_and_keeps_duplicate_leaves():
    NL = 3
    t = Tree([1])
    a = [5, NL, 6, NL, 9]
    b = [5, NL, 7, NL, 9]
    la = t.insert(0, a, [-0.1] * 5, None, 1.0, split_steps(a, {NL}, 2, 99))
    lb = t.insert(0, b, [-0.2] * 5, None, 0.0, split_steps(b, {NL}, 2, 99))
    assert len(t.root.children) == 1 and t.nodes[la].parent == t.nodes[lb].parent
    lc = t.insert(0, a, [-0.1] * 5, None, 1.0, split_steps(a, {NL}, 2, 99))
    assert lc not in (la, lb) and t.nodes[lc].parent == t.nodes[la].parent
    assert len(t.leaves()) == 3 and t.nodes[la].final


def test_tree_file_round_trip_and_cli(tmp_path, capsys):
    from ibtpo.cli import main

    path = tmp_path / "tree.json"
    path.write_text(json.dumps(hand_tree().to_json()))
    assert Tree.from_json(json.loads(path.read_text())).to_json() is not None
    assert main(["tree-score", str(path), "--beta", "1.0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [n["id"] for n in out["nodes"]] == [0, 1, 3, 4, 2, 5]  # depth-first order, own ids
    by_id = {n["id"]: n for n in out["nodes"]}
    assert by_id[1]["I"] == pytest.approx(LN2) and by_id[0]["A"] is None
    assert main(["tree-score", str(path), "--local-advantage", "diff",
                 "--entropy-estimator", "surprisal"]) == 0
    by_id = {n["id"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert by_id[5]["A"] == pytest.approx(-1 / 3)
    # unset flags are the specs' defaults, what a config without them gets (one default each)
    assert main(["tree-score", str(path)]) == 0
    default = capsys.readouterr().out
    given = ["--beta", str(ScoreSpec().beta), "--local-advantage", AdvantageSpec().local_advantage]
    assert main(["tree-score", str(path), *given]) == 0
    assert capsys.readouterr().out == default
    assert main(["tree-score", str(path), "--local-advantage", "log_ratio"]) == 0
    assert capsys.readouterr().out != default  # the local term changes A: the check can fail


def _nodes():
    return [{"id": "r", "parent": None, "tokens": [1], "logprobs": []},
            {"id": "a", "parent": "r", "tokens": [2], "logprobs": [-0.1]},
            {"id": "b", "parent": "a", "tokens": [3], "logprobs": [-0.1], "reward": 1}]


@pytest.mark.parametrize("mutate,match", [
    (lambda n: n[1].update(parent="b"), "not reachable from the root"),       # a -> b -> a
    (lambda n: n.append({"id": "r2", "parent": None, "tokens": [1], "logprobs": []}),
     "exactly one root"),
    (lambda n: n[2].pop("reward"), "leaf node 'b' has no reward"),
    (lambda n: n[1].update(logprobs=[-0.1, -0.2]), "node 'a' has 1 tokens but 2 logprobs"),
    (lambda n: n[2].update(parent="zz"), "node 'b' names parent 'zz', which does not exist"),
    (lambda n: n.append(dict(n[1])), "node 'a' appears twice"),
    (lambda n: n[1].update(entropies=[0.1, 0.2]), "node 'a' has 1 tokens but 2 entropies"),
])
def test_malformed_tree_files_name_the_node(mutate, match):
    nodes = _nodes()
    mutate(nodes)
    with pytest.raises(ValueError, match=match):
        Tree.from_json(nodes)


def test_tree_score_cli_reports_bad_files(tmp_path, capsys):
    from ibtpo.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["tree-score", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["tree-score", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    nodes = _nodes()
    nodes[1]["entropies"] = [0.5]
    ok = tmp_path / "no_entropies.json"
    ok.write_text(json.dumps(nodes))
    assert main(["tree-score", str(ok)]) == 2
    assert "use entropy_estimator: surprisal" in capsys.readouterr().err
    assert main(["tree-score", str(ok), "--entropy-estimator", "surprisal"]) == 0


@pytest.mark.parametrize("root", [
    {},                                    # neither given
    {"logprobs": [], "entropies": []},     # both empty, as `to_json` of a sampled tree has them
    {"entropies": []},
    {"logprobs": []},
])
def test_root_may_give_empty_or_no_logprobs_and_entropies(tmp_path, capsys, root):
    """A prompt is not sampled: the root carries neither (issue 13, item 6)."""
    from ibtpo.cli import main

    nodes = _nodes()
    nodes[0].pop("logprobs")
    nodes[0].update(root)
    nodes[1]["entropies"], nodes[2]["entropies"] = [0.5], [0.25]
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(nodes))
    assert main(["tree-score", str(path)]) == 0
    by_id = {n["id"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert by_id["a"]["H"] == pytest.approx(0.25)  # one child, mean entropy of its one token
    assert by_id["b"]["A"] is not None


def test_root_entropies_of_the_wrong_length_still_fail():
    nodes = _nodes()
    nodes[0]["entropies"] = [0.1, 0.2]  # the root has 1 token
    with pytest.raises(ValueError, match="node 'r' has 1 tokens but 2 entropies"):
        Tree.from_json(nodes)
