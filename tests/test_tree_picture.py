"""The sampler records where each round branched, and a tree file becomes a picture of it
(issue 13, item 5)."""
from __future__ import annotations

import json

from ibtpo_core.algo.samplers import sample
from ibtpo_core.algo.sampling import TreeSpec
from ibtpo_core.algo.tree import Tree
from ibtpo_core.engines.base import StopConditions
from ibtpo_core.tree_picture import draw_tree, picks_by_node
from tests.test_selection_sampling import EOS, NL, ScriptedEngine, score_even

PNG = b"\x89PNG\r\n\x1a\n"


def sampled_tree() -> Tree:
    r = sample("ibtree", ScriptedEngine(), [[100]], TreeSpec(G=8), score_even,
               StopConditions((EOS,), (NL,)), 32, 1.0, 0)
    return r.trees[0]


def test_the_sampler_records_each_rounds_picks():
    t = sampled_tree()
    picks = t.meta["picks"]
    assert picks and {r for r, _ in picks} <= {2, 3, 4}  # branching rounds follow round 1
    # every pick is an existing node that then has a child it did not have in round 1
    assert all(0 <= node < len(t.nodes) and t.nodes[node].children for _, node in picks)
    # the ScriptedEngine's first round gives 4 independent answers; picks added the rest
    assert len(t.leaves()) == 4 + len(picks)


def test_picks_follow_the_files_own_node_ids():
    nodes = [{"id": "r", "parent": None, "tokens": [1]},
             {"id": "b", "parent": "r", "tokens": [3], "logprobs": [-0.1], "reward": 0},
             {"id": "a", "parent": "r", "tokens": [2], "logprobs": [-0.1]},
             {"id": "c", "parent": "a", "tokens": [4], "logprobs": [-0.1], "reward": 1},
             {"id": "d", "parent": "a", "tokens": [5], "logprobs": [-0.1], "reward": 0}]
    t = Tree.from_json({"nodes": nodes, "meta": {"picks": [[2, "a"], [3, "a"], [2, "r"]]}})
    a = t.meta["original_ids"].index("a")
    assert picks_by_node(t) == {a: [2, 3], 0: [2]}


def test_a_sampled_tree_file_draws(tmp_path):
    tree_json = json.loads(json.dumps(sampled_tree().to_json()))  # as read from trees.json
    out = draw_tree(tree_json, tmp_path / "tree.png", decode=lambda ids: " ".join(map(str, ids)),
                    title="scripted")
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    # without entropies (a vLLM tree) and without a decoder it still draws
    for n in tree_json["nodes"]:
        n.pop("entropies", None)
    assert draw_tree(tree_json, tmp_path / "bare.png").read_bytes().startswith(PNG)


def test_tree_score_draws_the_picture_on_request(tmp_path, capsys):
    from ibtpo.cli import main

    path = tmp_path / "tree.json"
    path.write_text(json.dumps(sampled_tree().to_json()))
    assert main(["tree-score", str(path), "--picture", str(tmp_path / "t.png")]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"]
    assert (tmp_path / "t.png").read_bytes().startswith(PNG)
