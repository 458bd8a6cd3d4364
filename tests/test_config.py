"""Every shipped config loads; bad configs fail at once, naming the key and the fix."""
import dataclasses
from pathlib import Path

import pytest

from configs.schema import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads_and_has_a_header(path):
    cfg = load_config(path)
    assert cfg.name
    head = path.read_text().splitlines()[0]
    assert head.startswith("# "), "every experiment YAML begins with a comment header"
    assert "Run:" in path.read_text()


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,match",
    [
        ("name: x\ndata:\n  n_tets: 5\n", r"unknown key 'data.n_tets': did you mean 'n_test'\?"),
        (
            "name: x\nwarmup:\n  spec:\n    stpes: 5\n",
            r"unknown key 'warmup.spec.stpes': did you mean 'steps'\?",
        ),
        ("name: x\nmodle: {}\n", r"unknown key 'modle': did you mean 'model'\?"),
        ("name: x\ndata:\n  n_test: many\n", r"data.n_test: Input should be a valid integer"),
        (
            "name: x\ndata:\n  n_test: 0\n",
            r"data.n_test: Input should be greater than or equal to 1",
        ),
        (
            "name: x\nengine:\n  name: vllmm\n",
            r"unknown engine 'vllmm' \(did you mean 'vllm'\?\); valid engines: hf, vllm",
        ),
        ("name: x\nmodel:\n  tiny: null\n", r"model needs path \(a checkpoint directory\), gguf"),
        ("name: x\nrl:\n  save_optimizer_every: 3\nalgo:\n  update:\n    num_processes: 2\n",
         r"rl.save_optimizer_every=3 keeps state in the one-process resident trainer"),
        ("name: x\nrl:\n  save_every: 2\nalgo:\n  update:\n    resident: false\n",
         r"rl.save_every=2 keeps state .* resident: False set rl.save_every: 1"),
        ("name: x\nalgo:\n  method: dapoo\n", r"unknown method 'dapoo' \(did you mean 'dapo'\?\)"),
        ("name: x\nalgo:\n  reward:\n    overlong_buffer: -1\n", r"overlong_buffer must be >= 0"),
        ("name: x\nalgo:\n  tree:\n    sampler: eptre\n", r"algo.tree.sampler: Input should be"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        load_config(write(tmp_path, text))


def test_overrides_apply_and_are_validated(tmp_path):
    p = write(tmp_path, "name: x\n")
    cfg = load_config(p, ["warmup.spec.steps=7", "data.n_test=3"])
    assert cfg.warmup.spec.steps == 7 and cfg.data.n_test == 3
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        load_config(p, ["warmup.spec.step=7"])
    with pytest.raises(ValueError, match="must look like key.sub=value"):
        load_config(p, ["warmup.spec.steps"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_an_experiment_file_can_build_on_a_base(tmp_path):
    (tmp_path / "base.yaml").write_text("name: parent\nseed: 3\nwarmup:\n  spec:\n    steps: 9\n"
                                        "    lr: 0.5\nrl:\n  iterations: 2\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nwarmup:\n  spec:\n    steps: 4\n")
    cfg = load_config(tmp_path / "child.yaml", ["rl.iterations=5"])
    # the child's key wins, its sibling keys come from the base, the base's name does not
    assert cfg.warmup.spec.steps == 4 and cfg.warmup.spec.lr == 0.5 and cfg.seed == 3
    assert cfg.rl.iterations == 5 and cfg.name == "child"


@pytest.mark.parametrize("text,match", [
    ("base: nope.yaml\n", r"its base 'nope.yaml' does not exist"),
    ("base: c.yaml\n", "base files form a loop"),
    ("base: [a]\n", "base must be the path"),
])
def test_a_bad_base_is_named(tmp_path, text, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_config(write(tmp_path, text))


def test_the_deep_task_config_is_the_default_run_on_countdown_6():
    root = Path(__file__).resolve().parents[1] / "configs" / "experiments"
    deep, tiny = load_config(root / "deep_ibtpo.yaml"), load_config(root / "tiny_ibtpo.yaml")
    assert deep.data.countdown.num_count == 6 and deep.data.countdown.problems == "sample"
    assert deep.model == tiny.model and deep.algo == tiny.algo
    # the deep task's warm-up: half the batch, twice the steps (the same compute), all else equal
    dw, tw = deep.warmup.spec, tiny.warmup.spec
    assert (dw.batch_size, dw.steps) == (32, 3000)
    assert dw.steps * dw.batch_size == tw.steps * tw.batch_size
    assert dataclasses.replace(dw, batch_size=tw.batch_size, steps=tw.steps) == tw
