"""A picture of one sampling tree: where the sampler branched, and why.

Steps are drawn as nodes, root at the top, one column per leaf. Internal nodes are coloured by
their IB-Score, leaves by reward (green 1, red 0); a node the sampler picked to branch from in
round r carries a black ring and ``r<r>`` (the picks are in the tree file's ``meta.picks``, as
``[round, node id]``). Each node is labelled with the start of its step's text when a decoder
is given. Reads a tree file's content and the scores of ``tree_score``; writes a PNG. Knows
nothing of MLflow or the pipeline.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from ibtpo_core.algo.ib_score import ScoreSpec
from ibtpo_core.algo.tree import Tree
from ibtpo_core.algo.tree_score import score_tree


def _layout(tree: Tree) -> dict[int, tuple[float, float]]:
    """(x, y) per node: leaves one column apart in depth-first order, a parent centred over
    its children, depth downwards."""
    pos: dict[int, tuple[float, float]] = {}
    next_x = [0.0]

    def place(i: int, depth: int) -> float:
        kids = tree.nodes[i].children
        if not kids:
            x = next_x[0]
            next_x[0] += 1.0
        else:
            xs = [place(k, depth + 1) for k in kids]
            x = sum(xs) / len(xs)
        pos[i] = (x, -float(depth))
        return x

    place(0, 0)
    return pos


def picks_by_node(tree: Tree) -> dict[int, list[int]]:
    """Node index (as parsed) -> the rounds in which the sampler branched from it."""
    original = tree.meta.get("original_ids", list(range(len(tree.nodes))))
    index = {orig: i for i, orig in enumerate(original)}
    out: dict[int, list[int]] = {}
    for rnd, node in tree.meta.get("picks", []):
        if node in index:
            out.setdefault(index[node], []).append(int(rnd))
    return out


def draw_tree(
    tree_json: dict,
    out_png: str | Path,
    decode: Callable[[list[int]], str] | None = None,
    title: str | None = None,
    beta: float | None = None,
) -> Path:
    """Write the picture of the tree in ``tree_json`` (the tree file format) to ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    tree = Tree.from_json(tree_json)
    has_entropy = all(n.entropies for n in tree.nodes[1:] if n.tokens)
    spec = ScoreSpec(**({} if beta is None else {"beta": beta}),  # unset: ScoreSpec's default
                     entropy_estimator="token_entropy" if has_entropy else "surprisal")
    scores = score_tree(tree, spec)["nodes"]
    pos = _layout(tree)
    picks = picks_by_node(tree)
    ib = [s["IB"] for s in scores if s["IB"] is not None]
    norm = colors.Normalize(vmin=min(ib, default=0.0), vmax=max(ib, default=1.0) or 1.0)
    cmap = matplotlib.colormaps["viridis"]
    n_leaves = max(1, len(tree.leaves()))
    depth = max(1, int(-min(y for _, y in pos.values())))
    fig, ax = plt.subplots(figsize=(min(40, 2 + 1.3 * n_leaves), min(30, 2 + 1.2 * depth)))
    for node in tree.nodes[1:]:
        (x0, y0), (x1, y1) = pos[node.parent], pos[node.id]
        ax.plot([x0, x1], [y0, y1], color="0.6", lw=1, zorder=1)
    for node, s in zip(tree.nodes, scores):
        x, y = pos[node.id]
        if node.parent is None:
            face = "0.85"
        elif node.is_leaf:
            face = "#2ca02c" if (node.reward or 0) > 0.5 else "#d62728"
        else:
            face = cmap(norm(s["IB"])) if s["IB"] is not None else "0.85"
        picked = node.id in picks
        ax.scatter([x], [y], s=420, c=[face], edgecolors="black" if picked else "0.4",
                   linewidths=2.5 if picked else 0.6, zorder=2)
        if picked:
            ax.annotate("r" + ",".join(map(str, picks[node.id])), (x, y), xytext=(9, 7),
                        textcoords="offset points", fontsize=8, fontweight="bold")
        if decode is not None and node.parent is not None:
            text = decode(node.tokens).replace("\n", " ").strip()
            ax.annotate(text[:18] + ("..." if len(text) > 18 else ""), (x, y), xytext=(0, -17),
                        textcoords="offset points", ha="center", fontsize=7)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.6,
                 label=f"IB-Score of internal nodes (H + {spec.beta:g} I)")
    correct = sum(1 for n in tree.leaves() if (n.reward or 0) > 0.5)
    rounds = sorted({r for rs in picks.values() for r in rs})
    fill = tree.meta.get("fill_samples", 0)
    ax.set_title(
        (title + "\n" if title else "")
        + f"{n_leaves} leaves, {correct} correct (green) / {n_leaves - correct} wrong (red); "
        f"ringed: branched from in round"
        + ("s " + ", ".join(map(str, rounds)) if rounds else "s: none")
        + (f"; {fill} budget-fill samples from the root" if fill else ""),
        fontsize=9,
    )
    ax.set_axis_off()
    ax.margins(x=0.5 / math.sqrt(n_leaves), y=0.15)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
