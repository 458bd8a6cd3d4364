"""bench/ib_probe.py averages the probe trees' IB diagnostic over seeds (hand-worked numbers)."""
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("ib_probe", ROOT / "bench" / "ib_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(score, h, i):
    return {"score": score, "h": h, "i": i}


def test_curves_mean_and_se_over_seeds_at_the_shared_iterations():
    a = _run([(0, 0.2), (5, 0.5), (10, 0.9)], [(0, 1.0), (5, 0.8), (10, 0.7)],
             [(0, 0.1), (5, 0.3), (10, 0.2)])
    b = _run([(0, 0.4), (5, 0.1)], [(0, 2.0), (5, 0.4)], [(0, 0.3), (5, 0.3)])
    c = _module().curves([a, b])
    assert c["n_seeds"] == 2 and c["iterations"] == [0, 5]  # b stopped before iteration 10
    # two values x, y: mean (x + y) / 2, SE = sample std / sqrt 2 = |x - y| / 2
    assert c["score_mean"] == pytest.approx([0.3, 0.3])
    assert c["score_se"] == pytest.approx([0.1, 0.2])
    assert c["h_mean"] == pytest.approx([1.5, 0.6]) and c["h_se"] == pytest.approx([0.5, 0.2])
    assert c["i_mean"] == pytest.approx([0.2, 0.3]) and c["i_se"] == pytest.approx([0.1, 0.0])


def test_one_seed_has_no_band_and_nan_becomes_null():
    mod = _module()
    c = mod.curves([_run([(0, 0.2)], [(0, 1.0)], [(0, 0.1)])])
    assert c["score_mean"] == [0.2] and math.isnan(c["score_se"][0])
    assert mod.nan_to_null(c)["score_se"] == [None]
