"""Real-data paths on local fixtures: math datasets in the MATH, GSM8K and DAPO-Math-17k shapes
through ``datasets``, the math verifier (math-verify), and reasoning-gym problems with their
own checkers."""
import json
from pathlib import Path

import pytest

from configs.schema import DataConfig, ExperimentConfig
from ibtpo_core.data import splits
from ibtpo_core.data.answers import final_answer, gold_answer, last_boxed
from ibtpo_core.data.problems import prompt_text, verifier
from ibtpo_core.data.sources import DatasetSource, load_split

FIX = Path(__file__).parent / "fixtures" / "math"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "experiments"


def test_math_shape_boxed_answers_from_solutions_and_disjoint_splits(tmp_path):
    src = DatasetSource(data_files={"train": str(FIX / "math_train.jsonl"),
                                    "test": str(FIX / "math_test.jsonl")},
                        format="math", answer_field="solution", answer_format="boxed",
                        prompt_template="Problem: {problem}\nAnswer in \\boxed{}.")
    cfg = DataConfig(source="datasets", n_test=10, n_val=1, datasets=src)
    splits.write_splits(tmp_path / "out", cfg)
    out = {
        s: splits.read_jsonl(tmp_path / "out" / f"{s}.jsonl")
        for s in ("train", "validation", "test")
    }
    assert [r["answer"] for r in out["test"]] == ["7", "\\frac{3}{4}"]
    assert out["test"][0]["prompt"] == "Problem: What is $\\sqrt{49}$?\nAnswer in \\boxed{}."
    assert all(r["verifier"] == "math" for rows in out.values() for r in rows)
    # the train copy of a test problem (extra spaces) is held out; "Compute sqrt(49)" stays
    train = out["train"] + out["validation"]
    assert sorted(r["answer"] for r in train) == ["4", "7", "\\frac{5}{6}"]
    assert [r["prompt"].split("\n")[0] for r in train if r["answer"] == "7"] == [
        "Problem: Compute $\\sqrt{49}$."]


def test_gsm8k_shape_reads_the_answer_after_the_hashes(tmp_path):
    src = DatasetSource(data_files={"train": str(FIX / "gsm8k.jsonl")}, format="math",
                        problem_field="question", answer_field="answer", answer_format="gsm8k",
                        bad_rows="skip")
    rows = load_split(src, "train")
    assert [r["answer"] for r in rows] == ["7", "1200"]  # thousands separator dropped
    assert rows[0]["prompt"].startswith("Tom has 3 apples") and "\\boxed{}" in rows[0]["prompt"]
    with pytest.raises(ValueError, match=r"1 of 3 rows of split 'train' lack a problem text in "
                                         r"'question' or an answer in 'answer' readable as "
                                         r"answer_format 'gsm8k' \(first bad row: 2, "
                                         r"at .*gsm8k.jsonl:3: "):
        load_split(DatasetSource(data_files={"train": str(FIX / "gsm8k.jsonl")}, format="math",
                                 problem_field="question", answer_format="gsm8k"), "train")


def test_dapo_shape_chat_prompt_and_nested_answer_field():
    src = DatasetSource(data_files={"train": str(FIX / "dapo.jsonl")}, format="math",
                        problem_field="prompt", answer_field="reward_model.ground_truth")
    rows = load_split(src, "train")
    assert [r["answer"] for r in rows] == ["2", "6"]
    assert rows[0]["prompt"].startswith("Find the remainder when $2^{10}$ is divided by $7$.")


@pytest.mark.parametrize("text,fmt,gold", [
    ("so $x=\\boxed{\\frac{a}{b}}$ and \\boxed{3}", "boxed", "3"),
    ("\\boxed{\\{1, 2\\}}", "boxed", "\\{1, 2\\}"),
    ("\\boxed{x^{2}+1}.", "boxed", "x^{2}+1"),
    ("no box", "boxed", None),
    ("work\n#### 1,234", "gsm8k", "1234"),
    (" 42 ", "plain", "42"),
])
def test_gold_answers(text, fmt, gold):
    assert gold_answer(text, fmt) == gold


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{\\frac{1}{2}} then \\fbox{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize("response,answer,reward", [
    ("Add: \\boxed{\\frac{5}{6}}", "\\frac{5}{6}", 1.0),
    ("so it is \\boxed{10/12}", "\\frac{5}{6}", 1.0),       # equal value, other form
    ("\\boxed{0.8333}", "\\frac{5}{6}", 0.0),              # rounded: not equal
    ("The answer is 1200.", "1200", 1.0),                   # no box: the last number
    ("The answer is \\boxed{1201}", "1200", 0.0),
    ("first \\boxed{3}, corrected: \\boxed{4}", "4", 1.0),  # the last box counts
    ("", "7", 0.0),
])
def test_math_verifier(response, answer, reward):
    assert verifier("math")(response, {"answer": answer}) == reward


def test_math_verifier_runs_in_a_worker_thread():
    """Prefect runs tasks in threads, where math-verify's SIGALRM timeout cannot be set."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(verifier("math")("\\boxed{7}", {"answer": "7"})))
    t.start()
    t.join()
    assert out == [1.0]


def test_reasoning_gym_problems_and_their_checker(tmp_path):
    from ibtpo_core.data.gym import ReasoningGymSpec

    spec = ReasoningGymSpec(dataset="countdown", n_train=30,
                            config={"min_numbers": 3, "max_numbers": 3, "min_target": 5,
                                    "max_target": 30})
    splits.write_splits(tmp_path / "out", DataConfig(source="reasoning_gym", n_test=5, n_val=2,
                                                     reasoning_gym=spec))
    out = {
        s: splits.read_jsonl(tmp_path / "out" / f"{s}.jsonl")
        for s in ("train", "validation", "test")
    }
    assert len(out["test"]) == 5 and len(out["validation"]) == 2 and len(out["train"]) >= 20
    keys = [{r["key"] for r in rows} for rows in out.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    row = out["test"][0]
    assert prompt_text(row).endswith("Give your final answer alone on the last line.")
    check = verifier("reasoning_gym")
    assert check(f"Let me think.\n{row['answer']}", row) == 1.0
    assert check(f"<answer>{row['answer']}</answer>", row) == 1.0
    assert (
        check("1 + 1", row) == 0.0
    )  # well-formed but wrong: reasoning-gym's partial credit is 0 here
    nums = row["rg_metadata"]["numbers"]
    assert row["rg_metadata"]["target"] and len(nums) == 3


def test_reasoning_gym_arithmetic_scored_by_math_verify(tmp_path):
    from configs.schema import load_config

    cfg = load_config(str(CONFIGS / "smollm2_arithmetic_ibtpo.yaml"),
                      ["data.n_test=3", "data.n_val=1", "data.reasoning_gym.n_train=20"])
    splits.write_splits(tmp_path / "out", cfg.data)
    row = splits.read_jsonl(tmp_path / "out" / "test.jsonl")[0]
    assert row["verifier"] == "math"
    a, op, b = row["rg_metadata"]["expression"].split()
    gold = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert row["answer"] == str(gold)
    check = verifier(row["verifier"])
    assert check(f"{a} {op} {b} equals {gold}.", row) == 1.0  # a right answer in a sentence
    assert (
        verifier("reasoning_gym")(f"{a} {op} {b} equals {gold}.", row) == 0.0
    )  # not its last line
    assert check(f"{a} {op} {b} equals {gold + 1}.", row) == 0.0
    with pytest.raises(ValueError, match="verifier"):
        DataConfig.model_validate(
            {
                "source": "reasoning_gym",
                "reasoning_gym": {"dataset": "basic_arithmetic", "verifier": "exact"},
            }
        )


def test_final_answer_prefers_the_answer_tag_then_the_last_line():
    assert final_answer("x\n<answer> 5 </answer>\nmore") == "5"
    assert final_answer("step one\n\n  3*4 - 2  \n") == "3*4 - 2"
    assert final_answer("") == ""


@pytest.mark.parametrize("raw,match", [
    ({"data": {"source": "reasoning_gym"}}, "source: reasoning_gym needs a reasoning_gym section"),
    ({"data": {"source": "reasoning_gym", "reasoning_gym": {"dataset": "countdown"}}},
     "warmup.enabled: the supervised warm-up writes countdown solution traces"),
    ({"engine": {"name": "vllm"}, "warmup": {"enabled": False}},
     "engine vllm does not expose per-token entropies"),
])
def test_configs_for_real_data_fail_early_with_the_fix(raw, match):
    with pytest.raises(ValueError, match=match):
        ExperimentConfig.model_validate({"name": "x", **raw})


def test_unknown_reasoning_gym_dataset_is_named():
    from ibtpo_core.data.gym import ReasoningGymSpec, check_dataset

    with pytest.raises(
        ValueError,
        match="unknown reasoning-gym dataset 'countdwn' \\(did you mean 'countdown'\\?\\)",
    ):
        check_dataset(ReasoningGymSpec(dataset="countdwn"))
    with pytest.raises(ValueError, match="rejects config"):
        check_dataset(ReasoningGymSpec(config={"bogus": 1}))


def test_fixture_files_are_jsonl():
    for f in FIX.glob("*.jsonl"):
        assert all(json.loads(line) for line in f.read_text().splitlines())
