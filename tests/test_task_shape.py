"""The task's shape as the policy sees it: per-step entropies and the unique-leaf ceiling,
worked by hand."""
import pytest

from ibtpo_core.evaluation import step_first_entropies, task_shape, unique_leaf_ceiling

NL, EOS = 9, 1


def test_first_token_entropy_of_each_step():
    # two steps "a b \n" "c \n" then EOS; the EOS after the last newline is not a step
    toks = [5, 6, NL, 7, NL, EOS]
    ents = [0.7, 0.1, 0.0, 0.3, 0.0, 0.05]
    assert step_first_entropies(toks, ents, {NL}, (EOS,)) == [0.7, 0.3]
    # a response cut off mid-step still counts the step it started
    assert step_first_entropies([5, NL, 6], [0.2, 0.0, 0.4], {NL}, (EOS,)) == [0.2, 0.4]
    assert step_first_entropies([], [], {NL}, (EOS,)) == []


@pytest.mark.parametrize("steps,choices,ceiling", [
    (3, [1, 2], 1.5),          # countdown-4: the last choice at step 2 re-decodes 2 of 3 steps
    (5, [1, 2, 3, 4], 2.5),    # countdown-6: branching at step 4 re-decodes 2 of 5
    (5, [1], 1.0),             # a choice at the first step only: a tree saves nothing
    (5, [], 1.0),
    (1, [1], 1.0),
])
def test_unique_leaf_ceiling_by_hand(steps, choices, ceiling):
    assert unique_leaf_ceiling(steps, choices) == pytest.approx(ceiling)


def test_task_shape_by_hand():
    # three responses of 3 steps and one of 2; step 3's entropy 0.02 is below the 0.1 threshold
    per = [[0.9, 0.3, 0.02], [0.5, 0.1, 0.02], [0.7, 0.2, 0.02], [0.3, 0.2]]
    m = task_shape(per, choice_entropy=0.1)
    assert m["task/steps"] == 3.0  # the median step count
    assert m["task/step_entropy_1"] == pytest.approx(0.6)
    assert m["task/step_entropy_2"] == pytest.approx(0.2)
    assert m["task/step_entropy_3"] == pytest.approx(0.02)  # over the three that reach step 3
    assert m["task/choice_steps"] == 2.0 and m["task/ceiling_unique_ratio"] == pytest.approx(1.5)
    assert task_shape([], 0.1) == {}
