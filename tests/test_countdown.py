"""The built-in task: the verifier on hand-made solutions, the solver, the splits."""
import random

import pytest

from ibtpo_core.algo.rewards import VERIFIERS, check_countdown
from ibtpo_core.data.countdown import (
    CountdownSpec,
    canonical_key,
    enumerate_problems,
    format_steps,
    make_splits,
    random_walk,
    sample_trace,
    solve,
)

P = {"numbers": [2, 3, 4, 5], "target": 26}


@pytest.mark.parametrize("text", [
    "2 * 3 = 6\n4 * 5 = 20\n20 + 6 = 26\n",        # 6 + 20 = 26
    "4 * 5 = 20\n2 * 3 = 6\n20 + 6 = 26\n",        # the same steps in the other order
    "4 * 5 = 20\n2 * 3 = 6\n6 + 20 = 26",          # smaller operand first, no final newline
    " 2 * 3 = 6 \n 4 * 5 = 20 \n 20 + 6 = 26 \n",  # the tokenizer's decoded spacing
    "3 * 2 = 6\n5 * 4 = 20\n6 + 20 = 26\n",
])
def test_right_solutions_score_one(text):
    assert VERIFIERS.get("countdown")(text, P) == 1.0


@pytest.mark.parametrize("text,reason", [
    ("2 * 3 = 7\n4 * 5 = 20\n20 + 7 = 27\n", "step 1 arithmetic is wrong"),   # 2*3 is 6
    ("5 * 5 = 25\n25 + 1 = 26\n", "step 1 uses a number that is not available"),  # one 5 only
    ("2 * 3 = 6\n6 + 6 = 12\n", "step 2 uses a number that is not available"),    # one 6 made
    ("4 * 5 = 20\n20 + 6 = 26\n", "step 2 uses a number that is not available"),   # 6 not made
    ("2 * 3 = 6\n4 * 5 = 20\n20 + 6 = 26\n", None),                                # control
    ("4 * 5 = 20\n20 + 3 = 23\n23 + 2 = 25\n", "last result is not the target"),   # 25 != 26
    ("4 * 5 = 20\n20 + 2 = 22\n", "last result is not the target"),
    ("3 - 5 = 2\n", "step 1 arithmetic is wrong"),          # no negative results
    ("5 / 2 = 2\n", "step 1 arithmetic is wrong"),          # no inexact division
    ("2 * 3 = 6\nso the answer is 26\n", "malformed line"),
    ("2 times 3 = 6\n", "malformed line"),
    ("2 * 3 =\n", "malformed line"),
    ("", "no steps"),
    ("\n\n", "no steps"),
])
def test_wrong_solutions_name_the_fault(text, reason):
    ok, why = check_countdown(text, P["numbers"], P["target"])
    if reason is None:
        assert ok
    else:
        assert not ok and why == reason
        assert VERIFIERS.get("countdown")(text, P) == 0.0


def test_unused_number_is_rejected():
    # 20 + 6 = 26 reached without the 2 and 3 being used: 4 * 5 = 20, 20 + 6 needs a 6 (absent),
    # so use a problem where a short path exists: [1, 4, 5, 6] -> 26: 4 * 5 = 20, 20 + 6 = 26,
    # 1 unused
    ok, why = check_countdown("4 * 5 = 20\n20 + 6 = 26\n", [1, 4, 5, 6], 26)
    assert not ok and why == "not every given number is used"


def test_solver_lists_both_orders_and_every_solution_verifies():
    sols = solve([2, 3, 4, 5], 26, 50)
    assert ((3, "*", 2, 6), (5, "*", 4, 20), (20, "+", 6, 26)) in sols
    assert ((5, "*", 4, 20), (3, "*", 2, 6), (20, "+", 6, 26)) in sols
    for s in sols:
        assert check_countdown(format_steps(list(s)), [2, 3, 4, 5], 26)[0]
        assert all(1 <= r <= 50 for *_, r in s)


def test_verifier_agrees_with_reasoning_gym():
    """Our step verifier and reasoning-gym's expression scorer agree on right solutions."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset("countdown", min_numbers=4, max_numbers=4, min_value=1,
                                      max_value=6, min_target=10, max_target=50, seed=3, size=30)
    checked = 0
    for i in range(30):
        meta = ds[i]["metadata"]
        for steps in solve(meta["numbers"], meta["target"], 50)[:3]:
            # rebuild the expression the steps describe, innermost first
            exprs = {}
            for a, op, b, r in steps:
                ea = exprs.pop(a, [None]).pop() if exprs.get(a) else str(a)
                eb = exprs.pop(b, [None]).pop() if exprs.get(b) else str(b)
                exprs.setdefault(r, []).append(f"({ea} {op} {eb})")
            expr = exprs[meta["target"]][-1]
            assert check_countdown(format_steps(list(steps)), meta["numbers"], meta["target"])[0]
            assert ds.score_answer(expr, ds[i]) == 1.0, expr
            checked += 1
    assert checked >= 20


def test_splits_are_disjoint_on_the_canonical_key_and_seeded():
    spec = CountdownSpec()
    s = make_splits(spec, seed=0, n_test=1000, n_val=200)
    keys = {k: {r["key"] for r in v} for k, v in s.items()}
    assert len(s["test"]) == 1000 and len(keys["test"]) == 1000
    assert not keys["test"] & keys["train"] and not keys["test"] & keys["validation"]
    assert not keys["validation"] & keys["train"]
    assert s == make_splits(spec, seed=0, n_test=1000, n_val=200)
    assert s["test"] != make_splits(spec, seed=1, n_test=1000, n_val=200)["test"]
    for row in s["test"][:50]:
        assert canonical_key(row["numbers"], row["target"]) == row["key"]
        assert row["num_solutions"] == len(solve(row["numbers"], row["target"], 50)) >= 1


def test_too_small_a_space_is_a_clear_error():
    spec = CountdownSpec(max_value=3)
    n = len(enumerate_problems(spec))
    with pytest.raises(ValueError, match="too few"):
        make_splits(spec, seed=0, n_test=n, n_val=10)


DEEP = CountdownSpec(num_count=6, problems="sample", max_value=9, min_target=10, max_target=99,
                     max_intermediate=99, n_train=3000)


def test_drawn_problems_carry_a_walk_that_verifies_and_splits_are_disjoint():
    s = make_splits(DEEP, seed=0, n_test=300, n_val=100)
    assert [len(s[k]) for k in ("test", "validation", "train")] == [300, 100, 3000]
    keys = {k: [r["key"] for r in v] for k, v in s.items()}
    assert len(set(keys["test"])) == 300 and len(set(keys["validation"])) == 100
    assert not set(keys["test"]) & set(keys["train"]) and not set(keys["test"]) & set(
        keys["validation"]
    )
    assert not set(keys["validation"]) & set(keys["train"])
    assert s == make_splits(DEEP, seed=0, n_test=300, n_val=100)
    for row in s["test"][:100] + s["train"][:100]:
        assert len(row["solution"]) == 5  # six numbers, five steps
        assert (
            10 <= row["target"] <= 99 and canonical_key(row["numbers"], row["target"]) == row["key"]
        )
        trace = sample_trace(row, DEEP, random.Random(0))
        assert check_countdown(trace, row["numbers"], row["target"]) == (True, "ok")


def test_a_drawn_target_can_be_reached_more_than_one_way():
    # the warm-up policy can only learn a choice where problems have several solutions: on
    # countdown-4 drawn problems (solvable by enumeration here) most have more than one
    spec = CountdownSpec(problems="sample", max_value=9, max_target=99, max_intermediate=99,
                         n_train=1)
    rows = make_splits(spec, seed=1, n_test=200, n_val=0)["test"]
    several = [len(solve(r["numbers"], r["target"], 99)) > 1 for r in rows]
    assert sum(several) / len(several) > 0.8


def test_a_random_walk_follows_the_rules_by_hand():
    # 2 and 2: 2+2=4, 2*2=4, 2-2 gives 0 (below 1), 2/2=1; each of the 3 is drawn
    seen = {random_walk([2, 2], CountdownSpec(), random.Random(i)) for i in range(60)}
    assert seen == {((2, "+", 2, 4),), ((2, "*", 2, 4),), ((2, "/", 2, 1),)}
    # 7 and 9 with results capped at 10: 9+7 and 9*7 exceed it, 9/7 is inexact, 9-7=2 is left
    assert random_walk([7, 9], CountdownSpec(max_intermediate=10), random.Random(0)) == (
        (9, "-", 7, 2),
    )
    # 7 and 7: 14 and 49 exceed 10, 7-7=0 is below 1, 7/7=1 is left
    assert random_walk([7, 7], CountdownSpec(max_intermediate=10), random.Random(0)) == (
        (7, "/", 7, 1),
    )
    # with every result above the cap there is no valid step: a dead end
    assert random_walk([9, 8], CountdownSpec(max_intermediate=0), random.Random(0)) is None


@pytest.mark.parametrize("kw,match", [
    ({"num_count": 6}, "set data.countdown.problems: sample"),
    ({"max_intermediate": 300}, "up to 255"),
    ({"num_count": 1}, "2 or more numbers"),
])
def test_bad_task_specs_name_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        CountdownSpec(**kw)
