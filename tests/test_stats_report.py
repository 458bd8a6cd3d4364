"""The report's statistics against hand-worked numbers, and its aggregation per method on
hand-made cell results (no MLflow)."""
from __future__ import annotations

import math

import pytest

from ibtpo_core.stats import interp, mean_se, paired_diff, welch_diff
from pipeline.report import CellRun, markdown, summarize


def test_mean_se_hand_worked():
    # values 0.2, 0.3, 0.4: mean 0.3; deviations -0.1, 0, 0.1 -> var = 0.02 / 2 = 0.01;
    # SE = sqrt(0.01 / 3) = 0.057735
    m, se = mean_se([0.2, 0.3, 0.4])
    assert m == pytest.approx(0.3) and se == pytest.approx(0.0577350, abs=1e-6)
    m1, se1 = mean_se([0.5])
    assert m1 == 0.5 and math.isnan(se1)
    with pytest.raises(ValueError):
        mean_se([])


def test_welch_interval_hand_worked():
    # a = 0.2, 0.3, 0.4 (mean 0.3, SE^2 = 0.01/3); b = 0.1, 0.1, 0.25 (mean 0.15,
    # var = (0.0025 + 0.0025 + 0.01) / 2 = 0.0075, SE^2 = 0.0025).
    # se2 = 0.0033333 + 0.0025 = 0.0058333; df = se2^2 / (0.0033333^2/2 + 0.0025^2/2)
    #     = 3.4028e-5 / (5.5556e-6 + 3.125e-6) = 3.920;
    # t_0.975(3.920) = 2.7990 (t table, interpolated)
    # half = 2.7990 * sqrt(0.0058333) = 2.7990 * 0.076376 = 0.21377
    d = welch_diff([0.2, 0.3, 0.4], [0.1, 0.1, 0.25])
    assert d["mean"] == pytest.approx(0.15)
    assert d["df"] == pytest.approx(3.920, abs=1e-3)
    assert d["ci95_low"] == pytest.approx(0.15 - 0.21377, abs=2e-4)
    assert d["ci95_high"] == pytest.approx(0.15 + 0.21377, abs=2e-4)
    # minimum detectable effect (80% power): (t_0.975 + t_0.8) * SE = (2.7990 + 0.9440) * 0.076376
    # (t_0.8 between 0.978 at df 3 and 0.941 at df 4)
    assert d["mde"] == pytest.approx(3.7430 * 0.076376, abs=1e-3)
    one = welch_diff([0.3], [0.1, 0.2])
    assert one["mean"] == pytest.approx(0.15) and math.isnan(one["ci95_low"])
    flat = welch_diff([0.3, 0.3], [0.1, 0.1])
    assert flat["ci95_low"] == flat["ci95_high"] == pytest.approx(0.2) and flat["mde"] == 0.0


def test_paired_interval_hand_worked():
    # shared seeds 0, 1, 2 (seed 3 has no partner): differences 0.02, 0.01, 0.04, mean 0.023333;
    # deviations -0.003333, -0.013333, +0.016667, squares sum 4.6667e-4, var 2.3333e-4,
    # SE = sqrt(2.3333e-4 / 3) = 0.0088192; t_0.975(2) = 4.3027 -> half 0.037946;
    # mde = (4.3027 + t_0.8(2) = 1.0607) * 0.0088192 = 0.047300
    d = paired_diff({0: 0.30, 1: 0.25, 2: 0.20}, {0: 0.28, 1: 0.24, 2: 0.16, 3: 0.5})
    assert d["n_pairs"] == 3 and d["mean"] == pytest.approx(0.023333, abs=1e-6)
    assert d["ci95_low"] == pytest.approx(0.023333 - 0.037946, abs=1e-5)
    assert d["ci95_high"] == pytest.approx(0.023333 + 0.037946, abs=1e-5)
    assert d["mde"] == pytest.approx(0.047300, abs=1e-5)
    # the same numbers unpaired: Welch's interval is wider (the seed effect is shared)
    w = welch_diff([0.30, 0.25, 0.20], [0.28, 0.24, 0.16])
    assert w["ci95_high"] - w["ci95_low"] > 2 * (d["ci95_high"] - d["ci95_low"])
    one = paired_diff({0: 0.3, 1: 0.2}, {1: 0.1})
    assert one["n_pairs"] == 1 and one["mean"] == pytest.approx(0.1) and math.isnan(one["mde"])
    same = paired_diff({0: 0.5, 1: 0.75}, {0: 0.25, 1: 0.5})
    assert same["ci95_low"] == same["ci95_high"] == 0.25 and same["mde"] == 0.0


def test_interp():
    xs, ys = [0.0, 10.0, 20.0], [0.2, 0.3, 0.5]
    assert interp(xs, ys, 5.0) == pytest.approx(0.25)
    assert interp(xs, ys, 15.0) == pytest.approx(0.4)
    assert interp(xs, ys, 20.0) == pytest.approx(0.5)
    assert math.isnan(interp(xs, ys, 25.0)) and math.isnan(interp([], [], 1.0))


def _cell(label, seed, acc, unique, tokens, wall):
    return CellRun(name=f"s.{label}.s{seed}", label=label, seed=seed, run_id=f"{label}{seed}",
                   final={"accuracy": acc, "accuracy_se": 0.01, "pass_at_8": 0.6,
                          "distinct_correct": 1.0},
                   before={"accuracy": 0.2, "pass_at_8": 0.7, "distinct_correct": 1.2},
                   per_iteration={"leaves_per_budget": unique, "unique_leaves_per_budget": unique,
                                  "eff_rate": 0.5},
                   decoded=tokens, rl_wall=wall,
                   curve=[(0.0, 0.0, 0.2), (tokens, wall, acc)])


def test_summarize_per_method():
    cells = [_cell("ibtpo", 0, 0.30, 1.2, 400.0, 40.0), _cell("ibtpo", 1, 0.32, 1.0, 420.0, 44.0),
             _cell("grpo", 0, 0.26, 0.6, 380.0, 20.0), _cell("grpo", 1, 0.28, 0.5, 390.0, 22.0)]
    s = summarize(cells, "grpo")
    ib, gr = s["methods"]["ibtpo"], s["methods"]["grpo"]
    assert ib["acc_mean"] == pytest.approx(0.31) and ib["n_seeds"] == 2
    # SE over seeds: std of (0.30, 0.32) = 0.014142; / sqrt 2 = 0.01
    assert ib["acc_se"] == pytest.approx(0.01)
    assert ib["diff_vs_grpo"]["mean"] == pytest.approx(0.04)
    assert ib["unique_leaves_per_budget"] == pytest.approx(1.1)
    assert ib["unique_leaves_vs_grpo"] == pytest.approx(1.1 / 0.55)
    # equal tokens = 380 (the smallest total): ibtpo seed 0 at 380/400 of the way from 0.2 to
    # 0.30 = 0.295; seed 1: 0.2 + 0.12 * 380/420 = 0.308571; mean 0.301786
    assert s["equal_tokens"] == 380.0
    assert ib["acc_at_equal_tokens"] == pytest.approx((0.295 + 0.308571) / 2, abs=1e-5)
    # equal wall = 20 s: ibtpo seed 0: 0.2 + 0.1 * 20/40 = 0.25; seed 1: 0.2 + 0.12 * 20/44
    assert ib["acc_at_equal_wall"] == pytest.approx((0.25 + 0.2 + 0.12 * 20 / 44) / 2)
    assert gr["wall_s"] == pytest.approx(21.0) and gr["pass_at_8_before"] == pytest.approx(0.7)
    table = markdown(s, "t")
    # paired over seeds 0, 1: differences 0.04, 0.04 (no spread): a zero-width interval
    assert ib["paired_diff_vs_grpo"]["n_pairs"] == 2
    assert ib["paired_diff_vs_grpo"]["mean"] == pytest.approx(0.04)
    assert ib["paired_diff_vs_grpo"]["ci95_high"] - ib["paired_diff_vs_grpo"]["ci95_low"] < 1e-9
    assert "| ibtpo | 2 | 0.310 +- 0.010 | +4.0 pts [" in table
    assert "| +4.0 pts [+4.0, +4.0] (2 pairs) |" in table
    assert "| grpo | 2 |" in table and "2.00x" in table
    assert s["eval_split"] == "test" and "Accuracy: the held-out test split" in table


def test_a_sweep_scored_on_validation_says_so():
    # a tuning or ablation sweep (eval.split: validation) must not read as a test-split result
    import dataclasses

    cells = [dataclasses.replace(_cell(m, seed, acc, 0.6, 400.0, 40.0), split="validation")
             for m, seed, acc in (("ibtpo", 0, 0.30), ("grpo", 0, 0.26))]
    s = summarize(cells, "grpo")
    table = markdown(s, "t")
    assert s["eval_split"] == "validation"
    assert "Accuracy: the held-out validation split" in table and "test split" not in table


def test_summarize_refuses_nothing():
    with pytest.raises(ValueError, match="no finished cells"):
        summarize([], "grpo")
