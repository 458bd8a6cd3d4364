"""The comparison report of a sweep: read every cell's training run from MLflow, aggregate per
method (the cell label) over seeds, write markdown + JSON + plots, log them to the sweep's run.

Per method: held-out accuracy (mean and SE over seeds), its difference to the baseline with a
Welch 95% interval, accuracy at equal decoded tokens and at equal RL wall time (read off each
run's accuracy curve at the smallest total any run reached), pass@k and distinct correct
solutions before and after RL, trajectories and unique trajectories per budget (and unique ones
relative to the baseline), Eff-Rate, decoded tokens, RL wall time, the final training reward
(mean of the last ``FINAL_ITERATIONS`` iterations: far above test accuracy means memorisation) and
the task's unique-leaf ceiling measured on the warm-up policy.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient

from ibtpo_core.stats import interp, mean_se, paired_diff, welch_diff
from pipeline import tracking

PER_ITERATION = {
    "leaves_per_budget": "tree/leaves_per_budget",
    "unique_leaves_per_budget": "tree/unique_leaves_per_budget",
    "eff_rate": "eff_rate",
    "identical_sibling_frac": "tree/identical_sibling_frac",
}
IB_CURVES = ("ib_probe/score_mean", "ib/score_mean")
FINAL_ITERATIONS = 5  # the training reward at the end: a mean over this many last iterations


@dataclass
class CellRun:
    """One finished training run of a sweep cell, as read back from MLflow."""

    name: str
    label: str
    seed: int
    run_id: str
    final: dict[str, float]      # evaluation after RL: accuracy, accuracy_se, pass_at_k, ...
    before: dict[str, float]     # evaluation of the warm-up checkpoint
    per_iteration: dict[str, float]  # means over iterations of PER_ITERATION
    decoded: float
    rl_wall: float
    curve: list[tuple[float, float, float]]  # (decoded tokens, RL wall s, accuracy)
    ib: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    order: int = 0  # the cell's place in the sweep file (rows follow the file's order)
    trees: bool = True  # sampled trees (IBTree); flat groups have no training-tree diagnostic
    train_reward_final: float = math.nan  # mean reward over the last FINAL_ITERATIONS iterations
    split: str = "test"  # the held-out split its evaluations scored (eval.split)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _child(client: MlflowClient, run, stage: str):
    found = client.search_runs([run.info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
                               f"tags.`ibtpo.stage` = '{stage}'", max_results=1)
    return found[0] if found else None


def _at_step(client: MlflowClient, run_id: str, step: int) -> dict[str, float]:
    run = client.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        vals = [v for s, v in _history(client, run_id, key) if s == step]
        if vals:
            out[key] = vals[-1]
    return out


def read_cell(client: MlflowClient, run) -> CellRun | None:
    """The report's view of one training run; None if it has no final evaluation."""
    ev = _child(client, run, "evaluate")
    if ev is None:
        return None
    # the final evaluation is logged at the iterations the run did: rl.iterations, or fewer
    # where rl.decoded_tokens stopped it
    steps = [s for s, _ in _history(client, ev.info.run_id, "accuracy")]
    iterations = max(steps) if steps else int(float(run.data.params.get("rl.iterations", "0")))
    final, before = (
        _at_step(client, ev.info.run_id, iterations),
        _at_step(client, ev.info.run_id, 0),
    )
    if "accuracy" not in final:
        return None
    rid = run.info.run_id
    per_it = {}
    for name, key in PER_ITERATION.items():
        vals = [v for _, v in _history(client, rid, key)]
        per_it[name] = sum(vals) / len(vals) if vals else math.nan
    rewards = [v for _, v in _history(client, rid, "reward")][-FINAL_ITERATIONS:]
    decoded = (_history(client, rid, "decoded_tokens_total") or [(0, 0.0)])[-1][1]
    rl_wall = (_history(client, rid, "rl_wall_s_total") or [(0, 0.0)])[-1][1]
    curve_run = _child(client, run, "curve")
    if curve_run is not None:
        acc = _history(client, curve_run.info.run_id, "curve/accuracy")
        tok = dict(_history(client, curve_run.info.run_id, "curve/decoded_tokens"))
        wall = dict(_history(client, curve_run.info.run_id, "curve/rl_wall_s"))
        curve = [(tok[s], wall[s], a) for s, a in acc]
    else:  # only before and after: a straight line between them
        curve = [
            (0.0, 0.0, before.get("accuracy", math.nan)),
            (decoded, rl_wall, final["accuracy"]),
        ]
    tags = run.data.tags
    return CellRun(name=run.info.run_name, label=tags.get("ibtpo.sweep_cell", run.info.run_name),
                   seed=int(tags.get("ibtpo.seed", run.data.params.get("seed", 0))), run_id=rid,
                   final=final, before=before, per_iteration=per_it, decoded=decoded,
                   rl_wall=rl_wall, curve=curve,
                   ib={k: _history(client, rid, k) for k in IB_CURVES},
                   order=int(tags.get("ibtpo.cell_index", 0)),
                   trees=run.data.params.get("algo.tree.sampler", "ibtree") != "independent",
                   train_reward_final=sum(rewards) / len(rewards) if rewards else math.nan,
                   split=run.data.params.get("eval.split", "test"))


REUSED_PREFIX = "ibtpo.cell_run."


def report_cell_tag(cell_index: int) -> str:
    """The sweep run's tag naming the training run of a cell that finished before this sweep run
    (a cache hit made under another sweep run: the file gained seeds or variants since)."""
    return f"{REUSED_PREFIX}{cell_index}"


def _reused_runs(client: MlflowClient, sweep) -> dict[int, object]:
    """The finished training runs the sweep run's ``report_cell_tag`` tags name, by cell index;
    a run this store does not hold (the result came from another store) is left out."""
    from mlflow.exceptions import MlflowException

    found = {}
    for key, run_id in sweep.data.tags.items():
        if not key.startswith(REUSED_PREFIX):
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        if run.info.status == "FINISHED":
            found[int(key.removeprefix(REUSED_PREFIX))] = run
    return found


def collect(sweep_run_id: str) -> list[CellRun]:
    """The latest finished training run of every cell of the sweep run: those it ran, and those
    it found finished before (cache hits, possibly made under another sweep run)."""
    client = MlflowClient(tracking.tracking_uri())
    sweep = client.get_run(sweep_run_id)
    runs = client.search_runs([sweep.info.experiment_id],
                              f"tags.`ibtpo.sweep_run_id` = '{sweep_run_id}' and "
                              f"tags.`ibtpo.kind` = 'train' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    latest, order = {}, {}
    for run in runs:
        latest.setdefault(run.info.run_name, run)
    for index, run in _reused_runs(client, sweep).items():
        latest.setdefault(run.info.run_name, run)
        order[run.info.run_id] = index  # its place in this sweep's file, not the old one's
    cells = [read_cell(client, r) for r in latest.values()]
    cells = [c for c in cells if c is not None]
    for c in cells:
        c.order = order.get(c.run_id, c.order)
    return sorted(cells, key=lambda c: (c.order, c.label, c.seed))


def _pass_key(metrics: dict) -> str | None:
    return next((k for k in sorted(metrics) if k.startswith("pass_at_")), None)


def summarize(cells: list[CellRun], baseline: str | None) -> dict:
    """Per label: the report's figures (see the module docstring); JSON-ready."""
    if not cells:
        raise ValueError("the sweep has no finished cells to report on")
    labels = list(dict.fromkeys(c.label for c in cells))
    groups = {lab: [c for c in cells if c.label == lab] for lab in labels}
    common_tokens = min(c.curve[-1][0] for c in cells)
    common_wall = min(c.curve[-1][1] for c in cells)
    pk = _pass_key(cells[0].final) or "pass_at_k"
    base = groups.get(baseline) if baseline else None
    methods = {}
    for lab, group in groups.items():
        accs = [c.final["accuracy"] for c in group]
        m, se = mean_se(accs)
        if len(group) == 1:
            se = group[0].final.get("accuracy_se", math.nan)  # one seed: the evaluation's own SE
        row = {
            "n_seeds": len(group),
            "acc_mean": m,
            "acc_se": se,
            "acc_before": mean_se([c.before.get("accuracy", math.nan) for c in group])[0],
            "acc_at_equal_tokens": mean_se(
                [
                    interp([p[0] for p in c.curve], [p[2] for p in c.curve], common_tokens)
                    for c in group
                ]
            )[0],
            "acc_at_equal_wall": mean_se(
                [
                    interp([p[1] for p in c.curve], [p[2] for p in c.curve], common_wall)
                    for c in group
                ]
            )[0],
            pk: mean_se([c.final.get(pk, math.nan) for c in group])[0],
            f"{pk}_before": mean_se([c.before.get(pk, math.nan) for c in group])[0],
            "distinct_correct": mean_se([c.final.get("distinct_correct", math.nan) for c in group])[
                0
            ],
            "distinct_correct_before": mean_se(
                [c.before.get("distinct_correct", math.nan) for c in group]
            )[0],
            "decoded_tokens": mean_se([c.decoded for c in group])[0],
            "wall_s": mean_se([c.rl_wall for c in group])[0],
            "train_reward_final": mean_se([c.train_reward_final for c in group])[0],
            "ceiling_unique_ratio": mean_se(
                [c.before.get("task/ceiling_unique_ratio", math.nan) for c in group]
            )[0],
        }
        for name in PER_ITERATION:
            row[name] = mean_se([c.per_iteration.get(name, math.nan) for c in group])[0]
        if base is not None:
            row[f"diff_vs_{baseline}"] = welch_diff(accs, [c.final["accuracy"] for c in base])
            row[f"paired_diff_vs_{baseline}"] = paired_diff(
                {c.seed: c.final["accuracy"] for c in group},
                {c.seed: c.final["accuracy"] for c in base})
        methods[lab] = row
    if base is not None:
        ref = methods[baseline]["unique_leaves_per_budget"]
        for row in methods.values():
            row[f"unique_leaves_vs_{baseline}"] = (
                row["unique_leaves_per_budget"] / ref if ref else math.nan
            )
    ceilings = [c.before.get("task/ceiling_unique_ratio", math.nan) for c in cells]
    return {"methods": methods, "baseline": baseline, "equal_tokens": common_tokens,
            "equal_wall_s": common_wall, "pass_key": pk,
            "eval_split": " and ".join(dict.fromkeys(c.split for c in cells)),
            "ceiling_unique_ratio": mean_se(ceilings)[0],
            "cells": [{"name": c.name, "label": c.label, "seed": c.seed, "run_id": c.run_id,
                       "accuracy": c.final["accuracy"]} for c in cells]}


def _f(x: float, fmt: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _diff_cell(d: dict | None) -> str:
    """``+1.9 pts [-1.5, +5.3]`` (a paired one adds its number of seed pairs), ``-`` for none."""
    if d is None:
        return "-"
    low, high = _f(100 * d["ci95_low"], "+.1f"), _f(100 * d["ci95_high"], "+.1f")
    pairs = f" ({d['n_pairs']} pairs)" if "n_pairs" in d else ""
    return f"{100 * d['mean']:+.1f} pts [{low}, {high}]{pairs}"


def markdown(summary: dict, title: str) -> str:
    b, pk = summary["baseline"], summary["pass_key"]
    tok, wall = summary["equal_tokens"], summary["equal_wall_s"]
    head = [
        "method",
        "seeds",
        "accuracy",
        f"diff vs {b} [95% CI]" if b else "diff",
        "paired diff [95% CI]",
        f"acc @ {tok:,.0f} tokens",
        f"acc @ {wall:.0f} s RL",
        f"{pk} before -> after",
        "distinct correct",
        "leaves/budget",
        "unique/budget",
        f"unique vs {b}" if b else "unique ratio",
        "Eff-Rate",
        "identical siblings",
        "train reward (end)",
        "decoded tokens",
        "RL wall s",
    ]
    lines = [f"# {title}", "",
             f"Accuracy: the held-out {summary.get('eval_split', 'test')} split after RL, mean "
             "+- SE over seeds. The difference to "
             f"{b or 'the baseline'} has a Welch 95% interval over seeds; the paired one is "
             "over the seeds both ran (same seed: same warm-up, prompts and evaluation draws), "
             "narrower when a seed moves both methods alike. Equal-token and "
             "equal-time accuracies are read off each run's accuracy curve (a subset of that "
             "split, every few iterations) at the smallest total that every run reached. "
             "Identical siblings: the share of branches whose first step a sibling already had "
             "(trees only). Train reward (end): the mean reward of the last "
             f"{FINAL_ITERATIONS} iterations; far above the accuracy means memorisation. "
             f"The task's ceiling on unique leaves per budget (warm-up policy): "
             f"{_f(summary.get('ceiling_unique_ratio', math.nan), '.2f')}x.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lab, r in summary["methods"].items():
        diff, paired = (_diff_cell(r.get(f"{kind}diff_vs_{b}") if b and lab != b else None)
                        for kind in ("", "paired_"))
        lines.append("| " + " | ".join([
            lab, str(r["n_seeds"]), f"{_f(r['acc_mean'])} +- {_f(r['acc_se'])}", diff, paired,
            _f(r["acc_at_equal_tokens"]), _f(r["acc_at_equal_wall"]),
            f"{_f(r[f'{pk}_before'])} -> {_f(r[pk])}",
            f"{_f(r['distinct_correct_before'], '.2f')} -> {_f(r['distinct_correct'], '.2f')}",
            _f(r["leaves_per_budget"], ".2f"), _f(r["unique_leaves_per_budget"], ".2f"),
            _f(r.get(f"unique_leaves_vs_{b}", math.nan), ".2f") + "x",
            _f(r["eff_rate"], ".2f"), _f(r["identical_sibling_frac"], ".2f"),
            _f(r["train_reward_final"]), f"{r['decoded_tokens']:,.0f}",
            f"{r['wall_s']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def plots(cells: list[CellRun], out: Path) -> list[Path]:
    """Accuracy against decoded tokens and against RL wall time; the IB diagnostic over
    training (probe trees for every method, training trees for the tree methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(c.label for c in cells))
    color = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for c in cells:
        kw = {"color": color[c.label], "alpha": 0.8, "label": c.label if c.seed == min(
            x.seed for x in cells if x.label == c.label) else None}
        axes[0].plot([p[0] for p in c.curve], [p[2] for p in c.curve], marker=".", **kw)
        axes[1].plot([p[1] for p in c.curve], [p[2] for p in c.curve], marker=".", **kw)
        for key, style in zip(IB_CURVES, ("-", ":")):
            if c.ib.get(key) and (c.trees or "probe" in key):
                axes[2].plot(
                    *zip(*c.ib[key]),
                    linestyle=style,
                    **{
                        **kw,
                        "label": (
                            f"{c.label} ({'probe' if 'probe' in key else 'train'})"
                            if kw["label"]
                            else None
                        ),
                    },
                )
    for ax, (x, y) in zip(axes, [("decoded tokens", "accuracy"), ("RL wall time (s)", "accuracy"),
                                 ("iteration", "IB-Score (mean over branching nodes)")]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def write_report(sweep_run_id: str, out_dir: str | Path | None = None) -> Path:
    """Write report.md, report.json and report.png for the sweep run and log them to it."""
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(sweep_run_id)
    out = Path(out_dir or run.data.tags.get("ibtpo.report_dir") or f"runs/reports/{sweep_run_id}")
    out.mkdir(parents=True, exist_ok=True)
    cells = collect(sweep_run_id)
    baseline = run.data.params.get("report.baseline")
    baseline = baseline if baseline and baseline != "None" else None
    if baseline and baseline not in {c.label for c in cells}:
        baseline = None  # the baseline's cells did not finish: report without differences
    summary = summarize(cells, baseline)
    name = run.info.run_name
    (out / "report.md").write_text(markdown(summary, f"Sweep {name}: equal-budget comparison"))
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    paths = [out / "report.md", out / "report.json"] + plots(cells, out)
    for p in paths:
        client.log_artifact(sweep_run_id, str(p), "report")
    return out / "report.md"
