"""Responses stop at every EOS id the checkpoint declares, not only the tokenizer's, and nothing
after the first stop is scored (Qwen3 Base: the tokenizer names ``<|im_end|>``, the model ends
text with ``<|endoftext|>``, which its generation_config.json declares)."""
from __future__ import annotations

import json

import pytest

from ibtpo_core.algo.sampling import TreeSpec
from ibtpo_core.data.tokenizer import (
    before_stop,
    build_tokenizer,
    step_end_token_ids,
    stop_token_ids,
)
from ibtpo_core.engines.base import Completion, RolloutEngine


@pytest.fixture()
def qwen_like(tmp_path):
    """A tokenizer whose own EOS is ``<eos>`` while the checkpoint's generation_config.json
    ends text with another special token, as a Qwen3 Base checkpoint does."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    tok.save_pretrained(tmp_path)
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": end}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [end, tok.eos_token_id]}))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tmp_path), end


class Scripted(RolloutEngine):
    """Emits a fixed script token by token and stops at the first token of ``stop`` (as the HF
    and vLLM engines do): the right answer, the model's own end of text, then more steps that
    would make the answer wrong were they read."""

    def __init__(self, script: list[int]):
        self.script = script

    @property
    def max_context(self):
        return 4096

    def load_weights(self, path):
        pass

    def _generate(self, prefixes, num_samples, temperature, limits, stop, seed):
        ends = set(stop.eos_token_ids) | (set(stop.step_end_token_ids)
                                          if stop.stop_at_step_end else set())
        out = []
        for i, lim in enumerate(limits):
            for _ in range(num_samples):
                toks = []
                for t in self.script[:lim]:
                    toks.append(t)
                    if t in ends:
                        break
                reason = ("eos" if toks[-1] in stop.eos_token_ids else
                          "step_end" if toks[-1] in ends else "length")
                out.append(Completion(i, toks, [-0.1] * len(toks), [0.5] * len(toks), reason))
        return out


def script(tok, end: int) -> list[int]:
    right = tok("2 + 3 = 5 \n", add_special_tokens=False)["input_ids"]
    wrong = tok("5 - 3 = 2 \n", add_special_tokens=False)["input_ids"]
    return right + [end] + wrong + [tok.eos_token_id]


ROW = {"numbers": [2, 3], "target": 5, "key": "2 3->5"}


def test_every_declared_eos_id_stops_a_response(qwen_like):
    tok, end = qwen_like
    assert stop_token_ids(tok) == (tok.eos_token_id, end)  # tokenizer's first, then declared
    assert before_stop([7, 8, end, 9], stop_token_ids(tok)) == [7, 8]
    assert before_stop([7, 8], (end,)) == [7, 8]


def test_a_checkpoint_without_any_eos_is_named(tmp_path):
    class NoEos:
        eos_token_id = None
        name_or_path = str(tmp_path)

    with pytest.raises(ValueError, match="declares no EOS token"):
        stop_token_ids(NoEos())


def test_tree_sampling_stops_at_the_models_end_of_text_and_scores_only_before_it(qwen_like):
    from ibtpo_core.algo.ib_score import ScoreSpec
    from ibtpo_core.rl import grow_trees

    tok, end = qwen_like
    steps = step_end_token_ids(tok, "\n")
    spec = TreeSpec(sampler="independent", G=2)
    trees, metrics = grow_trees(Scripted(script(tok, end)), tok, [ROW], spec, ScoreSpec(), steps,
                                max_new_tokens=40, temperature=1.0, seed=0)
    tree = trees[0]
    leaves = tree.leaves()
    assert leaves and all(leaf.reward == 1.0 for leaf in leaves)  # the right answer, read alone
    for leaf in leaves:
        path = [t for n in tree.path(leaf.id) for t in tree.nodes[n].tokens]
        assert path[-1] == end and tok.eos_token_id not in path  # stopped at the model's end


def test_evaluation_stops_at_the_models_end_of_text(qwen_like):
    from ibtpo_core.evaluation import EvalSpec, accuracy_metrics

    tok, end = qwen_like
    m = accuracy_metrics(Scripted(script(tok, end)), tok, [ROW],
                         EvalSpec(num_samples=2, max_new_tokens=40))
    assert m["accuracy"] == 1.0
    assert m["eval_decoded_tokens"] == 2 * (script(tok, end).index(end) + 1)
