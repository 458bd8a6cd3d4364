"""A stage's code digest covers every file the stage can execute, so an edit never gives a stale
cache hit: checked against what the stages really run (a traced run of the smoke config,
``tests/stage_trace.py``) and against the modules the library loads by name, by editing each of
them in a copy of the repository and recomputing the digest."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ibtpo_core.engines.base import ENGINE_MODULES
from pipeline.code_digest import ROOT, STAGE_TASKS, code_version, stage_files

RL_STAGES = ("sample_trees", "estimate_scores", "update_policy")


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> dict[str, list[str]]:
    """{stage kind: files it executed} from a real run of tiny_smoke.yaml in a process of its
    own (a fresh Prefect and MLflow state)."""
    d = tmp_path_factory.mktemp("trace")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{d}/mlflow.db",
           "PREFECT_HOME": str(d / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS":
           "120"}
    out = d / "trace.json"
    proc = subprocess.run([sys.executable, "-m", "tests.stage_trace", str(out), str(d / "state")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture()
def repo_copy(tmp_path) -> Path:
    """The code of the repository that digests read, copied: edits here touch nothing real."""
    for d in ("ibtpo_core", "tasks", "configs"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def digest(stage: str, root: Path) -> str:
    return code_version.__wrapped__(stage, root)  # not the cached value: the files changed


def changes_digest(stage: str, root: Path, rel: str) -> bool:
    """Whether appending a comment to ``rel`` (in the copy) changes ``stage``'s code digest."""
    before = digest(stage, root)
    path = root / rel
    text = path.read_text()
    path.write_text(text + "\n# an edit\n")
    try:
        return digest(stage, root) != before
    finally:
        path.write_text(text)


def test_the_trace_saw_every_stage_kind(traced):
    # the smoke run executes each stage kind at least once; the RL ones map to "rl"
    assert set(traced) == set(STAGE_TASKS)
    assert "ibtpo_core/engines/hf.py" in traced["rl"]  # the engine, loaded by name, ran


def test_editing_any_file_a_stage_executes_changes_its_digest(traced, repo_copy):
    missed = [(stage, rel) for stage, files in traced.items() for rel in files
              if not changes_digest(stage, repo_copy, rel)]
    assert not missed, (f"these files run inside a stage but do not key it (a stale cache hit "
                        f"after an edit): {missed}; add their module to STAGE_CODE or make the "
                        f"stage's task module import it where the digest can see it")


@pytest.mark.parametrize("stage", ["rl", "evaluate_policy"])
def test_every_engine_loaded_by_name_keys_the_stages_that_sample(stage, repo_copy):
    # vLLM never runs here, so the trace cannot see it: the name table is the ground truth
    for module in ENGINE_MODULES.values():
        rel = module.replace(".", "/") + ".py"
        assert changes_digest(stage, repo_copy, rel), f"{rel} does not key {stage}"
    assert changes_digest(stage, repo_copy, "ibtpo_core/engines/vllm_worker.py")


def test_a_data_source_loaded_through_its_registry_keys_data_preparation(repo_copy):
    for rel in ("ibtpo_core/data/gym.py", "ibtpo_core/data/sources.py",
                "ibtpo_core/data/countdown.py", "tasks/prepare_data.py"):
        assert changes_digest("prepare_data", repo_copy, rel), rel


def test_an_edit_outside_a_stage_keys_nothing_of_it(repo_copy):
    # the tree sampler is RL code: editing it must not redo the data, the model or the warm-up
    for stage in ("prepare_data", "create_model", "warm_up", "benchmark"):
        assert not changes_digest(stage, repo_copy, "ibtpo_core/algo/sampling.py"), stage
    assert not changes_digest("rl", repo_copy, "ibtpo_core/training/warmup.py")


def test_a_module_named_in_a_string_is_followed(tmp_path, monkeypatch):
    # a registry of its own that imports by name, as engines/base.py does, and a function entry
    # whose module registers a variant it dispatches to
    from pipeline import code_digest

    lib = tmp_path / "ibtpo_core"
    (lib / "plugins").mkdir(parents=True)
    (lib / "plugins" / "__init__.py").write_text("")
    (lib / "plugins" / "fast.py").write_text("X = 1\n")
    (lib / "plugins" / "slow.py").write_text("X = 2\n")
    (lib / "plugins" / "unused.py").write_text("X = 3\n")
    (lib / "toy.py").write_text(
        'MODULES = {"fast": "ibtpo_core.plugins.fast.Engine"}\n'
        "VARIANTS = Registry()\n\n"
        "def run(name):\n    return MODULES.get(name) or VARIANTS.get(name)()\n\n"
        "@VARIANTS.register('slow')\ndef _slow():\n    from ibtpo_core.plugins import slow\n\n"
        "def other():\n    from ibtpo_core.plugins import unused\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.py").write_text("")
    monkeypatch.setattr(code_digest, "EVERY_STAGE", ())  # the toy library writes no manifests
    monkeypatch.setitem(code_digest.STAGE_CODE, "toy", ("toy.run",))
    monkeypatch.setitem(code_digest.STAGE_TASKS, "toy", "tasks/toy.py")
    files = stage_files("toy", tmp_path)
    assert lib / "plugins" / "fast.py" in files and lib / "plugins" / "slow.py" in files
    assert lib / "plugins" / "unused.py" not in files  # what run() cannot reach keys nothing
