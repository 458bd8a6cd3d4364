"""The equal-budget table of method.md §6 on the deep built-in task, at one or more budgets.

Runs each sweep file given (by default configs/sweeps/deep_table.yaml and deep_table_3x.yaml:
the default budget and three times it; finished cells are cache hits, so a rerun only reports),
prints each report, plots IB-TPO minus GRPO against decoded tokens, writes JSON and ends with one
JSON line:

    {"task", "warmup_accuracy", "ceiling_unique_ratio", "min_detectable_effect",
     "budgets": [{"decoded_tokens", "methods": {NAME: {"acc_mean", "acc_se", "n_seeds",
       "diff_vs_grpo": {"mean", "ci95_low", "ci95_high"}, "unique_vs_grpo",
       "unique_leaves_per_budget", "pass_at_8_before", "pass_at_8_after", "eff_rate",
       "train_reward_final"}}}]}

``min_detectable_effect``: IB-TPO minus GRPO that the seeds of the first budget would detect
with 80% power (Welch, 95% level).

    python bench/method_table.py [--sweep FILE ...] [--json PATH] [--plot PATH] [--report-only]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_json  # noqa: E402

DEFAULT = ["configs/sweeps/deep_table.yaml", "configs/sweeps/deep_table_3x.yaml"]
TREATED, BASELINE = "ibtpo", "grpo"


def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def budget_row(summary: dict) -> dict:
    """One budget's entry of the JSON line from a sweep's report.json."""
    pk, base = summary["pass_key"], summary["baseline"]
    methods = {}
    for name, r in summary["methods"].items():
        d = r.get(f"diff_vs_{base}") or {}
        methods[name] = {
            "acc_mean": r["acc_mean"],
            "acc_se": r["acc_se"],
            "n_seeds": r["n_seeds"],
            f"diff_vs_{base}": {
                k: d.get(k, math.nan) for k in ("mean", "ci95_low", "ci95_high", "mde")
            },
            f"unique_vs_{base}": r.get(f"unique_leaves_vs_{base}", math.nan),
            "unique_leaves_per_budget": r["unique_leaves_per_budget"],
            f"{pk}_before": r[f"{pk}_before"],
            f"{pk}_after": r[pk],
            "eff_rate": r["eff_rate"],
            "train_reward_final": r["train_reward_final"],
        }
    tokens = summary["methods"].get(base, next(iter(summary["methods"].values())))["decoded_tokens"]
    return {"decoded_tokens": tokens, "methods": methods}


def plot(budgets: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, lo, hi = [], [], [], []
    for b in budgets:
        d = b["methods"].get(TREATED, {}).get(f"diff_vs_{BASELINE}")
        if d:
            xs.append(b["decoded_tokens"])
            ys.append(100 * d["mean"])
            lo.append(100 * (d["mean"] - d["ci95_low"]) if d["ci95_low"] == d["ci95_low"] else 0)
            hi.append(100 * (d["ci95_high"] - d["mean"]) if d["ci95_high"] == d["ci95_high"] else 0)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("decoded tokens per run")
    ax.set_ylabel(f"{TREATED} - {BASELINE} (accuracy points, 95% CI)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sweep", action="append", help="a sweep file, one per budget (repeatable)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default="bench/results/method_table_budget.png")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: read each sweep's last report.json (cells may be missing)")
    args = ap.parse_args()

    from configs.schema import load_config
    from configs.sweep import load_sweep
    from flows.sweep import sweep

    budgets, first = [], None
    for f in args.sweep or DEFAULT:
        t0 = time.time()
        if args.report_only:
            sw = load_sweep(f)
            report = Path(sw.output_dir.replace("${name}", sw.name)) / "report.md"
            cells = "(report only)"
        else:
            out = sweep(f)
            report, cells = Path(out["report"]), out["cells"]
        summary = json.loads((report.parent / "report.json").read_text())
        print(report.read_text())
        print(f"{f}: {(time.time() - t0) / 60:.1f} min, cells: {cells}")
        budgets.append({**budget_row(summary), "sweep": f, "wall_s": round(time.time() - t0, 1)})
        first = first or summary
    budgets.sort(key=lambda b: b["decoded_tokens"])
    spec = load_sweep((args.sweep or DEFAULT)[0])
    task = load_config(spec.base).data.countdown
    ref = first["methods"].get(BASELINE, {})
    treated = first["methods"].get(TREATED, {}).get(f"diff_vs_{BASELINE}", {})
    line = {
        "task": f"countdown-{task.num_count} ({task.problems}, "
        f"values {task.min_value}-{task.max_value}, "
        f"targets {task.min_target}-{task.max_target})",
        "warmup_accuracy": ref.get("acc_before", math.nan),
        "ceiling_unique_ratio": ref.get("ceiling_unique_ratio", math.nan),
        "min_detectable_effect": treated.get("mde", math.nan),
        "budgets": [
            {k: v for k, v in b.items() if k in ("decoded_tokens", "methods")} for b in budgets
        ],
    }
    line = _clean(line)
    if args.plot:
        plot(line["budgets"], Path(args.plot))
        print(f"plot: {args.plot}")
    write_json(args.json, {**line, "runs": _clean(budgets)})
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
