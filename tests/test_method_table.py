"""bench/method_table.py turns a sweep report into the issue's JSON line (worked on a small
hand-made report)."""
import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location(
        "method_table", ROOT / "bench" / "method_table.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(acc, decoded, unique, **extra):
    return {"acc_mean": acc, "acc_se": 0.01, "n_seeds": 5, "unique_leaves_per_budget": unique,
            "leaves_per_budget": 1.5,
            "pass_at_8_before": 0.5, "pass_at_8": 0.6, "eff_rate": 0.7,
            "train_reward_final": acc + 0.02, "decoded_tokens": decoded, **extra}


def test_budget_row_keeps_the_named_fields():
    summary = {"pass_key": "pass_at_8", "baseline": "grpo", "methods": {
        "ibtpo": _row(0.30, 1000.0, 1.2, unique_leaves_vs_grpo=1.2,
                      diff_vs_grpo={"mean": 0.05, "ci95_low": 0.01, "ci95_high": 0.09, "df": 7.0,
                                    "mde": 0.04},
                      paired_diff_vs_grpo={"mean": 0.05, "ci95_low": 0.03, "ci95_high": 0.07,
                                           "mde": 0.02, "n_pairs": 5}),
        "grpo": _row(0.25, 990.0, 1.0, unique_leaves_vs_grpo=1.0,
                     diff_vs_grpo={"mean": 0.0, "ci95_low": -0.03, "ci95_high": 0.03, "mde": 0.04}),
    }}
    row = _module().budget_row(summary)
    assert row["decoded_tokens"] == 990.0  # the baseline's budget names the row
    ib = row["methods"]["ibtpo"]
    assert ib["diff_vs_grpo"] == {"mean": 0.05, "ci95_low": 0.01, "ci95_high": 0.09, "mde": 0.04}
    assert ib["unique_vs_grpo"] == 1.2 and ib["pass_at_8_before"] == 0.5
    assert ib["leaves_per_budget"] == 1.5 and ib["unique_leaves_per_budget"] == 1.2
    assert ib["pass_at_8_after"] == 0.6 and ib["train_reward_final"] == 0.32
    assert ib["paired_diff_vs_grpo"] == {"mean": 0.05, "ci95_low": 0.03, "ci95_high": 0.07,
                                         "mde": 0.02, "n_pairs": 5}
    # a report without a paired interval (one written before it existed) gives nan, not an error
    assert math.isnan(row["methods"]["grpo"]["paired_diff_vs_grpo"]["mean"])
    assert set(ib) == {"acc_mean", "acc_se", "n_seeds", "diff_vs_grpo", "paired_diff_vs_grpo",
                       "unique_vs_grpo", "leaves_per_budget",
                       "unique_leaves_per_budget", "pass_at_8_before", "pass_at_8_after",
                       "eff_rate", "train_reward_final"}


def test_nan_becomes_null_in_the_json_line():
    assert _module().nan_to_null({"a": [math.nan, 1.0], "b": {"c": math.nan}}) == {"a": [None, 1.0],
                                                                             "b": {"c": None}}


def test_max_seeds_keeps_each_variants_first_seeds():
    first = _module().first_seeds
    table = str(ROOT / "configs" / "sweeps" / "deep_table.yaml")  # ibtpo, grpo: 15; others: 3
    five = first(table, 5)
    assert five[:5] == [f"ibtpo.s{s}" for s in range(5)]
    assert five[5:10] == [f"grpo.s{s}" for s in range(5)]
    assert five[10:] == [f"{m}.s{s}" for m in ("grpo_clip_higher", "grpo_entropy", "tree_entropy")
                         for s in range(3)]
    assert len(first(table, 2)) == 10 and first(table, None) is None
