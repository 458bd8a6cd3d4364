"""The built-in countdown task: problems, step-by-step solution traces, disjoint splits.

Problems (a few small numbers and a target) come from ``reasoning-gym``'s seeded countdown
generator. What it lacks, and this module adds: an exhaustive solver that lists every
step-by-step solution whose intermediate results stay within a bound (the warm-up traces, and the
count of distinct solutions per problem), a canonical key so that splits are disjoint up to the
order of the numbers, and the prompt / response text format the verifier in
``ibtpo_core.algo.rewards`` reads. Knows nothing of tokenizers or models.
"""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from typing import Literal

from ibtpo_core.algo.rewards import apply_op

OPS = ("+", "-", "*", "/")


# The built-in tokenizer has one token per number up to this; larger results would be unknown.
MAX_TOKEN_NUMBER = 255
# Above this many numbers, listing every solution of every problem is too slow (it grows about
# 50-fold per number): problems are drawn instead.
MAX_ENUMERATED = 4


@dataclass(frozen=True)
class CountdownSpec:
    """Difficulty knobs of the built-in task.

    ``num_count`` numbers give ``num_count - 1`` steps per answer: the depth. ``problems``:
    ``enumerate`` lists every solvable canonical problem (countdown-4 and smaller; the warm-up
    draws among all solutions of a problem); ``sample`` draws ``n_train`` training problems as
    random walks (each step combines two random available values with a random valid operator; the
    walk's end is the target, the walk is the problem's warm-up trace), so deep variants are cheap
    to make and the space is too large to memorise.
    """

    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    num_count: int = 4
    min_value: int = 1
    max_value: int = 6
    min_target: int = 10
    max_target: int = 50
    max_intermediate: int = 50
    problems: Literal["enumerate", "sample"] = "enumerate"
    n_train: int = 100_000  # with problems: sample

    def __post_init__(self):
        if self.num_count < 2:
            raise ValueError(f"countdown num_count is {self.num_count}: a problem needs 2 or more "
                             f"numbers (num_count - 1 steps)")
        if self.problems == "enumerate" and self.num_count > MAX_ENUMERATED:
            raise ValueError(f"countdown num_count {self.num_count} with problems: enumerate would "
                             f"list every solution of every problem (hours); set "
                             f"data.countdown.problems: sample for {MAX_ENUMERATED + 1} or more "
                             f"numbers")
        if max(self.max_intermediate, self.max_target, self.max_value) > MAX_TOKEN_NUMBER:
            raise ValueError(f"countdown numbers go up to {MAX_TOKEN_NUMBER} (one token each in "
                             f"the built-in tokenizer); lower max_intermediate / max_target / "
                             f"max_value")
        if not (1 <= self.min_value <= self.max_value and self.min_target <= self.max_target):
            raise ValueError("countdown needs 1 <= min_value <= max_value and "
                             "min_target <= max_target")
        if self.n_train < 1:
            raise ValueError("countdown n_train must be at least 1")


def canonical_key(numbers: list[int], target: int) -> str:
    """Order-free identity of a problem: splits are disjoint on this key."""
    return " ".join(map(str, sorted(numbers))) + f"->{target}"


def format_prompt(numbers: list[int], target: int) -> str:
    return "nums " + " ".join(map(str, numbers)) + f" target {target}\n"


def format_steps(steps: list[tuple[int, str, int, int]]) -> str:
    return "".join(f"{a} {op} {b} = {r}\n" for a, op, b, r in steps)


def solve(numbers: list[int], target: int, max_intermediate: int) -> list[tuple]:
    """Every distinct step sequence that uses all numbers and ends on ``target``.

    Each step combines two available values (``a >= b`` for ``-`` and ``/``; both orders for
    ``+`` and ``*`` count once, larger first) into a result in ``[1, max_intermediate]``.
    Returns a list of solutions, each a tuple of steps ``(a, op, b, r)``. The order of steps
    matters: ``(1+2, 3*4, ...)`` and ``(3*4, 1+2, ...)`` are two solutions (a model may emit
    either).
    """
    return list(_all_solutions(tuple(sorted(numbers)), max_intermediate).get(target, ()))


def valid_steps(pool, max_intermediate: int):
    """Every allowed step on ``pool`` as ``(i, j, (a, op, b, r))``: two available values
    (``a >= b``; ``+`` and ``*`` of equal values once), a result in ``[1, max_intermediate]``."""
    for i, j in itertools.permutations(range(len(pool)), 2):
        a, b = pool[i], pool[j]
        if a < b:
            continue
        for op in OPS:
            if op in "+*" and a == b and i > j:
                continue
            r = apply_op(a, op, b)
            if r is not None and 1 <= r <= max_intermediate:
                yield i, j, (a, op, b, r)


@functools.lru_cache(maxsize=4096)
def _all_solutions(numbers: tuple[int, ...], max_intermediate: int) -> dict[int, tuple]:
    """target -> sorted tuple of solutions, for one sorted multiset of numbers."""
    found: dict[int, set] = {}

    def rec(pool: tuple[int, ...], steps: tuple):
        if len(pool) == 1:
            if steps:
                found.setdefault(pool[0], set()).add(steps)
            return
        for i, j, step in valid_steps(pool, max_intermediate):
            rest = tuple(v for k, v in enumerate(pool) if k not in (i, j)) + (step[3],)
            rec(rest, steps + (step,))

    rec(numbers, ())
    return {t: tuple(sorted(s)) for t, s in found.items()}


def enumerate_problems(spec: CountdownSpec) -> list[dict]:
    """Every solvable canonical problem of ``spec`` (sorted numbers), in a fixed order.

    Each row: ``numbers`` (sorted), ``target``, ``key`` (canonical), ``num_solutions``.
    """
    rows = []
    values = range(spec.min_value, spec.max_value + 1)
    for nums in itertools.combinations_with_replacement(values, spec.num_count):
        sols = _all_solutions(nums, spec.max_intermediate)
        for target in range(spec.min_target, spec.max_target + 1):
            if target in sols:
                rows.append({"numbers": list(nums), "target": target,
                             "key": canonical_key(list(nums), target),
                             "num_solutions": len(sols[target])})
    return rows


def random_walk(numbers: list[int], spec: CountdownSpec, rng: random.Random) -> tuple | None:
    """Combine all of ``numbers`` step by step, each step drawn uniformly among the valid
    ``(pair, operator)`` choices (same rules as ``solve``); None at a dead end."""
    pool, steps = list(numbers), []
    while len(pool) > 1:
        choices = list(valid_steps(pool, spec.max_intermediate))
        if not choices:
            return None
        i, j, step = rng.choice(choices)
        pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [step[3]]
        steps.append(step)
    return tuple(steps)


def sample_problem(spec: CountdownSpec, rng: random.Random) -> dict:
    """One random-walk problem: numbers drawn uniformly, the walk's end as target (redrawn until
    it lies in ``[min_target, max_target]``). The row keeps the walk as ``solution``.

    A target reached by a walk is a draw from walks weighted by how likely the walk is, so
    supervised learning on (problem, walk) pairs learns that same posterior over solutions."""
    for _ in range(10_000):
        numbers = [rng.randint(spec.min_value, spec.max_value) for _ in range(spec.num_count)]
        walk = random_walk(numbers, spec, rng)
        if walk and spec.min_target <= walk[-1][3] <= spec.max_target:
            return {"numbers": numbers, "target": walk[-1][3],
                    "key": canonical_key(numbers, walk[-1][3]), "solution": [list(s) for s in walk]}
    raise ValueError("the countdown spec almost never gives a target in [min_target, max_target]: "
                     "widen the target range or max_intermediate")


def sample_splits(spec: CountdownSpec, seed: int, n_test: int, n_val: int) -> dict[str, list[dict]]:
    """Test and validation: distinct canonical problems; train: ``spec.n_train`` drawn problems
    whose canonical key is in neither (a training key may repeat with another walk)."""
    rng = random.Random(seed)
    held: dict[str, list[dict]] = {"test": [], "validation": []}
    seen: set[str] = set()
    for name, n in (("test", n_test), ("validation", n_val)):
        misses = 0
        while len(held[name]) < n:
            row = sample_problem(spec, rng)
            if row["key"] in seen:
                misses += 1
                if misses > 50 * n + 1000:
                    raise ValueError(
                        f"the countdown spec has too few distinct problems for {n_test} "
                        f"test and {n_val} validation problems: widen max_value / "
                        f"max_target or lower the split sizes"
                    )
                continue
            seen.add(row["key"])
            held[name].append(row)
    train = []
    while len(train) < spec.n_train:
        row = sample_problem(spec, rng)
        if row["key"] not in seen:
            train.append(row)
    return {**held, "train": train}


def make_splits(spec: CountdownSpec, seed: int, n_test: int, n_val: int) -> dict[str, list[dict]]:
    """Disjoint train / validation / test splits over all canonical problems of ``spec``
    (with ``problems: sample``, over drawn problems: see ``sample_splits``).

    The canonical problems are shuffled with ``seed``; test takes the first ``n_test``, validation
    the next ``n_val``, train the rest. Disjoint on the canonical key, so no test problem reaches
    warm-up or RL in any order of its numbers. Each row's numbers are put in a seeded random order
    (the prompt the model sees); train prompts may be re-ordered again at sampling time.

    Why not reasoning-gym's generator: it draws the small space slowly and with many repeats;
    enumerating the space is far faster (docs/results/bench_time.md).
    ``generate_reasoning_gym`` remains for configs that want its distribution.
    """
    if spec.problems == "sample":
        return sample_splits(spec, seed, n_test, n_val)
    rows = enumerate_problems(spec)
    if len(rows) < n_test + n_val + 1:
        raise ValueError(
            f"the countdown spec has only {len(rows)} distinct problems, too few for {n_test} test "
            f"and {n_val} validation problems plus training: widen max_value / max_target or "
            f"lower the split sizes"
        )
    rng = random.Random(seed)
    rng.shuffle(rows)
    for row in rows:
        rng.shuffle(row["numbers"])
    return {"test": rows[:n_test], "validation": rows[n_test:n_test + n_val],
            "train": rows[n_test + n_val:]}


def generate_reasoning_gym(spec: CountdownSpec, seed: int, count: int) -> list[dict]:
    """``count`` problems drawn by reasoning-gym's countdown generator, kept where solvable
    within ``spec.max_intermediate`` (same row shape as ``enumerate_problems``)."""
    import reasoning_gym  # heavy import, only needed here

    ds = reasoning_gym.create_dataset(
        "countdown", min_numbers=spec.num_count, max_numbers=spec.num_count,
        min_value=spec.min_value, max_value=spec.max_value,
        min_target=spec.min_target, max_target=spec.max_target, seed=seed, size=count,
    )
    rows = []
    for i in range(count):
        meta = ds[i]["metadata"]
        numbers, target = list(meta["numbers"]), int(meta["target"])
        sols = solve(numbers, target, spec.max_intermediate)
        if sols:
            rows.append({"numbers": numbers, "target": target,
                         "key": canonical_key(numbers, target), "num_solutions": len(sols)})
    return rows


def sample_trace(row: dict, spec: CountdownSpec, rng: random.Random) -> str:
    """One solution of ``row`` drawn uniformly from all its solutions, as response text; a drawn
    problem's own walk where the row carries one (``problems: sample``)."""
    if "solution" in row:
        return format_steps([tuple(s) for s in row["solution"]])
    sols = solve(row["numbers"], row["target"], spec.max_intermediate)
    return format_steps(list(rng.choice(sols)))
