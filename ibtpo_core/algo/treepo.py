"""TreePO's segment tree sampler (method.md §6).

Li et al. 2025, "TreePO: Bridging the Gap of Policy Optimization and Efficacy and Inference
Efficiency with Heuristic Tree-based Modeling" (arXiv 2508.17445); reference code
multimodal-art-projection/TreePO, ``recipe/treepo/vllm_rollout_tree.py`` with the settings of
``recipe/treepo/run_treepo_train.sh`` (``tree_max_token_per_step``, ``tree_fixed_step_div: 2``,
``tree_max_depth``, ``max_width`` = the rollout's n). Registered as sampler ``treepo``:

    S = segment_tokens (default max_new_tokens // 4), W = G (the most leaves a tree grows)
    M = TreeSpec.M open paths from the root (the reference draws 2..8 at random per prompt)
    segment by segment, every open path decodes up to S tokens (one node each); a path closes
        at EOS, at the token limit, or when its segment repeats the one before it (the
        reference's repetition early stop)
    before the next segment, each open path branches into segment_branches children (the
        reference's fixed divergence, 2) while the tree's open and closed paths stay within W,
        else it continues alone
    then the budget's rest (G x mean response length, as every sampler's) goes to independent
        samples from the root (fill_budget), where the reference re-branches from random nodes

Token accounting as IBTree's: decoded tokens only, a shared segment once. Pure torch.
"""
from __future__ import annotations

from ibtpo_core.algo.ib_score import ScoreSpec
from ibtpo_core.algo.sampling import (
    SAMPLERS,
    SampleResult,
    ScoreFn,
    TreeSpec,
    finish,
)
from ibtpo_core.algo.tree import Tree
from ibtpo_core.engines.base import RolloutEngine, StopConditions


def segment_length(spec: TreeSpec, max_new_tokens: int) -> int:
    return spec.segment_tokens or max(1, max_new_tokens // 4)


def widths(open_paths: int, closed: int, limit: int, branches: int) -> list[int]:
    """Children per open path for the next segment: ``branches`` each, first come first
    served, while open + closed paths stay within ``limit``; the rest continue alone."""
    out, total = [], open_paths + closed
    for _ in range(open_paths):
        if total + branches - 1 <= limit:
            out.append(branches)
            total += branches - 1
        else:
            out.append(1)
    return out


@SAMPLERS.register("treepo")
def sample_treepo(engine: RolloutEngine, prompts: list[list[int]], spec: TreeSpec,
                  score_fn: ScoreFn, stop: StopConditions, max_new_tokens: int,
                  temperature: float = 1.0, seed: int = 0, ib: ScoreSpec | None = None
                  ) -> SampleResult:
    ib = ib or ScoreSpec()
    S = segment_length(spec, max_new_tokens)
    trees = [Tree(p, {"prompt_index": i}) for i, p in enumerate(prompts)]
    used = [0] * len(prompts)
    closed = [0] * len(prompts)
    # open paths: (tree, node the next segment hangs from, children it gets)
    frontier = [(t, 0, spec.initial_samples) for t in range(len(prompts))]
    lengths: list[int] = []  # finished responses' lengths, for the budget
    depth = 0
    while frontier:
        depth += 1
        jobs = []
        for t, node, k in frontier:
            limit = max_new_tokens - len(trees[t].response_tokens(node))
            jobs += [(t, node, min(S, limit))] * k
        comps = engine.generate([trees[t].prefix_tokens(node) for t, node, _ in jobs],
                                num_samples=1, temperature=temperature,
                                max_new_tokens=[n for _, _, n in jobs], stop=stop,
                                seed=seed + depth)
        nxt = []
        for (t, node, _), c in zip(jobs, comps):
            used[t] += len(c.token_ids)
            tree = trees[t]
            total = len(tree.response_tokens(node)) + len(c.token_ids)
            repeats = node != 0 and tree.nodes[node].tokens == list(c.token_ids)
            done = (c.finish_reason == "eos" or total >= max_new_tokens or repeats
                    or not c.token_ids)
            if done:
                reward = score_fn(t, tree.response_tokens(node) + c.token_ids)
                tree.add_node(node, c.token_ids, c.logprobs, c.entropies, reward=reward,
                              final=c.finish_reason == "eos")
                closed[t] += 1
                lengths.append(total)
                if repeats:
                    tree.meta["repetition_stops"] = tree.meta.get("repetition_stops", 0) + 1
            else:
                nxt.append((t, tree.add_node(node, c.token_ids, c.logprobs, c.entropies)))
        frontier = []
        by_tree: dict[int, list[int]] = {}
        for t, node in nxt:
            by_tree.setdefault(t, []).append(node)
        for t, nodes in by_tree.items():
            for node, k in zip(nodes, widths(len(nodes), closed[t], spec.G, spec.segment_branches)):
                if k > 1:
                    trees[t].meta.setdefault("picks", []).append([depth, node])
                frontier.append((t, node, k))
    mean_len = sum(lengths) / max(1, len(lengths))
    budget = float(spec.budget_tokens) if spec.budget_tokens else spec.G * mean_len
    metrics = finish(engine, trees, used, budget, mean_len, spec, score_fn, stop, max_new_tokens,
                     temperature, seed, depth, ib)
    metrics["tree/repetition_stops"] = sum(t.meta.get("repetition_stops", 0)
                                           for t in trees) / max(1, len(trees))
    return SampleResult(trees, metrics)
