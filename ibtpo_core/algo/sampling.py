"""Samplers that turn prompts into trees through a rollout engine (method.md §3).

``ibtree`` (IBTree):
    budget = G * mean response tokens (measured on iteration 1) unless budget_tokens is set
    iteration 1: M independent responses per prompt, cut into steps, inserted, verified
    iterations 2..C, while a tree's decoded tokens < its budget:
        recompute n, c, V, H, I, IB bottom-up (all trees at once)
        each tree ranks its candidates by select_by / select (see ``selection``; with
        select_cost, each score less select_cost x its expected continuation in mean
        responses) and takes
        them best first while their expected continuation tokens (mean below each node) stay
        within remaining / iterations left, to the nearest pick (``within_budget``; N_c, when
        set, takes a fixed number instead); one continuation per pick from the prefix ending
        at that node, to the end; cut, attach, verify. Candidates exclude final steps and,
        with min_branch_entropy, forced steps; with max_branch_cover, nodes whose children
        already cover that share of pi_old's next step.
    then (fill_budget) what a tree has left of its budget -- no candidate was left (one-step
    answers, a root at B_root) or the last round rounded down -- goes to independent samples
    from the root, so leaves per budget stay near 1.0 or above and every method decodes the
    same tokens per prompt. ``tree/identical_sibling_frac``: share of branches whose first step
    a sibling already had. With dedup_siblings such a first step is resampled (its tokens
    count as decoded): the kept step is then drawn from pi_old conditioned on differing while
    its stored log-probs are pi_old's, so the update is off-policy there; off by default.
``independent`` (GRPO): G responses per prompt as a flat tree (root -> G leaves, no steps).
``eptree`` (TreeRL's token-level forks, ``algo.eptree``) and ``treepo`` (TreePO's segment tree,
``algo.treepo``) build on this module's pieces and register in SAMPLERS; ``algo.samplers.sample``
runs any of them by name.

Token accounting counts decoded tokens only: a shared prefix is prompt for the engine.
The engine is passed in (the core never builds one); ``score_fn(prompt_index, token_ids)``
returns the verifier's reward, so this module knows nothing of tokenizers or tasks. Pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Optional

import torch

from ibtpo_core.algo.ib_score import Forest, ScoreSpec, compute_stats, usable_estimator
from ibtpo_core.algo.selection import PICK, SELECT_BY, candidate_mask, covered_mass, rank_candidates
from ibtpo_core.algo.tree import StepSpec, Tree, split_steps
from ibtpo_core.engines.base import RolloutEngine, StopConditions
from ibtpo_core.registry import Registry

SAMPLERS: Registry[Callable] = Registry("sampler")
ScoreFn = Callable[[int, list[int]], float]


@dataclass(frozen=True)
class TreeSpec:
    """IBTree's knobs (method.md §3); ``None`` means the default derived from G. What the
    IB-Score it ranks by reads (beta, form, entropy estimator) is a ``ScoreSpec`` of its own."""

    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    sampler: Literal["ibtree", "independent", "eptree", "treepo"] = "ibtree"
    G: int = 8
    M: Optional[int] = None  # G // 2
    B_max: int = 3
    B_root: Optional[int] = None  # G
    C: int = 4
    N_c: Optional[int] = None  # sized from the budget
    select_by: str = "ib"
    select: Literal["greedy", "softmax"] = "greedy"
    select_temperature: float = 1.0
    # each candidate's score less select_cost x its expected continuation in mean responses, so
    # a pick near the root (a whole response) loses to a cheaper mid-path one that ranks close
    select_cost: float = 0.0
    dedup_siblings: bool = False
    max_resamples: int = 2
    # an inner node whose children's first tokens had a mean entropy (nats) below this is no
    # candidate: its next step is forced, so a branch would repeat a sibling (0 = off)
    min_branch_entropy: float = 0.0
    # an inner node whose children already hold at least this share of pi_old's probability of
    # the next step is no candidate: a branch there repeats a sibling with that probability
    # (1 = off; selection.covered_mass)
    max_branch_cover: float = 1.0
    # budget left when the rounds end (no candidate left, or rounding) goes to extra independent
    # samples from the root, so every method decodes the same tokens per prompt
    fill_budget: bool = True
    budget_tokens: Optional[int] = None  # per prompt
    steps: StepSpec = field(default_factory=StepSpec)
    # eptree (TreeRL): forks per initial response and round (N), continuations per fork (T)
    fork_top_n: int = 2
    fork_branches: int = 2
    # treepo: tokens per segment (None: max_new_tokens // 4), children per branching path
    segment_tokens: Optional[int] = None
    segment_branches: int = 2

    def __post_init__(self):
        if self.G < 2:
            raise ValueError(f"G must be >= 2 (got {self.G}): a group needs two samples to "
                             f"have a reward spread")
        if self.B_max < 2:
            raise ValueError(f"B_max must be >= 2 (got {self.B_max}): a node needs room for a "
                             f"second child to branch (default 3, docs/method.md §3)")
        if self.C < 1:
            raise ValueError(f"C must be >= 1 (got {self.C})")
        if self.M is not None and not 1 <= self.M:
            raise ValueError(f"M must be >= 1 (got {self.M})")
        if self.select_cost < 0:
            raise ValueError(f"select_cost must be >= 0 (got {self.select_cost}); 0 ranks by the "
                             f"score alone")
        if self.min_branch_entropy < 0:
            raise ValueError(
                f"min_branch_entropy must be >= 0 nats (got {self.min_branch_entropy}); "
                f"0 switches the rule off"
            )
        if not 0 < self.max_branch_cover <= 1:
            raise ValueError(
                f"max_branch_cover must be in (0, 1] (got {self.max_branch_cover}): the share of "
                f"pi_old's next step a node's children may cover and still branch; 1 is off"
            )
        if self.budget_tokens is not None and self.budget_tokens < 1:
            raise ValueError(f"budget_tokens must be positive (got {self.budget_tokens}); "
                             f"leave it null to spend G x mean response length")
        for key in ("fork_top_n", "fork_branches", "segment_branches"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.segment_tokens is not None and self.segment_tokens < 1:
            raise ValueError(f"segment_tokens must be >= 1 (got {self.segment_tokens}); leave it "
                             f"null for max_new_tokens // 4")
        SELECT_BY.get(self.select_by)
        PICK.get(self.select)

    @property
    def initial_samples(self) -> int:
        """M resolved: independent responses per prompt in the first iteration."""
        return self.M if self.M is not None else max(1, self.G // 2)

    @property
    def root_branch_limit(self) -> int:
        """B_root resolved: the most children the root may have."""
        return self.B_root if self.B_root is not None else self.G


@dataclass
class SampleResult:
    trees: list[Tree]
    metrics: dict[str, float]


def _attach(tree: Tree, node: int, comp, reward: float, step_ids, spec: StepSpec) -> int:
    spans = split_steps(comp.token_ids, step_ids, spec.min_step_tokens, spec.max_step_tokens)
    return tree.insert(node, comp.token_ids, comp.logprobs, comp.entropies, reward, spans,
                       final_last=comp.finish_reason == "eos")


@SAMPLERS.register("ibtree")
def sample_ibtree(engine: RolloutEngine, prompts: list[list[int]], spec: TreeSpec,
                  score_fn: ScoreFn, stop: StopConditions, max_new_tokens: int,
                  temperature: float = 1.0, seed: int = 0, ib: ScoreSpec | None = None
                  ) -> SampleResult:
    ib = ib or ScoreSpec()
    step_ids = frozenset(stop.step_end_token_ids)
    gen = torch.Generator().manual_seed(seed)
    trees, used, mean_len, budget = first_round(engine, prompts, spec, score_fn, stop,
                                                max_new_tokens, temperature, seed)
    iterations = 1
    branched = identical = 0  # branch continuations, and those whose first step a sibling had
    pick_cover = 0.0  # the picks' chances of repeating a sibling's first step, summed
    for it in range(2, spec.C + 1):
        remaining = [budget - u for u in used]
        if max(remaining) <= 0:
            break
        f = Forest.from_trees(trees)
        stats = compute_stats(f, ib.beta, ib.ib_form, ib.entropy_estimator)
        covered = covered_mass(trees)
        cand = candidate_mask(f, stats, spec.B_max, spec.root_branch_limit, spec.min_branch_entropy,
                              ib.entropy_estimator, covered, spec.max_branch_cover)
        if ib.ib_form == "zscore":  # z over this iteration's candidates
            stats = compute_stats(f, ib.beta, ib.ib_form, ib.entropy_estimator, cand)
        cost = (_expected_continuation(f, trees, cand)
                if spec.N_c is None or spec.select_cost else {})
        penalty = None
        if spec.select_cost:
            penalty = torch.zeros(f.num_nodes, dtype=torch.float64)
            for row, c in cost.items():
                penalty[row] = spec.select_cost * c / max(mean_len, 1.0)
        ranked = rank_candidates(f, stats, cand, spec.select_by, spec.select,
                                 spec.select_temperature, gen, penalty)
        rows = sorted(
            r
            for order, rem in zip(ranked, remaining)
            if rem > 0
            for r in (order[:spec.N_c] if spec.N_c is not None
                      else within_budget(order, cost, rem, spec.C - it + 1))
        )
        if not rows:
            break
        iterations = it
        picks = [(int(f.tree[r]), r - f.offsets[int(f.tree[r])]) for r in rows]
        for t, node in picks:  # where each round branched, for the tree pictures
            trees[t].meta.setdefault("picks", []).append([it, node])
        comps = _branch(engine, trees, picks, spec, stop, max_new_tokens, temperature,
                        seed + it, used)
        for r, (t, node), c in zip(rows, picks, comps):
            if c is None:
                continue
            branched += 1
            pick_cover += float(covered[r])
            identical += _repeats_a_sibling(trees[t], node, c, step_ids, spec.steps)
            _attach(
                trees[t],
                node,
                c,
                score_fn(t, trees[t].response_tokens(node) + c.token_ids),
                step_ids,
                spec.steps,
            )
    metrics = finish(engine, trees, used, budget, mean_len, spec, score_fn, stop, max_new_tokens,
                     temperature, seed, iterations, ib)
    metrics["tree/identical_sibling_frac"] = identical / branched if branched else 0.0
    # what identical_sibling_frac is expected to be, from pi_old's probabilities at the picks
    metrics["tree/expected_identical_frac"] = pick_cover / branched if branched else 0.0
    return SampleResult(trees, metrics)


def first_round(engine, prompts, spec: TreeSpec, score_fn: ScoreFn, stop: StopConditions,
                max_new_tokens: int, temperature: float, seed: int):
    """``spec.initial_samples`` independent responses per prompt, cut into steps and verified:
    the trees, tokens decoded per tree, the mean response length and the per-tree budget
    (``budget_tokens``, else G x that mean)."""
    step_ids = frozenset(stop.step_end_token_ids)
    trees = [Tree(p, {"prompt_index": i}) for i, p in enumerate(prompts)]
    used = [0] * len(prompts)
    first = engine.generate(prompts, num_samples=spec.initial_samples, temperature=temperature,
                            max_new_tokens=max_new_tokens, stop=stop, seed=seed)
    for c in first:
        used[c.prefix_index] += len(c.token_ids)
        _attach(trees[c.prefix_index], 0, c, score_fn(c.prefix_index, c.token_ids), step_ids,
                spec.steps)
    mean_len = sum(len(c.token_ids) for c in first) / max(1, len(first))
    budget = float(spec.budget_tokens) if spec.budget_tokens else spec.G * mean_len
    return trees, used, mean_len, budget


def finish(engine, trees: list[Tree], used: list[int], budget: float, mean_len: float,
           spec: TreeSpec, score_fn: ScoreFn, stop: StopConditions, max_new_tokens: int,
           temperature: float, seed: int, rounds: int, ib: ScoreSpec) -> dict[str, float]:
    """A tree sampler's last part: the budget's rest as independent samples (``fill_budget``),
    each tree's decoded tokens in its meta, and the metrics (``tree_metrics``,
    ``tree/fill_samples``)."""
    step_ids = frozenset(stop.step_end_token_ids)
    fills = _fill_budget(engine, trees, used, budget, mean_len, score_fn, stop, max_new_tokens,
                         temperature, seed + 7919, step_ids, spec.steps) if spec.fill_budget else 0
    for t, u in enumerate(used):
        trees[t].meta["decoded_tokens"] = u
    metrics = tree_metrics(trees, used, budget, mean_len, rounds, ib)
    metrics["tree/fill_samples"] = fills / max(1, len(trees))
    return metrics


def _repeats_a_sibling(tree: Tree, node: int, comp, step_ids, spec: StepSpec) -> bool:
    """Whether a new continuation of ``node`` begins with a step one of its children has."""
    spans = split_steps(comp.token_ids, step_ids, spec.min_step_tokens, spec.max_step_tokens)
    if not spans:
        return False
    first = comp.token_ids[spans[0][0]:spans[0][1]]
    return any(tree.nodes[ch].tokens == first for ch in tree.nodes[node].children)


def _fill_budget(engine, trees, used, budget, mean_len, score_fn, stop, max_new_tokens,
                 temperature, seed, step_ids, spec: StepSpec) -> int:
    """Spend what each tree has left of its budget on independent samples from the root (one
    per mean response length, rounded); returns how many were drawn."""
    want = [round(max(0.0, budget - u) / max(mean_len, 1.0)) for u in used]
    drawn = 0
    for k in sorted(set(want) - {0}):  # one engine call per sample count
        idx = [t for t, w in enumerate(want) if w == k]
        comps = engine.generate([trees[t].root.tokens for t in idx], num_samples=k,
                                temperature=temperature, max_new_tokens=max_new_tokens, stop=stop,
                                seed=seed + k)
        for c in comps:
            t = idx[c.prefix_index]
            used[t] += len(c.token_ids)
            _attach(trees[t], 0, c, score_fn(t, c.token_ids), step_ids, spec)
            trees[t].meta["fill_samples"] = trees[t].meta.get("fill_samples", 0) + 1
            drawn += 1
    return drawn


def _branch(engine, trees, picks, spec: TreeSpec, stop, max_new_tokens, temperature, seed, used):
    """One continuation per pick; with dedup_siblings, a first step equal to an existing
    sibling's is resampled up to max_resamples times (those tokens count as decoded)."""
    prefixes = [trees[t].prefix_tokens(node) for t, node in picks]
    limits = [max_new_tokens - len(trees[t].response_tokens(node)) for t, node in picks]
    keep = [i for i, lim in enumerate(limits) if lim >= 1]
    out = [None] * len(picks)
    if not spec.dedup_siblings:
        comps = engine.generate([prefixes[i] for i in keep], num_samples=1, temperature=temperature,
                                max_new_tokens=[limits[i] for i in keep], stop=stop, seed=seed)
        for i, c in zip(keep, comps):
            out[i] = c
            used[picks[i][0]] += len(c.token_ids)
        return out
    step_stop = StopConditions(stop.eos_token_ids, stop.step_end_token_ids, stop_at_step_end=True)
    firsts = {}
    pending = keep
    for attempt in range(spec.max_resamples + 1):
        comps = engine.generate(
            [prefixes[i] for i in pending],
            num_samples=1,
            temperature=temperature,
            max_new_tokens=[limits[i] for i in pending],
            stop=step_stop,
            seed=seed * 1000 + attempt,
        )
        retry = []
        for i, c in zip(pending, comps):
            t, node = picks[i]
            used[t] += len(c.token_ids)
            siblings = [trees[t].nodes[ch].tokens for ch in trees[t].nodes[node].children]
            siblings += [firsts[j].token_ids for j in firsts if picks[j] == picks[i]]
            # a sibling's step may hold more after the same start: a final step keeps the short
            # tail (an EOS) merged into it, so [a, NL] repeats a sibling [a, NL, EOS]
            first = list(c.token_ids)
            if any(sib[:len(first)] == first for sib in siblings) and attempt < spec.max_resamples:
                retry.append(i)
            else:
                firsts[i] = c
        pending = retry
        if not pending:
            break
    cont = [
        i
        for i in keep
        if firsts[i].finish_reason == "step_end" and limits[i] > len(firsts[i].token_ids)
    ]
    rest = engine.generate([prefixes[i] + firsts[i].token_ids for i in cont], num_samples=1,
                           temperature=temperature,
                           max_new_tokens=[limits[i] - len(firsts[i].token_ids) for i in cont],
                           stop=stop, seed=seed * 1000 + 999)
    tails = dict(zip(cont, rest))
    for i in keep:
        c = firsts[i]
        if i in tails:
            r = tails[i]
            used[picks[i][0]] += len(r.token_ids)
            c = type(c)(
                c.prefix_index,
                c.token_ids + r.token_ids,
                c.logprobs + r.logprobs,
                None if c.entropies is None or r.entropies is None else c.entropies + r.entropies,
                r.finish_reason,
            )
        elif c.finish_reason == "step_end":
            c = type(c)(c.prefix_index, c.token_ids, c.logprobs, c.entropies, "length")
        out[i] = c
    return out


def within_budget(order: list[int], cost: dict[int, float], remaining: float,
                  rounds_left: int) -> list[int]:
    """A tree's picks this round: its ranked candidates, best first, while their expected
    tokens stay within the round's share of what the tree has left (remaining / rounds_left),
    rounded to the nearest pick: the next one is taken while at most half of it would fall
    beyond the share. The first is taken whenever half of it fits in all that is left, so every
    round but a spent tree's branches and no round overspends by more than half a pick. Stops at
    the first that does not fit (a cheaper, worse-ranked node is not taken instead)."""
    share = remaining / rounds_left
    out: list[int] = []
    spent = 0.0
    for row in order:
        c = max(cost[row], 1.0)
        limit = remaining if not out else share
        if spent + c / 2 > limit:
            break
        out.append(row)
        spent += c
    return out


def _expected_continuation(f: Forest, trees: list[Tree], cand: torch.Tensor) -> dict[int, float]:
    """Per candidate row: the mean tokens still to decode below it (over the leaves below)."""
    out = {}
    for t, tree in enumerate(trees):
        rows = (cand & (f.tree == t)).nonzero().squeeze(1).tolist()
        if not rows:
            continue
        depth, below = leaf_depths(tree)
        for r in rows:
            node = r - f.offsets[t]
            out[r] = below[node] - depth[node]
    return out


def leaf_depths(tree: Tree) -> tuple[dict[int, int], dict[int, float]]:
    """Per node: its depth in tokens from the root, and the mean depth of the leaves below it
    (its own, for a leaf). One pass from the last node back: parents precede their children."""
    depth = {0: 0}
    for n in tree.nodes[1:]:
        depth[n.id] = depth[n.parent] + len(n.tokens)
    total = {n.id: 0 for n in tree.nodes}
    count = {n.id: 0 for n in tree.nodes}
    for n in reversed(tree.nodes):
        if not n.children:
            total[n.id], count[n.id] = depth[n.id], 1
        if n.parent is not None:
            total[n.parent] += total[n.id]
            count[n.parent] += count[n.id]
    return depth, {k: total[k] / max(1, count[k]) for k in total}


@SAMPLERS.register("independent")
def sample_independent(engine: RolloutEngine, prompts: list[list[int]], spec: TreeSpec,
                       score_fn: ScoreFn, stop: StopConditions, max_new_tokens: int,
                       temperature: float = 1.0, seed: int = 0, ib: ScoreSpec | None = None
                       ) -> SampleResult:
    trees = [Tree(p, {"prompt_index": i}) for i, p in enumerate(prompts)]
    used = [0] * len(prompts)
    comps = engine.generate(prompts, num_samples=spec.G, temperature=temperature,
                            max_new_tokens=max_new_tokens, stop=stop, seed=seed)
    for c in comps:
        used[c.prefix_index] += len(c.token_ids)
        trees[c.prefix_index].add_node(0, c.token_ids, c.logprobs, c.entropies,
                                       reward=score_fn(c.prefix_index, c.token_ids),
                                       final=c.finish_reason == "eos")
    mean_len = sum(used) / max(1, len(comps))
    # flat groups: surprisal, as GRPO's metrics always were
    flat = replace(ib or ScoreSpec(), entropy_estimator="surprisal")
    return SampleResult(trees, tree_metrics(trees, used, spec.G * mean_len, mean_len, 1, flat))


def tree_metrics(trees: list[Tree], used: list[int], budget: float, mean_len: float,
                 iterations: int, ib: ScoreSpec) -> dict[str, float]:
    """Token accounting, the leaves' reward (mean and spread) and the IB diagnostic (means over
    trees)."""
    num_trees = max(1, len(trees))
    leaves = [t.leaves() for t in trees]
    num_leaves = [len(l) for l in leaves]
    unique = []
    path_tokens = 0
    for t, ls in zip(trees, leaves):
        seqs = set()
        for leaf in ls:
            toks = tuple(t.response_tokens(leaf.id))
            seqs.add(toks)
            path_tokens += len(toks)
        unique.append(len(seqs))
    decoded = sum(used)
    per_budget = budget / max(mean_len, 1e-9)
    rewards = [leaf.reward for ls in leaves for leaf in ls]
    out = {
        "tree/decoded_tokens": float(decoded),
        "tree/num_leaves": sum(num_leaves) / num_trees,
        "tree/unique_leaves": sum(unique) / num_trees,
        "tree/shared_prefix_frac": 1.0 - decoded / path_tokens if path_tokens else 0.0,
        "tree/leaves_per_budget": sum(num_leaves) / num_trees / per_budget,
        "tree/unique_leaves_per_budget": sum(unique) / num_trees / per_budget,
        "tree/budget_tokens": budget,
        # 1.0: the trees decoded their budget exactly (GRPO's groups always do)
        "tree/decoded_per_budget": decoded / (num_trees * budget) if budget else 0.0,
        "tree/iterations": float(iterations),
        "tree/mean_response_tokens": mean_len,
        **reward_metrics(rewards),
    }
    out.update(pick_depths(trees))
    out.update(ib_diagnostic(trees, ib))
    return out


def pick_depths(trees: list[Tree]) -> dict[str, float]:
    """Where the rounds branched (``meta.picks``), by the picked node's depth (the root 0, a
    first step 1, ...): the share of picks at depth 0, 1 and 2 or more, and their mean depth
    (all 0 without picks, as for independent samples)."""
    depths = []
    for t in trees:
        for _, node in t.meta.get("picks", []):
            d = 0
            while t.nodes[node].parent is not None:
                node, d = t.nodes[node].parent, d + 1
            depths.append(d)
    k = max(1, len(depths))
    return {"tree/pick_depth_0": sum(d == 0 for d in depths) / k,
            "tree/pick_depth_1": sum(d == 1 for d in depths) / k,
            "tree/pick_depth_2plus": sum(d >= 2 for d in depths) / k,
            "tree/pick_depth_mean": sum(depths) / k}


def reward_metrics(rewards: list[float]) -> dict[str, float]:
    """``reward`` (the mean) and ``reward_std`` (population) of the leaves' rewards."""
    mean = sum(rewards) / max(1, len(rewards))
    var = sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards))
    return {"reward": mean, "reward_std": var ** 0.5}


def ib_diagnostic(trees: list[Tree], ib: ScoreSpec) -> dict[str, float]:
    """Mean IB-Score, H and I over internal nodes with >= 2 children (method.md §2)."""
    f = Forest.from_trees(trees)
    stats = compute_stats(f, ib.beta, ib.ib_form, usable_estimator(f, ib.entropy_estimator))
    m = stats.num_children >= 2
    if not bool(m.any()):
        return {"ib/score_mean": 0.0, "ib/h_mean": 0.0, "ib/i_mean": 0.0, "ib/branch_nodes": 0.0}
    return {"ib/score_mean": float(stats.IB[m].mean()), "ib/h_mean": float(stats.H[m].mean()),
            "ib/i_mean": float(stats.I[m].mean()), "ib/branch_nodes": float(m.sum()) / f.num_trees}

