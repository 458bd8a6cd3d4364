"""Bad input is rejected before any expensive work, with the problem and the fix named.

Each row: config overrides on top of tiny_smoke.yaml (or a whole config text), and a pattern the
error must match. ``load_config`` + ``preflight`` are what ``ibtpo run`` calls before Prefect,
data, warm-up or training start.
"""
import json
import shutil
from pathlib import Path

import pytest

from configs.schema import load_config
from ibtpo_core.preflight import preflight

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "tiny_smoke.yaml"


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("bad")
    (d / "not_a_model").mkdir()
    no_eos = d / "no_eos"
    shutil.copytree(tiny_model_dir, no_eos)
    tc = json.loads((no_eos / "tokenizer_config.json").read_text())
    tc["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(tc))
    pickled = d / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    (d / "empty.jsonl").write_text("")
    (d / "rows.jsonl").write_text('{"numbers": [1, 2], "target": 3}\n{"numbers": [1, 2]}\n'
                                  '{"question": "x"}\n')
    (d / "ds_tbs.yaml").write_text("train_batch_size: 3\nzero_optimization:\n  stage: 1\n")
    (d / "ds_stage.yaml").write_text("zero_optimization:\n  stage: 5\n")
    (d / "a_file").write_text("x")
    return d


CASES = [
    # (id, overrides, expected error pattern)
    ("misspelt key", ["data.n_tets=5"], r"unknown key 'data.n_tets': did you mean 'n_test'"),
    (
        "misspelt nested key",
        ["algo.tree.B_mx=3"],
        r"unknown key 'algo.tree.B_mx': did you mean 'B_max'",
    ),
    ("unknown top-level key", ["trainer={{}}"], r"unknown key 'trainer'"),
    ("misspelt section", ["rl.rolout={{}}"], r"did you mean 'rollout'"),
    ("wrong type int", ["data.n_test=many"], r"data.n_test: Input should be a valid integer"),
    ("wrong type G", ["algo.tree.G=eight"], r"algo.tree.G: Input should be a valid integer"),
    (
        "wrong type bool",
        ["warmup.enabled=maybe"],
        r"warmup.enabled: Input should be a valid boolean",
    ),
    ("negative budget", ["algo.tree.budget_tokens=-5"], r"budget_tokens must be positive"),
    ("G below 2", ["algo.tree.G=1"], r"G must be >= 2"),
    ("B_max below 2", ["algo.tree.B_max=1"], r"B_max must be >= 2"),
    ("clip low out of range", ["algo.loss.eps_low=1.5"], r"eps_low must be in \[0, 1\)"),
    ("clip high negative", ["algo.loss.eps_high=-0.1"], r"eps_high must be >= 0"),
    ("beta negative", ["algo.score.beta=-1"], r"beta must be >= 0"),
    ("unknown method", ["algo.method=ppo"], r"unknown method 'ppo'.*valid methods: ibtpo, grpo"),
    ("unknown engine", ["engine.name=sglang"], r"unknown engine 'sglang'; valid engines: hf, vllm"),
    (
        "unknown selection",
        ["algo.tree.select_by=ibs"],
        r"unknown select_by 'ibs'.*Valid names: entropy, ib, random, relevance",
    ),
    (
        "unknown advantage",
        ["algo.advantage.name=gae"],
        r"unknown advantage 'gae'.*Valid names: dr_grpo, grpo, ibtpo, tree_entropy",
    ),
    ("unknown ib form", ["algo.score.ib_form=product"], r"unknown ib_form 'product'.*Valid names"),
    ("a key that moved", ["algo.tree.beta=2"],
     r"unknown key 'algo.tree.beta': it moved to 'algo.score.beta'"),
    ("unknown entropy estimator", ["algo.score.entropy_estimator=exact"],
     r"unknown entropy_estimator 'exact'.*Valid names: surprisal, token_entropy"),
    (
        "rollout temperature 0",
        ["rl.rollout.temperature=0"],
        r"rl.rollout.temperature: Input should be greater than 0",
    ),
    (
        "max tokens 0",
        ["rl.rollout.max_new_tokens=0"],
        r"max_new_tokens: Input should be greater than or equal to 1",
    ),
    (
        "no prompts",
        ["rl.rollout.prompts_per_iteration=0"],
        r"prompts_per_iteration: Input should be greater than or equal to 1",
    ),
    ("budget too small", ["algo.tree.budget_tokens=2"], r"too small to sample one trajectory"),
    ("bad override", ["algo.tree.G"], r"must look like key.sub=value"),
    (
        "unknown lm-eval task",
        ["benchmark.tasks=[ibtpo_countdwn]"],
        r"unknown lm-eval task\(s\) \['ibtpo_countdwn'\]",
    ),
    (
        "model path missing",
        ["model.path=/nonexistent/model"],
        r"model.path /nonexistent/model does not exist",
    ),
    (
        "model path not a model",
        ["model.path={d}/not_a_model"],
        r"is not a model \(no config.json\)",
    ),
    ("tokenizer without EOS", ["model.path={d}/no_eos"], r"has no EOS token"),
    ("pickle weights refused", ["model.path={d}/pickled"], r"no \*.safetensors weights"),
    (
        "dataset file missing",
        ["data.source=datasets", "data.datasets.data_files={{train: {d}/nope.jsonl}}"],
        r"data file for split 'train' does not exist",
    ),
    (
        "dataset file empty",
        ["data.source=datasets", "data.datasets.data_files={{train: {d}/empty.jsonl}}"],
        r"data file for split 'train' is empty",
    ),
    (
        "datasets without section",
        ["data.source=datasets"],
        r"source: datasets needs a datasets section",
    ),
    (
        "deepspeed config missing",
        ["algo.update.deepspeed_config=configs/deepspeed/none.yaml"],
        r"DeepSpeed config .* does not exist",
    ),
    (
        "deepspeed world size",
        ["algo.update.deepspeed_config={d}/ds_tbs.yaml", "algo.update.num_processes=2"],
        r"train_batch_size=3 is not divisible by the world size 2",
    ),
    (
        "deepspeed stage",
        ["algo.update.deepspeed_config={d}/ds_stage.yaml"],
        r"zero_optimization.stage=5",
    ),
    ("output dir not writable", ["output_dir={d}/a_file/run"], r"output_dir .* is not writable"),
]


@pytest.mark.parametrize("overrides,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_the_fix(fx, tmp_path, overrides, pattern):
    overrides = [o.format(d=fx) for o in overrides]
    base = [f"output_dir={tmp_path / 'out'}", f"stage_cache_dir={tmp_path / 'stages'}"]
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        preflight(load_config(SMOKE, base + overrides))


def test_at_least_25_bad_inputs():
    assert len(CASES) >= 25


def test_bad_rows_are_counted_at_data_preparation(fx, tmp_path):
    from ibtpo_core.data import splits

    cfg = load_config(
        SMOKE,
        [
            "data.source=datasets",
            f"data.datasets.data_files={{train: {fx}/rows.jsonl, test: {fx}/rows.jsonl}}",
        ],
    )
    with pytest.raises(ValueError, match=r"2 of 3 rows of split 'test' lack .*bad_rows: skip"):
        splits.write_splits(tmp_path / "data", cfg.data)
    assert not (tmp_path / "data").exists()  # nothing half-written


def test_the_cli_reports_bad_input_without_starting_prefect(capsys):
    from ibtpo.cli import main

    assert main(["run", str(SMOKE), "--set", "algo.tree.G=1"]) == 2
    err = capsys.readouterr().err
    assert "G must be >= 2" in err and "Traceback" not in err
