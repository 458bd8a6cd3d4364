"""The equal-budget table of method.md §6 on the deep built-in task, at two budgets and at
several depths.

Runs each sweep file given (by default configs/sweeps/deep_table.yaml and deep_table_3x.yaml:
the default budget and three times it; then deep_depth5.yaml and deep_depth7.yaml: IB-TPO and
GRPO at 4 and 6 steps per answer, deep_table being the 5-step point; finished cells are cache
hits, so a rerun only reports), prints each report, plots IB-TPO minus GRPO against decoded
tokens and against depth, writes JSON and ends with one JSON line:

    {"task", "warmup_accuracy", "ceiling_unique_ratio", "min_detectable_effect",
     "budgets": [{"decoded_tokens", "methods": {NAME: {"acc_mean", "acc_se", "n_seeds",
       "diff_vs_grpo": {"mean", "ci95_low", "ci95_high"}, "paired_diff_vs_grpo": {..,
       "n_pairs"}, "unique_vs_grpo", "leaves_per_budget" (raw, duplicates included),
       "unique_leaves_per_budget", "pass_at_8_before", "pass_at_8_after", "eff_rate",
       "train_reward_final"}}}],
     "depths": [{"steps", "decoded_tokens", "warmup_accuracy", "ceiling_unique_ratio",
       "acc": {NAME: {"mean", "se", "n_seeds"}}, "diff_vs_grpo": {...},
       "paired_diff_vs_grpo": {...}}]}

``min_detectable_effect``: IB-TPO minus GRPO that the seeds of the first budget would detect
with 80% power (Welch, 95% level). ``paired_diff_vs_grpo``: the same difference over the seeds
both ran, with the paired t interval (seeds share warm-up, prompts and evaluation draws).

    python bench/method_table.py [--sweep FILE ...] [--depth FILE ... | --no-depth]
                                 [--max-seeds N] [--json PATH] [--plot PATH] [--report-only]
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

from _results import nan_to_null, write_json  # noqa: E402

DEFAULT = ["configs/sweeps/deep_table.yaml", "configs/sweeps/deep_table_3x.yaml"]
# the same comparison at other depths (default budget); deep_table is the 5-step point
DEFAULT_DEPTH = ["configs/sweeps/deep_depth5.yaml", "configs/sweeps/deep_depth7.yaml"]
TREATED, BASELINE = "ibtpo", "grpo"
DIFF_KEYS = ("mean", "ci95_low", "ci95_high", "mde")
PAIRED_KEYS = (*DIFF_KEYS, "n_pairs")


def _diffs(row: dict, base: str) -> dict:
    """A report row's differences to ``base`` (Welch's and the paired one), nan where absent
    (a report written before the paired interval existed)."""
    d = row.get(f"diff_vs_{base}") or {}
    pd = row.get(f"paired_diff_vs_{base}") or {}
    return {f"diff_vs_{base}": {k: d.get(k, math.nan) for k in DIFF_KEYS},
            f"paired_diff_vs_{base}": {k: pd.get(k, math.nan) for k in PAIRED_KEYS}}


def budget_row(summary: dict) -> dict:
    """One budget's entry of the JSON line from a sweep's report.json."""
    pk, base = summary["pass_key"], summary["baseline"]
    methods = {}
    for name, r in summary["methods"].items():
        methods[name] = {
            "acc_mean": r["acc_mean"],
            "acc_se": r["acc_se"],
            "n_seeds": r["n_seeds"],
            **_diffs(r, base),
            f"unique_vs_{base}": r.get(f"unique_leaves_vs_{base}", math.nan),
            "leaves_per_budget": r.get("leaves_per_budget", math.nan),  # raw, duplicates in
            "unique_leaves_per_budget": r["unique_leaves_per_budget"],
            f"{pk}_before": r[f"{pk}_before"],
            f"{pk}_after": r[pk],
            "eff_rate": r["eff_rate"],
            "train_reward_final": r["train_reward_final"],
        }
    tokens = summary["methods"].get(base, next(iter(summary["methods"].values())))["decoded_tokens"]
    return {"decoded_tokens": tokens, "methods": methods}


def depth_row(summary: dict, steps: int) -> dict:
    """One depth's entry: IB-TPO minus GRPO on a sweep of that depth (steps per answer)."""
    base = summary["baseline"]
    ref = summary["methods"].get(base, {})
    return {
        "steps": steps,
        "decoded_tokens": ref.get("decoded_tokens", math.nan),
        "warmup_accuracy": ref.get("acc_before", math.nan),
        "ceiling_unique_ratio": ref.get("ceiling_unique_ratio", math.nan),
        "acc": {n: {"mean": r["acc_mean"], "se": r["acc_se"], "n_seeds": r["n_seeds"]}
                for n, r in summary["methods"].items()},
        **_diffs(summary["methods"].get(TREATED, {}), base),
    }


def _gap(points: list[dict], x_key: str, kind: str = "") -> tuple[list, list, list, list]:
    xs, ys, lo, hi = [], [], [], []
    key = f"{kind}diff_vs_{BASELINE}"
    for b in points:
        d = b.get(key) or b.get("methods", {}).get(TREATED, {}).get(key)
        if d and d.get("mean") is not None:
            xs.append(b[x_key])
            ys.append(100 * d["mean"])
            ok = d.get("ci95_low") is not None
            lo.append(100 * (d["mean"] - d["ci95_low"]) if ok else 0)
            hi.append(100 * (d["ci95_high"] - d["mean"]) if ok else 0)
    return xs, ys, lo, hi


def plot(budgets: list[dict], depths: list[dict], out: Path) -> None:
    """IB-TPO minus GRPO against decoded tokens and against depth: Welch's 95% interval and,
    beside it, the paired one over shared seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(budgets, "decoded_tokens", "decoded tokens per run (deep task)")]
    if depths:
        panels.append((depths, "steps", "steps per answer (default budget)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (points, key, label) in zip(axes[0], panels):
        for kind, shift, name in (("", 0.0, "Welch"), ("paired_", 0.02, "paired seeds")):
            xs, ys, lo, hi = _gap(points, key, kind)
            span = (max(xs) - min(xs)) if len(xs) > 1 else 1.0
            ax.errorbar([x + shift * span for x in xs], ys, yerr=[lo, hi], marker="o",
                        capsize=4, label=name)
        ax.legend(fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{TREATED} - {BASELINE} (accuracy points, 95% CI)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def first_seeds(path: str, max_seeds: int | None) -> list[str] | None:
    """The cells of a sweep file that the first ``max_seeds`` seeds of each variant make, as
    ``label.s<seed>`` names for ``sweep(cells=...)``; None (every cell) without a limit."""
    from configs.sweep import expand, load_sweep

    if max_seeds is None:
        return None
    seen: dict[str, int] = {}
    names = []
    for cell in expand(load_sweep(path)):
        seen[cell.label] = seen.get(cell.label, 0) + 1
        if seen[cell.label] <= max_seeds:
            names.append(f"{cell.label}.s{cell.seed}")
    return names


def sweep_summary(path: str, report_only: bool,
                  max_seeds: int | None = None) -> tuple[dict, float]:
    """Run the sweep (finished cells are cache hits; with ``max_seeds``, each variant's first
    seeds only) or, with ``report_only``, read its last report; print the report. Returns the
    report's summary and the wall time."""
    from configs.sweep import load_sweep
    from flows.sweep import sweep
    from pipeline.servers import prefect_api

    t0 = time.time()
    if report_only:
        sw = load_sweep(path)
        report = Path(sw.output_dir.replace("${name}", sw.name)) / "report.md"
        cells = "(report only)"
    else:
        with prefect_api():  # as `ibtpo sweep`: one Prefect server for the cells' Ray workers too
            out = sweep(path, first_seeds(path, max_seeds))
        report, cells = Path(out["report"]), out["cells"]
    print(report.read_text())
    print(f"{path}: {(time.time() - t0) / 60:.1f} min, cells: {cells}")
    return json.loads((report.parent / "report.json").read_text()), time.time() - t0


def steps_per_answer(path: str) -> int:
    """The depth of a sweep's task: countdown numbers minus one (the first cell's config)."""
    from configs.sweep import check_cells, expand, load_sweep

    spec = load_sweep(path)
    cfg = next(iter(check_cells(spec, expand(spec)[:1]).values()))
    return cfg.data.countdown.num_count - 1


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sweep", action="append", help="a sweep file, one per budget (repeatable)")
    ap.add_argument("--depth", action="append",
                    help="a sweep file at another depth, default budget (repeatable); the first "
                         "--sweep is the default depth's point")
    ap.add_argument("--no-depth", action="store_true", help="no depth sweeps")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default="bench/results/method_table_budget.png")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: read each sweep's last report.json (cells may be missing)")
    ap.add_argument("--max-seeds", type=int, default=None,
                    help="run and report each variant's first N seeds only (make bench: 5)")
    args = ap.parse_args()
    from ibtpo_core.runtime import set_offline_defaults
    from pipeline.servers import use_local_prefect_home

    set_offline_defaults()
    use_local_prefect_home()  # before Prefect is imported, as the `ibtpo` command does

    from configs.schema import load_config
    from configs.sweep import load_sweep

    sweeps = args.sweep or DEFAULT
    budgets = []
    for f in sweeps:
        summary, wall = sweep_summary(f, args.report_only, args.max_seeds)
        budgets.append({**budget_row(summary), "sweep": f, "wall_s": round(wall, 1),
                        "summary": summary})
    first = budgets[0]["summary"]
    depths = [{**depth_row(first, steps_per_answer(sweeps[0])), "sweep": sweeps[0]}]
    for f in [] if args.no_depth else (args.depth or DEFAULT_DEPTH):
        summary, wall = sweep_summary(f, args.report_only, args.max_seeds)
        depths.append({**depth_row(summary, steps_per_answer(f)), "sweep": f,
                       "wall_s": round(wall, 1)})
    depths.sort(key=lambda d: d["steps"])
    budgets.sort(key=lambda b: b["decoded_tokens"])
    spec = load_sweep(sweeps[0])
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
        "depths": [{k: v for k, v in d.items() if k not in ("sweep", "wall_s")} for d in depths],
    }
    line = nan_to_null(line)
    if args.plot:
        plot(line["budgets"], line["depths"] if len(depths) > 1 else [], Path(args.plot))
        print(f"plot: {args.plot}")
    runs = [{k: v for k, v in b.items() if k != "summary"} for b in budgets]
    depth_runs = [{"sweep": d["sweep"], "wall_s": d.get("wall_s")} for d in depths]
    write_json(args.json, {**line, "runs": nan_to_null(runs),
                           "depth_runs": nan_to_null(depth_runs)})
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
