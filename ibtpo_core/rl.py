"""One RL iteration's pieces over plain data: the prompt stream, sampling through an engine,
scoring (values, IB-Scores, advantages) into training sequences. The pipeline's tasks call
these and move their results between stages as files; nothing here knows Prefect or MLflow.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from ibtpo_core.algo.advantages import AdvantageSpec, compute_advantages, eff_rate
from ibtpo_core.algo.filter_groups import FilterSpec, informative, next_draw_size
from ibtpo_core.algo.ib_score import Forest, ScoreSpec, compute_stats, usable_estimator
from ibtpo_core.algo.reward_shaping import RewardSpec, shaped_reward
from ibtpo_core.algo.samplers import sample
from ibtpo_core.algo.sampling import TreeSpec, ib_diagnostic
from ibtpo_core.algo.tree import TrainingSequence, Tree, training_sequences
from ibtpo_core.data.problems import prompt_text, row_verifier
from ibtpo_core.data.prompts import encode_prompt
from ibtpo_core.data.tokenizer import before_stop, stop_token_ids
from ibtpo_core.engines.base import RolloutEngine, StopConditions


class JsonlRows(Sequence):
    """The rows of a JSON-lines file, each parsed when it is read. An RL iteration draws 64
    prompts from the deep task's 100k training rows: parsing them all was a large share of an
    iteration (docs/results/bench_time.md); this parses the 64. Same length and order as
    ``data.splits.read_jsonl``."""

    def __init__(self, path: Path):
        with Path(path).open("rb") as f:
            self._lines = [line for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [json.loads(line) for line in self._lines[i]]
        return json.loads(self._lines[i])


def draw_prompts(train_rows: Sequence[dict], iteration: int, n: int, seed: int,
                 draw: int = 0) -> list[dict]:
    """The problems of RL iteration ``iteration`` (seeded; a countdown row's numbers re-ordered);
    ``draw`` > 0: the iteration's refills (``grow_informative``), each a stream of its own."""
    if not train_rows:
        raise ValueError("the training split is empty: no prompts to sample")
    rng = random.Random(f"{seed}-{iteration}" + (f"-{draw}" if draw else ""))
    rows = []
    for _ in range(n):
        r = dict(rng.choice(train_rows))
        if "numbers" in r and "prompt" not in r:
            r["numbers"] = rng.sample(list(r["numbers"]), len(r["numbers"]))
        rows.append(r)
    return rows


def grow_trees(engine: RolloutEngine, tokenizer, rows: list[dict], spec: TreeSpec,
               ib: ScoreSpec, step_end_ids: tuple[int, ...], max_new_tokens: int,
               temperature: float, seed: int, verifier: str = "countdown",
               reward: RewardSpec | None = None):
    """Trees (one per row) and the sampler's metrics; leaves scored by the verifier, shaped by
    ``reward`` (DAPO's overlong penalty) where given."""
    verify = [row_verifier(r, verifier) for r in rows]
    prompts = [encode_prompt(tokenizer, prompt_text(r)) for r in rows]

    stop = StopConditions(stop_token_ids(tokenizer), tuple(step_end_ids))

    def score(i: int, toks: list[int]) -> float:  # nothing after the first stop is scored
        text = tokenizer.decode(before_stop(toks, stop.eos_token_ids), skip_special_tokens=True)
        r = verify[i](text, rows[i])
        return r if reward is None else shaped_reward(r, len(toks), max_new_tokens, reward)

    result = sample(spec.sampler, engine, prompts, spec, score, stop, max_new_tokens,
                    temperature, seed, ib=ib)
    return result.trees, result.metrics


def grow_informative(grow, train_rows: Sequence[dict], iteration: int, n: int, seed: int,
                     spec: FilterSpec, token_cap: float | None = None):
    """DAPO's dynamic sampling (``filter_groups``): ``grow(rows, draw)`` -> (trees, metrics) on
    the iteration's ``n`` prompts, then on refills while fewer than ``n`` trees are informative,
    up to ``spec.max_draws`` draws and, with ``token_cap``, while fewer tokens than it were
    decoded. Returns the first ``n`` informative trees (the first draw's trees if none was), their
    rows, and the first draw's metrics with ``tree/decoded_tokens`` over every draw and
    ``filter/*`` counts."""
    kept: list[tuple[Tree, dict]] = []
    decoded = drawn = draws = 0
    first: dict = {}
    first_draw: list[tuple[Tree, dict]] = []
    while draws < spec.max_draws and len(kept) < n:
        if draws and token_cap is not None and decoded >= token_cap:
            break
        size = n if not draws else next_draw_size(n - len(kept), len(kept), drawn)
        rows = draw_prompts(train_rows, iteration, size, seed, draw=draws)
        trees, metrics = grow(rows, draws)
        first = first or metrics
        first_draw = first_draw or list(zip(trees, rows))
        decoded += metrics["tree/decoded_tokens"]
        drawn += len(rows)
        draws += 1
        kept += [(t, r) for t, r in zip(trees, rows) if informative(t)]
    out = {**first, "tree/decoded_tokens": float(decoded), "filter/draws": float(draws),
           "filter/drawn_groups": float(drawn), "filter/kept_groups": float(min(len(kept), n)),
           "filter/dropped_frac": 1.0 - len(kept) / drawn if drawn else 0.0}
    kept = kept[:n] or first_draw  # nothing informative: the first draw (zero advantages)
    for i, (t, _) in enumerate(kept):  # the batch's own order
        t.meta["prompt_index"] = i
    return [t for t, _ in kept], [r for _, r in kept], out


def probe_diagnostic(engine: RolloutEngine, tokenizer, rows: list[dict], G: int,
                     step_end_ids: tuple[int, ...], max_new_tokens: int, temperature: float,
                     seed: int, run_tree: TreeSpec | None = None,
                     run_score: ScoreSpec | None = None) -> dict[str, float]:
    """method.md §2's IB diagnostic on probe trees: IBTree with its default settings on a fixed
    prompt set, sampled from the current policy and never trained on, so every method (GRPO
    included) is measured the same way. Keys ``ib_probe/score_mean``, ``ib_probe/h_mean``, ..."""
    # the run's step cutting and entropy estimator (an engine without full entropies needs
    # surprisal); every other switch at its default
    spec = TreeSpec(G=G) if run_tree is None else TreeSpec(G=G, steps=run_tree.steps)
    ib = ScoreSpec() if run_score is None else ScoreSpec(
        entropy_estimator=run_score.entropy_estimator)
    trees, _ = grow_trees(engine, tokenizer, rows, spec, ib, step_end_ids, max_new_tokens,
                          temperature, seed)
    diag = ib_diagnostic(trees, ib)
    return {k.replace("ib/", "ib_probe/"): v for k, v in diag.items()}


def score_trees(trees: list[Tree], ib: ScoreSpec, adv: AdvantageSpec
                ) -> tuple[list[TrainingSequence], dict[str, float]]:
    """Training sequences with per-token advantages, and the batch's advantage metrics (the
    reward and the IB diagnostic are the sampler's: ``tree_metrics``)."""
    f = Forest.from_trees(trees)
    stats = compute_stats(f, ib.beta, ib.ib_form, usable_estimator(f, ib.entropy_estimator))
    A = compute_advantages(f, stats, adv)
    seqs: list[TrainingSequence] = []
    for t, tr in enumerate(trees):
        off = f.offsets[t]
        seqs += training_sequences(tr, A[off: off + len(tr.nodes)].tolist())
    adv_tok = [a for s in seqs for a in s.advantages]
    metrics = {"eff_rate": eff_rate(f),
               "adv/abs_mean": sum(abs(a) for a in adv_tok) / max(1, len(adv_tok)),
               "adv/nonzero_frac": sum(a != 0 for a in adv_tok) / max(1, len(adv_tok)),
               "response_length": sum(len(s.tokens) for s in seqs) / max(1, len(seqs))}
    return seqs, metrics


def save_trees(trees: list[Tree], path: Path) -> None:
    Path(path).write_text(json.dumps([t.to_json() for t in trees]))


def load_trees(path: Path) -> list[Tree]:
    return [Tree.from_json(obj) for obj in json.loads(Path(path).read_text())]


def save_sequences(seqs: list[TrainingSequence], path: Path) -> None:
    Path(path).write_text(json.dumps([s.__dict__ for s in seqs]))


def load_sequences(path: Path) -> list[TrainingSequence]:
    return [TrainingSequence(**d) for d in json.loads(Path(path).read_text())]
