"""rl.save_every: which iterations' checkpoints the flow writes with their weights."""
from configs.schema import load_config
from flows.train import saves_weights


def _cfg(tmp_path, *sets):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\n")
    return load_config(p, ["rl.iterations=10", "eval.every=0", "benchmark.enabled=false", *sets])


def test_every_kth_the_last_and_what_an_evaluation_reads(tmp_path):
    cfg = _cfg(tmp_path, "rl.save_every=4")
    assert [d for d in range(1, 11) if saves_weights(cfg, d, 0.0)] == [4, 8, 10]
    cfg = _cfg(tmp_path, "rl.save_every=4", "eval.every=3")  # the curve reads 3, 6, 9
    assert [d for d in range(1, 11) if saves_weights(cfg, d, 0.0)] == [3, 4, 6, 8, 9, 10]
    cfg = _cfg(tmp_path, "rl.save_every=4", "benchmark.enabled=true", "benchmark.every=5")
    assert [d for d in range(1, 11) if saves_weights(cfg, d, 0.0)] == [4, 5, 8, 10]


def test_the_iteration_that_spends_the_token_budget_is_the_last(tmp_path):
    cfg = _cfg(tmp_path, "rl.save_every=4", "rl.decoded_tokens=1000")
    assert not saves_weights(cfg, 2, 999.0)
    assert saves_weights(cfg, 2, 1000.0)  # the loop stops before iteration 3


def test_one_saves_every_checkpoint(tmp_path):
    cfg = _cfg(tmp_path)
    assert all(saves_weights(cfg, d, 0.0) for d in range(1, 11))


def test_every_shipped_engine_takes_weights_from_memory():
    """rl.save_every hands the weights over in memory, so no shipped engine may fall back to the
    base class's refusal (vLLM's own hand-off is tested in tests/test_vllm_engine.py)."""
    from ibtpo_core.engines.base import ENGINE_MODULES, RolloutEngine, engine_class

    for name in ENGINE_MODULES:  # importing the vllm module needs no vLLM
        assert engine_class(name).load_state is not RolloutEngine.load_state, name
