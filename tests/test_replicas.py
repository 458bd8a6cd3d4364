"""Rollout engine replicas (``engine.replicas``, engines/replicas.py): per-prefix seeds in the hf
engine, and two engine processes growing the same trees as one engine."""
import pytest
import torch
from transformers import AutoTokenizer

from ibtpo_core.data.tokenizer import step_end_token_ids
from ibtpo_core.engines.base import StopConditions, build_engine
from ibtpo_core.engines.hf import mix64, row_uniforms
from ibtpo_core.engines.replicas import build, split_evenly
from tests.engine_checks import forward_logprobs


def _splitmix64(state: int, n: int) -> list[int]:
    """The reference generator in Python integers (Steele, Lea and Flood 2014)."""
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_mix64_is_splitmix64():
    ref = _splitmix64(0, 3)
    assert ref[0] == 0xE220A8397B1DCDAF  # the published first output from state 0
    states = torch.tensor([(k * 0x9E3779B97F4A7C15) % 2**64 for k in (1, 2, 3)], dtype=torch.uint64)
    got = mix64(states.view(torch.int64))
    assert [int(x) % 2**64 for x in got] == ref


def test_row_uniforms_are_uniform_and_differ_by_key_and_step():
    keys = torch.arange(20_000, dtype=torch.int64) * 7_919
    u = row_uniforms(keys, 0)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01  # SE of the mean: 0.29 / sqrt(20k) = 0.002
    assert torch.histc(u, bins=10, min=0, max=1).min() > 1_800  # 2,000 expected per tenth
    assert not torch.equal(u, row_uniforms(keys, 1))


def test_split_evenly():
    assert split_evenly(5, 2) == [(0, 3), (3, 5)]
    assert split_evenly(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert split_evenly(6, 3) == [(0, 2), (2, 4), (4, 6)]


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stop = StopConditions((tok.eos_token_id,), step_end_token_ids(tok, "\n"))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ("nums 1 2 3 4 target 10\n", "nums 6 6 target 36\n3 + 3 = 6\n", "nums 5\n",
                "nums 2 3 target 5\n")]
    return tok, stop, prompts


def test_seed_per_prefix_samples_do_not_depend_on_the_rest_of_the_call(setup, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok, stop, prompts = setup
    one = build_engine("hf", model_path=tiny_model_dir, seed_per_prefix=True)
    small = build_engine("hf", model_path=tiny_model_dir, seed_per_prefix=True, max_batch=3)
    whole = one.generate(prompts, num_samples=3, max_new_tokens=16, stop=stop, seed=11)
    part = one.generate(prompts[2:], num_samples=3, max_new_tokens=16, stop=stop, seed=11,
                        first_index=2)
    chunked = small.generate(prompts, num_samples=3, max_new_tokens=16, stop=stop, seed=11)
    assert [c.token_ids for c in part] == [c.token_ids for c in whole[6:]]
    assert [c.prefix_index for c in part] == [0, 0, 0, 1, 1, 1]
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]  # one prefix per chunk
    assert len({tuple(c.token_ids) for c in whole[:3]}) > 1  # samples of a prefix differ
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for c in whole:  # still pi_sample's log-probs
        lp, _ = forward_logprobs(model, prompts[c.prefix_index], c.token_ids, 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs), lp, atol=1e-4, rtol=0)


def test_a_part_of_a_call_needs_an_engine_that_seeds_per_prefix(setup, tiny_model_dir):
    tok, stop, prompts = setup
    engine = build_engine("hf", model_path=tiny_model_dir)
    with pytest.raises(ValueError, match="use an engine that seeds per prefix"):
        engine.generate(prompts, max_new_tokens=4, stop=stop, seed=0, first_index=1)


def _trees(engine, tok, seed):
    from ibtpo_core.algo.ib_score import ScoreSpec
    from ibtpo_core.algo.sampling import TreeSpec
    from ibtpo_core.rl import grow_trees

    rows = [{"numbers": [1, 2, 3, 4], "target": 10, "key": "a"},
            {"numbers": [2, 3], "target": 5, "key": "b"},
            {"numbers": [6, 6], "target": 36, "key": "c"}]
    spec = TreeSpec(G=4, M=1, B_root=2, B_max=2)
    trees, metrics = grow_trees(engine, tok, rows, spec, ScoreSpec(),
                                step_end_token_ids(tok, "\n"), max_new_tokens=24,
                                temperature=1.0, seed=seed)
    return [t.to_json() for t in trees], metrics


def _shape(trees):
    return [[(n["parent"], n["tokens"], n.get("reward")) for n in t["nodes"]] for t in trees]


def _floats(trees, key):
    return torch.tensor([x for t in trees for n in t["nodes"] for x in (n.get(key) or [])])


def test_two_engine_processes_grow_the_trees_of_one_engine(setup, tiny_model_dir):
    tok, stop, prompts = setup
    one = build_engine("hf", model_path=tiny_model_dir, seed_per_prefix=True)
    two = build("hf", model_path=tiny_model_dir, seed_per_prefix=True, replicas=2)
    try:
        assert two.max_context == one.max_context
        expected, m1 = _trees(one, tok, seed=5)
        got, m2 = _trees(two, tok, seed=5)
        # the same samples: every node's parent and tokens; log-probs and entropies equal up to
        # float rounding (each replica's batches have other shapes and reuse other prefixes)
        assert _shape(got) == _shape(expected) and sum(len(t["nodes"]) for t in got) > 9
        torch.testing.assert_close(_floats(got, "logprobs"), _floats(expected, "logprobs"),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(_floats(got, "entropies"), _floats(expected, "entropies"),
                                   atol=1e-5, rtol=0)
        assert m1["tree/decoded_tokens"] == m2["tree/decoded_tokens"] > 0
        assert two.stats["decoded_tokens"] == one.stats["decoded_tokens"]
        # weights from memory reach both replicas: the samples become the new model's
        state = {k: v + 0.3 * torch.randn_like(v) for k, v in one.model.state_dict().items()}
        assert one.load_state(state) and two.load_state(state)
        after_one = one.generate(prompts, num_samples=2, max_new_tokens=12, stop=stop, seed=3)
        after_two = two.generate(prompts, num_samples=2, max_new_tokens=12, stop=stop, seed=3)
        assert [c.token_ids for c in after_two] == [c.token_ids for c in after_one]
    finally:
        two.close()


def test_replicas_of_an_engine_without_per_prefix_seeds_are_refused(tmp_path):
    from configs.schema import load_config

    path = tmp_path / "x.yaml"
    path.write_text("name: x\nengine:\n  replicas: 2\n")
    with pytest.raises(ValueError, match="set engine.options.seed_per_prefix: true"):
        load_config(str(path))


def test_sleep_during_update_needs_vllm_on_a_gpu(tmp_path):
    from configs.schema import load_config

    path = tmp_path / "x.yaml"
    path.write_text("name: x\nengine:\n  options: {sleep_during_update: true}\n")
    with pytest.raises(ValueError, match="sleep_during_update frees the GPU memory .* 'hf' on "
                                         "'cpu' has nothing to free"):
        load_config(str(path))


def test_the_update_puts_the_held_engine_to_sleep_and_the_next_use_wakes_it(tiny_model_dir):
    """The order a vLLM engine with sleep_during_update sees: sampling (awake), the update stage
    (asleep: its GPU memory is the update's), the next sampling (woken before it samples)."""
    from ibtpo_core.engines import held
    from ibtpo_core.engines.hf import HFEngine

    calls = []

    class Sleepy(HFEngine):
        def sleep(self):
            calls.append("sleep")

        def wake(self):
            calls.append("wake")

    held._HELD.clear()
    engine = Sleepy(tiny_model_dir)
    held._HELD.update(engine=engine, key=held.json.dumps(["hf", {}], sort_keys=True), path="p")
    held.sleep_held()
    assert held.held_engine("hf", "p") is engine
    assert calls == ["sleep", "wake"]
    held._HELD.clear()
    held.sleep_held()  # nothing held: nothing to do
    assert calls == ["sleep", "wake"]
