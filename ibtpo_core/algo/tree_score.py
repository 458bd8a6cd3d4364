"""``ibtpo tree-score``: every quantity of docs/method.md §2 and §4 for one tree, as one JSON
object.

Reads a tree file (the JSON format of ``Tree.to_json``), computes n, c, V, H, I, IB and the
advantages A_GL, A_IB, A of every node and returns ``{"nodes": [...]}`` with the file's own node
ids; undefined values (H, I, IB of leaves; advantages of the root) are null.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from ibtpo_core.algo.advantages import (
    AdvantageSpec,
    compute_advantages,
    global_advantage,
    local_advantage,
)
from ibtpo_core.algo.ib_score import Forest, ScoreSpec, compute_stats
from ibtpo_core.algo.tree import Tree


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def score_tree(tree: Tree, ib: ScoreSpec | None = None, adv: AdvantageSpec | None = None
               ) -> dict:
    """Every node's quantities; ``A`` is IB-TPO's advantage under ``adv``'s local term (unset
    specs: their defaults)."""
    ib, adv = ib or ScoreSpec(), adv or AdvantageSpec()
    f = Forest.from_trees([tree])
    stats = compute_stats(f, ib.beta, ib.ib_form, ib.entropy_estimator)
    a_gl = global_advantage(f, stats.V)
    a_ib = local_advantage(f, stats.V, adv.local_advantage, stats.n, stats, adv.ib_beta)
    A = compute_advantages(f, stats, replace(adv, name="ibtpo"))
    ids = tree.meta.get("original_ids", list(range(len(tree.nodes))))
    out = []
    for i, node in enumerate(tree.nodes):
        root = node.parent is None
        out.append(
            {
                "id": ids[i],
                "n": int(stats.n[i]),
                "c": float(stats.c[i]),
                "V": float(stats.V[i]),
                "H": _num(float(stats.H[i])),
                "I": _num(float(stats.I[i])),
                "IB": _num(float(stats.IB[i])),
                "A_GL": None if root else float(a_gl[i]),
                "A_IB": None if root else float(a_ib[i]),
                "A": None if root else float(A[i]),
            }
        )
    return {"nodes": out}


def score_tree_file(path: str, ib: ScoreSpec | None = None,
                    adv: AdvantageSpec | None = None) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tree file {p} does not exist")
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"tree file {p} is not valid JSON: {err}") from None
    return score_tree(Tree.from_json(obj), ib, adv)
