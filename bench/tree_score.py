"""Scoring speed: values, IB-Score and advantages of a batch of trees, vectorised vs a loop.

Builds 256 random trees of 16 leaves each (6 tokens a step), then times the vectorised
``Forest`` path (flatten + compute_stats + advantages) against the plain per-node loop that the
tests use as an oracle. Prints a table and writes JSON.

    python bench/tree_score.py [--json PATH] [--trees 256] [--leaves 16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_json  # noqa: E402

from ibtpo_core.algo.advantages import AdvantageSpec, compute_advantages  # noqa: E402
from ibtpo_core.algo.ib_score import Forest, compute_stats  # noqa: E402
from ibtpo_core.algo.tree import Tree  # noqa: E402
from ibtpo_core.runtime import set_threads  # noqa: E402
from tests.tree_reference import reference  # noqa: E402


def tree_with_leaves(rng: random.Random, leaves: int, step_tokens: int = 6) -> Tree:
    t = Tree([1, 2, 3])

    def add_path(node: int) -> None:
        for _ in range(rng.randint(1, 4)):
            node = t.add_node(node, [rng.randint(4, 200) for _ in range(step_tokens)],
                              [-rng.random() for _ in range(step_tokens)],
                              [rng.random() for _ in range(step_tokens)])
        t.nodes[node].reward = float(rng.random() < 0.4)

    add_path(0)
    while len(t.leaves()) < leaves:
        inner = [n.id for n in t.nodes if n.children or n.parent is None]
        add_path(rng.choice(inner))
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--trees", type=int, default=256)
    ap.add_argument("--leaves", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    threads = set_threads(os.cpu_count() or 1)
    rng = random.Random(0)
    trees = [tree_with_leaves(rng, args.leaves) for _ in range(args.trees)]
    spec = AdvantageSpec()

    def vectorised():
        f = Forest.from_trees(trees)
        compute_advantages(f, compute_stats(f), spec)

    forest = Forest.from_trees(trees)

    def score_only():
        compute_advantages(forest, compute_stats(forest), spec)

    def loop():
        for t in trees:
            reference(t)

    vec, lp, so = [], [], []
    vectorised(), loop(), score_only()
    for _ in range(args.repeats):  # interleaved, so all three see the same machine load
        for fn, times in ((vectorised, vec), (score_only, so), (loop, lp)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    v, l, o = statistics.median(vec), statistics.median(lp), statistics.median(so)
    nodes = sum(len(t.nodes) for t in trees)
    res = {"trees": args.trees, "leaves_per_tree": args.leaves, "nodes": nodes, "threads": threads,
           "vectorised_s": v, "score_only_s": o, "loop_s": l, "speedup_ratio": l / v,
           "score_only_speedup_ratio": l / o}
    print(f"{args.trees} trees x {args.leaves} leaves ({nodes} nodes), median of {args.repeats}")
    print(f"{'path':>12} {'seconds':>9}")
    print(f"{'vectorised':>12} {v:>9.4f}   (flatten + score)")
    print(f"{'score only':>12} {o:>9.4f}   (forest already flat)")
    print(f"{'loop':>12} {l:>9.4f}")
    print(f"ratio loop / vectorised {l / v:.1f}x; loop / score only {l / o:.1f}x")
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
