"""The hf rollout engine against a fresh forward pass of the model it wraps."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ibtpo_core.data.tokenizer import step_end_token_ids
from ibtpo_core.engines.base import StopConditions, build_engine
from tests.engine_checks import assert_stops, forward_logprobs


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = build_engine("hf", model_path=tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    stop = StopConditions((tok.eos_token_id,), step_end_token_ids(tok, "\n"))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("nums 1 2 3 4 target 10\n", "nums 6 6 target 36\n3 + 3 = 6\n", "nums 5\n")]
    return tok, engine, model, stop, prompts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropies_match_a_fresh_forward(setup, temperature):
    tok, engine, model, stop, prompts = setup
    comps = engine.generate(prompts, num_samples=3, temperature=temperature, max_new_tokens=20,
                            stop=stop, seed=0)
    assert len(comps) == 9 and [c.prefix_index for c in comps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in comps:
        lp, ent = forward_logprobs(model, prompts[c.prefix_index], c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(c.entropies), ent, atol=1e-4, rtol=0)
        assert len(c.token_ids) == len(c.logprobs) == len(c.entropies) >= 1


def test_stops_at_eos_step_end_or_length(setup):
    tok, engine, model, stop, prompts = setup
    step_stop = StopConditions(stop.eos_token_ids, stop.step_end_token_ids, stop_at_step_end=True)
    comps = engine.generate(prompts, num_samples=16, max_new_tokens=40, stop=step_stop, seed=1)
    assert_stops(comps, tok.eos_token_id, stop.step_end_token_ids[0], lambda i: 40)


def test_same_seed_same_samples_other_seed_other_samples(setup):
    tok, engine, model, stop, prompts = setup
    a = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=7)
    b = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=7)
    c = engine.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=8)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_prefix_reuse_gives_the_same_distribution_as_no_reuse(setup, tiny_model_dir):
    tok, engine, model, stop, prompts = setup
    engine.store.clear()
    first = engine.generate(prompts[:1], num_samples=4, max_new_tokens=12,
                            stop=StopConditions(()), seed=3)
    # branch from the middle of each sampled sequence, as the tree sampler does
    branches = [prompts[0] + c.token_ids[:6] for c in first]
    before = engine.stats["reused_tokens"]
    reused = engine.generate(branches, num_samples=2, max_new_tokens=6, stop=stop, seed=4)
    assert engine.stats["reused_tokens"] - before == sum(len(b) - 1 for b in branches)
    fresh_engine = build_engine("hf", model_path=tiny_model_dir, reuse_prefixes=False)
    fresh = fresh_engine.generate(branches, num_samples=2, max_new_tokens=6, stop=stop, seed=4)
    assert [c.token_ids for c in reused] == [c.token_ids for c in fresh]
    for r, f in zip(reused, fresh):
        torch.testing.assert_close(
            torch.tensor(r.logprobs), torch.tensor(f.logprobs), atol=1e-5, rtol=0
        )
    for c in reused:
        lp, _ = forward_logprobs(model, branches[c.prefix_index], c.token_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=1e-4, rtol=0)


def test_load_weights_changes_samples_and_clears_the_store(setup, tiny_model_dir, tmp_path):
    tok, engine, model, stop, prompts = setup
    engine.generate(prompts, num_samples=2, max_new_tokens=5, stop=stop, seed=0)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    other.save_pretrained(tmp_path)
    e2 = build_engine("hf", model_path=tiny_model_dir)
    a = e2.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=5)
    e2.load_weights(str(tmp_path))
    assert e2.store.tokens == 0
    b = e2.generate(prompts, num_samples=4, max_new_tokens=10, stop=stop, seed=5)
    assert [x.logprobs for x in a] != [x.logprobs for x in b]
    lp, _ = forward_logprobs(other, prompts[0], b[0].token_ids)
    torch.testing.assert_close(torch.tensor(b[0].logprobs), lp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prefixes=[[]], max_new_tokens=4), "prefix 0 is empty"),
    (dict(prefixes=[[4, 5]], max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prefixes=[[4, 5]], max_new_tokens=4, temperature=0.0), "temperature must be > 0"),
    (dict(prefixes=[[4, 5]], max_new_tokens=4, temperature=-1.0), "temperature must be > 0"),
    (dict(prefixes=[[4] * 120], max_new_tokens=20), "exceeds the model's context of 128"),
    (dict(prefixes=[[4]], max_new_tokens=4, num_samples=0), "num_samples must be >= 1"),
])
def test_bad_requests_are_clear_value_errors(setup, kwargs, match):
    tok, engine, model, stop, prompts = setup
    prefixes = kwargs.pop("prefixes")
    with pytest.raises(ValueError, match=match):
        engine.generate(prefixes, stop=stop, **kwargs)


def test_unknown_engine_lists_valid_names():
    with pytest.raises(ValueError, match="Valid names: hf"):
        build_engine("hff", model_path="x")


def test_one_engine_is_held_per_process_and_reloads_new_checkpoints():
    """The RL iterations and evaluations share one engine (a vLLM engine costs tens of seconds
    and most of a GPU): built once, new weights loaded in place, rebuilt only for a new config."""
    from ibtpo_core.engines import held
    from ibtpo_core.engines.base import ENGINES, RolloutEngine

    log = []

    class Fake(RolloutEngine):
        def __init__(self, model_path, size=1):
            log.append(("build", model_path, size))

        max_context = 100

        def _generate(self, *a):
            return []

        def load_weights(self, path):
            log.append(("load", path))

        def reset_prefix_cache(self):
            log.append(("reset",))

    if "fake_held" not in ENGINES:
        ENGINES.register("fake_held")(Fake)
    held._HELD.clear()
    a = held.held_engine("fake_held", "ckpt0", size=1)
    b = held.held_engine("fake_held", "ckpt0", size=1)
    c = held.held_engine("fake_held", "ckpt1", size=1)
    d = held.held_engine("fake_held", "ckpt1", size=2)
    held._HELD.clear()
    assert a is b is c and d is not c
    assert log == [("build", "ckpt0", 1), ("reset",), ("reset",), ("load", "ckpt1"), ("reset",),
                   ("build", "ckpt1", 2), ("reset",)]
    with pytest.raises(ValueError, match=r"engine 'fake_held' has no option\(s\) \['sizes'\]"):
        held.held_engine("fake_held", "ckpt0", sizes=3)


def test_an_evaluation_builds_a_fresh_hf_engine_and_shares_a_once_per_process_one(
        tiny_model_dir, monkeypatch):
    """engines/held.stage_engine: the hf engine is cheap, so an evaluation gets a fresh one
    without a prefix store; an engine built once per process (vLLM) is the held one."""
    from ibtpo_core.engines import held
    from ibtpo_core.engines.base import engine_class

    fresh = held.stage_engine("hf", tiny_model_dir)
    assert fresh is not held.stage_engine("hf", tiny_model_dir)  # a new one each time
    assert fresh.reuse_prefixes is False
    monkeypatch.setattr(engine_class("hf"), "one_per_process", True)
    monkeypatch.setattr(held, "_HELD", {})
    first = held.stage_engine("hf", tiny_model_dir)
    assert held.stage_engine("hf", tiny_model_dir) is first
