"""TreeRL's EPTree sampler: token-level forks at the most uncertain tokens (method.md §6).

Hou et al. 2025, "TreeRL: LLM Reinforcement Learning with On-Policy Tree Search" (ACL), §3.1;
reference code THUDM/TreeRL, ``openrlhf/trainer/ppo_utils/entropy_chain_local_manager.py``
(the sample, select, expand loop) and ``tree_node.py`` (the fork-point mask,
``get_max_entropy_tokens``). Registered as sampler ``eptree``:

    M = TreeSpec.M (default G // 2) independent responses per prompt, cut into steps
    L = C - 1 rounds; in each, for every initial response (a child of the root and what grew
        below it), its fork_top_n tokens of highest -log pi_old (surprisal, as the reference
        code scores them), skipping a branch's first token (it would repeat the fork), every
        token of a final step (no forks after the answer starts) and a response's first token
    each chosen token is forked fork_branches times: its node is split before it
        (``Tree.split``) and fork_branches continuations are sampled from the prefix that ends
        just before it, so the uncertain token itself is drawn again
    a tree's forks are taken in order of surprisal while their cost (fork_branches x the mean
        tokens after the fork on the paths through it) fits the round's share of the budget
        (``within_budget``); then the budget's rest goes to independent samples (fill_budget)

The paper's (M, N, L, T) = (6, 2, 1, 2) gives 30 responses per prompt; at the budget of
G responses the preset keeps N = 2, L = 1, T = 2 and M = G // 2, and the budget caps the forks.
Token accounting as IBTree's: decoded tokens only. Pure torch.
"""
from __future__ import annotations

from ibtpo_core.algo.ib_score import ScoreSpec
from ibtpo_core.algo.sampling import (
    SAMPLERS,
    SampleResult,
    ScoreFn,
    TreeSpec,
    _attach,
    finish,
    first_round,
    leaf_depths,
    within_budget,
)
from ibtpo_core.algo.tree import Node, Tree
from ibtpo_core.engines.base import RolloutEngine, StopConditions


def fork_candidates(tree: Tree, top_n: int) -> list[tuple[float, Node, int, float]]:
    """The tree's fork points: per initial response, its ``top_n`` eligible tokens by surprisal,
    as ``(surprisal, node, offset, tokens after the fork)``, most surprising first (module
    docstring for what is eligible)."""
    depth, below = leaf_depths(tree)
    chain = {0: -1}
    for n in tree.nodes[1:]:
        chain[n.id] = n.id if n.parent == 0 else chain[n.parent]
    per_chain: dict[int, list] = {}
    for n in tree.nodes[1:]:
        if n.final:
            continue
        is_branch = len(tree.nodes[n.parent].children) > 1 or n.parent == 0
        start_tokens = depth[n.id] - len(n.tokens)
        for j, lp in enumerate(n.logprobs):
            if j == 0 and is_branch:
                continue
            after = below[n.id] - (start_tokens + j)
            per_chain.setdefault(chain[n.id], []).append((-float(lp), n, j, after))
    out = []
    for cands in per_chain.values():
        cands.sort(key=lambda c: (-c[0], c[1].id, c[2]))
        out += cands[:top_n]
    out.sort(key=lambda c: (-c[0], c[1].id, c[2]))
    return out


def make_forks(tree: Tree, forks: list[tuple[Node, int]]) -> list[Node]:
    """Split ``tree`` at each ``(node, offset)`` and return, per fork, the node its branches
    hang from (the part before the forked token; ``node``'s parent for offset 0). Forks in one
    node are cut in order of offset: a later one lies in the tail an earlier cut made."""
    where: dict[int, Node] = {}
    by_node: dict[int, list[tuple[int, int]]] = {}
    for i, (node, offset) in enumerate(forks):
        by_node.setdefault(id(node), []).append((offset, i))
    objects = {id(node): node for node, _ in forks}
    for key, items in by_node.items():
        cur, base = objects[key], 0
        for offset, i in sorted(items):
            k = offset - base
            if k == 0:
                where[i] = tree.nodes[cur.parent]
                continue
            tree.split(cur.id, k)
            where[i] = cur
            cur, base = tree.nodes[cur.children[0]], offset
    return [where[i] for i in range(len(forks))]


@SAMPLERS.register("eptree")
def sample_eptree(engine: RolloutEngine, prompts: list[list[int]], spec: TreeSpec,
                  score_fn: ScoreFn, stop: StopConditions, max_new_tokens: int,
                  temperature: float = 1.0, seed: int = 0, ib: ScoreSpec | None = None
                  ) -> SampleResult:
    ib = ib or ScoreSpec()
    step_ids = frozenset(stop.step_end_token_ids)
    trees, used, mean_len, budget = first_round(engine, prompts, spec, score_fn, stop,
                                                max_new_tokens, temperature, seed)
    T = spec.fork_branches
    rounds = 1
    for it in range(2, spec.C + 1):
        jobs = []  # (tree, node the branches hang from)
        for t, tree in enumerate(trees):
            remaining = budget - used[t]
            if remaining <= 0:
                continue
            cands = fork_candidates(tree, spec.fork_top_n)
            cost = {i: T * max(1.0, c[3]) for i, c in enumerate(cands)}
            take = within_budget(list(range(len(cands))), cost, remaining, spec.C - it + 1)
            for hang in make_forks(tree, [(cands[i][1], cands[i][2]) for i in take]):
                jobs.append((t, hang))
        if not jobs:
            break
        rounds = it
        limits = [max_new_tokens - len(trees[t].response_tokens(h.id)) for t, h in jobs]
        jobs = [(j, lim) for j, lim in zip(jobs, limits) if lim >= 1]
        comps = engine.generate([trees[t].prefix_tokens(h.id) for (t, h), _ in jobs],
                                num_samples=T, temperature=temperature,
                                max_new_tokens=[lim for _, lim in jobs], stop=stop, seed=seed + it)
        for c in comps:
            (t, hang), _ = jobs[c.prefix_index]
            used[t] += len(c.token_ids)
            trees[t].meta.setdefault("picks", []).append([it, hang.id])
            _attach(trees[t], hang.id, c, score_fn(t, trees[t].response_tokens(hang.id)
                                                   + c.token_ids), step_ids, spec.steps)
    return SampleResult(trees, finish(engine, trees, used, budget, mean_len, spec, score_fn, stop,
                                      max_new_tokens, temperature, seed, rounds, ib))
