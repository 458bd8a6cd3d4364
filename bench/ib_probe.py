"""The IB diagnostic over training, per method (method.md §2; the paper's motivation figure):
does GRPO's policy lose the balance of diversity (H) and information (I) at the branching steps,
and does IB-TPO's keep it?

Reads a finished sweep's report.json (its cells' training runs) and, from MLflow, each run's
probe metrics ``ib_probe/{score,h,i}_mean``: IBTree with its default settings grown every
``rl.rollout.probe_every`` iterations on the same fixed validation problems for every method,
never trained on. Averages over seeds per iteration, plots the three curves with a standard error
band, prints a table and ends with one JSON line:

    {"sweep", "methods": {NAME: {"n_seeds", "iterations": [...],
       "score_mean": [...], "score_se": [...], "h_mean": [...], "h_se": [...],
       "i_mean": [...], "i_se": [...]}}}

    python bench/ib_probe.py (--sweep FILE | --report REPORT_JSON) [--methods grpo ibtpo]
                             [--plot PATH] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import nan_to_null, write_json  # noqa: E402

KEYS = {"score": "ib_probe/score_mean", "h": "ib_probe/h_mean", "i": "ib_probe/i_mean"}


def curves(histories: list[dict[str, list[tuple[int, float]]]]) -> dict:
    """Per-iteration mean and standard error over runs of each key's history, at the iterations
    every run logged (a run cut short narrows the range, it does not bias a point)."""
    from ibtpo_core.stats import mean_se

    steps = None
    for h in histories:
        s = set.intersection(*(set(x for x, _ in h.get(k, [])) for k in KEYS))
        steps = s if steps is None else steps & s
    steps = sorted(steps or [])
    out: dict = {"n_seeds": len(histories), "iterations": steps}
    for name in KEYS:
        means, ses = [], []
        for step in steps:
            vals = [dict(h[name])[step] for h in histories]
            m, se = mean_se(vals)
            means.append(m)
            ses.append(se)
        out[f"{name}_mean"], out[f"{name}_se"] = means, ses
    return out


def read_histories(run_ids: list[str]) -> list[dict[str, list[tuple[int, float]]]]:
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    client = MlflowClient(tracking.tracking_uri())
    return [{name: sorted((m.step, m.value) for m in client.get_metric_history(rid, key))
             for name, key in KEYS.items()} for rid in run_ids]


def plot(methods: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    titles = {"score": "IB-Score (mean over branching nodes)", "h": "H: diversity of the step",
              "i": "I: information in the step"}
    for i, (name, c) in enumerate(methods.items()):
        color = plt.cm.tab10(i % 10)
        for ax, key in zip(axes, KEYS):
            m, se = c[f"{key}_mean"], c[f"{key}_se"]
            ax.plot(c["iterations"], m, marker=".", color=color,
                    label=f"{name} ({c['n_seeds']} seeds)")
            ok = [not math.isnan(s) for s in se]
            if all(ok):
                ax.fill_between(c["iterations"], [a - b for a, b in zip(m, se)],
                                [a + b for a, b in zip(m, se)], color=color, alpha=0.2)
    for ax, key in zip(axes, KEYS):
        ax.set_xlabel("iteration")
        ax.set_title(titles[key], fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--sweep", help="a sweep file whose report was written")
    src.add_argument("--report", help="a sweep's report.json (e.g. a copy in docs/results/reports)")
    ap.add_argument("--methods", nargs="*", default=None, help="variants to plot (default: all)")
    ap.add_argument("--plot", default="bench/results/ib_probe.png")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from ibtpo_core.runtime import set_offline_defaults

    set_offline_defaults()
    if args.report:
        report = Path(args.report)
    else:
        from configs.sweep import load_sweep

        sw = load_sweep(args.sweep)
        report = Path(sw.output_dir.replace("${name}", sw.name)) / "report.json"
    if not report.is_file():
        raise SystemExit(f"{report} does not exist: run `ibtpo sweep {args.sweep}` first"
                         if args.sweep else f"{report} does not exist")
    cells = json.loads(report.read_text())["cells"]
    names = args.methods or list(dict.fromkeys(c["label"] for c in cells))
    methods = {}
    for name in names:
        ids = [c["run_id"] for c in cells if c["label"] == name]
        if not ids:
            raise SystemExit(f"{report} has no cell labelled {name!r}; it has "
                             f"{sorted(set(c['label'] for c in cells))}")
        methods[name] = curves(read_histories(ids))
    print("| method | seeds | iteration | IB-Score | H | I |\n|---|---|---|---|---|---|")
    for name, c in methods.items():
        for j, step in enumerate(c["iterations"]):
            print(f"| {name} | {c['n_seeds']} | {step} | {c['score_mean'][j]:.3f} "
                  f"± {c['score_se'][j]:.3f} | {c['h_mean'][j]:.3f} | {c['i_mean'][j]:.3f} |")
    if args.plot:
        plot(methods, Path(args.plot))
        print(f"plot: {args.plot}")
    line = nan_to_null({"sweep": args.sweep or str(report), "methods": methods})
    write_json(args.json, line)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
