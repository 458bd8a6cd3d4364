"""The training flow on tiny_smoke.yaml under a Prefect test harness: every stage runs and
is tracked in MLflow, a rerun is cache hits only, a run that dies mid-iteration resumes there,
a corrupted stage output is recomputed. Tasks are also checked through ``.fn()``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml")


def _run(state: Path, *extra: str) -> dict:
    from flows.train import train

    # one thread: float sums in a fixed order, so a recomputed stage is bit-identical
    return train(SMOKE, [f"output_dir={state / 'runs'}", f"stage_cache_dir={state / 'stages'}",
                         "threads=1", *extra])


def _history(run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def test_flow_runs_every_stage_and_tracks_it(harness):
    from mlflow.tracking import MlflowClient

    out = _run(harness)
    assert out["n_eval"] == 16 and out["decoded_tokens"] > 0
    client = MlflowClient()
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["algo.method"] == "ibtpo" and "version.torch" in run.data.params
    for key in ("reward", "reward_std", "eff_rate", "entropy", "loss/approx_kl", "loss/clipfrac",
                "clip_ratio/high_mean", "clip_ratio/low_mean", "tree/decoded_tokens",
                "tree/num_leaves", "tree/shared_prefix_frac", "tree/leaves_per_budget",
                "ib/score_mean", "ib/h_mean", "ib/i_mean", "num_tokens", "timing_s/sample_trees",
                "timing_s/update_policy"):
        assert _history(run.info.run_id, key) == [0, 1], key
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    stages = {c.data.tags["ibtpo.stage"] for c in children}
    assert stages == {"prepare_data", "warm_up", "evaluate", "benchmark"}
    data_run = next(c for c in children if c.data.tags["ibtpo.stage"] == "prepare_data")
    assert {d.dataset.name for d in data_run.inputs.dataset_inputs} == {"train", "test"}
    bench = next(c for c in children if c.data.tags["ibtpo.stage"] == "benchmark")
    assert "lm_eval/ibtpo_countdown/acc_none" in bench.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "tiny_smoke.yaml", "lineage.json", "sample_trees", "plots"} <= arts
    trees = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "sample_trees")}
    assert trees == {f"tree_{i}.{ext}" for i in range(3) for ext in ("json", "png")}
    lineage = json.loads(
        Path(client.download_artifacts(run.info.run_id, "lineage.json")).read_text()
    )
    assert len(lineage["checkpoints"]) == 2
    assert (
        lineage["checkpoints"][1]["parent_checkpoint_digest"] == lineage["checkpoints"][0]["digest"]
    )


def _flow_run_page(flow_run_id: str) -> tuple[list[str], dict[str, str]]:
    """What the Prefect UI shows for a flow run: its task runs' names, its artifacts by key."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return [r.name for r in runs], {a.key: str(a.data) for a in arts}

    return asyncio.run(read())


def test_the_prefect_ui_names_stages_and_shows_the_result(harness):
    """Task runs are named by stage and iteration; the flow run carries its result table and
    the link to its MLflow run (issue 13, item 4)."""
    from mlflow.tracking import MlflowClient

    out = _run(harness)
    flow_run_id = MlflowClient().get_run(out["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    names, arts = _flow_run_page(flow_run_id)
    for it in (0, 1):
        for stage in ("sample_trees", "estimate_scores", "update_policy"):
            assert f"{stage}[it {it}]" in names, names
    assert {"evaluate_policy[before]", "evaluate_policy[after]", "benchmark[final]"} <= set(names)
    assert "result-tiny-smoke" in arts and "mlflow-tiny-smoke" in arts, arts.keys()
    assert f"{out['accuracy_after']:.3f}" in arts["result-tiny-smoke"]
    assert f"/runs/{out['mlflow_run_id']}" in arts["mlflow-tiny-smoke"]


def test_rerun_is_cache_hits_only(harness, monkeypatch):
    import ibtpo_core.data.splits
    import ibtpo_core.evaluation
    import ibtpo_core.lm_eval_runner
    import ibtpo_core.models.tiny
    import ibtpo_core.rl
    import ibtpo_core.training.deepspeed_trainer
    import ibtpo_core.training.warmup

    first = _run(harness)

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    for mod, name in (
        (ibtpo_core.data.splits, "write_splits"),
        (ibtpo_core.training.warmup, "run_warmup"),
        (ibtpo_core.models.tiny, "create_tiny_model"),
        (ibtpo_core.evaluation, "accuracy_metrics"),
        (ibtpo_core.rl, "grow_trees"),
        (ibtpo_core.rl, "score_trees"),
        (ibtpo_core.training.deepspeed_trainer, "train_on_sequences"),
        (ibtpo_core.lm_eval_runner, "run_lm_eval"),
    ):
        monkeypatch.setattr(mod, name, boom)
    second = _run(harness)
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["accuracy_after"] == first["accuracy_after"]
    assert _history(first["mlflow_run_id"], "iteration") == [0, 1]  # logged once each


def test_launch_settings_key_no_stage(harness, monkeypatch):
    """Moving the same update to another launcher, port or node command (or nodes x processes
    for the same world size) reuses every stage and continues the same MLflow run; a setting of
    what the update computes (lr) redoes the updates."""
    import ibtpo_core.training.deepspeed_trainer as trainer
    from configs.schema import load_config

    first = _run(harness)

    def boom(*a, **k):
        raise AssertionError("an update ran again for a launch setting")

    monkeypatch.setattr(trainer, "train_on_sequences", boom)
    launch = ["algo.update.launcher=deepspeed", "algo.update.rdzv_port=29555",
              "algo.update.node_launch='srun --nodes=1 --nodelist={host} bash -c'"]
    moved = _run(harness, *launch)
    assert moved["mlflow_run_id"] == first["mlflow_run_id"]
    assert moved["checkpoint"] == first["checkpoint"]
    key = load_config(SMOKE, ["algo.update.num_processes=2"]).algo.stage_key()
    assert key == load_config(SMOKE, ["algo.update.nodes=2", "algo.update.node_hosts=[a, b]"]
                              ).algo.stage_key()  # the same world size, factored otherwise
    assert key != load_config(SMOKE, []).algo.stage_key()  # another world size
    assert (load_config(SMOKE, ["algo.update.lr=0.0002"]).algo.stage_key()
            != load_config(SMOKE, []).algo.stage_key())


def test_the_deepspeed_config_keys_the_update_by_its_content(tmp_path):
    from configs.schema import load_config

    ds = (ROOT / "configs" / "deepspeed" / "zero0_cpu.yaml").read_text()
    (tmp_path / "a.yaml").write_text(ds)
    (tmp_path / "b.yaml").write_text(ds)  # the same file under another name: the same key
    (tmp_path / "c.yaml").write_text(ds + "\ngradient_clipping: 0.5\n")  # an edit: another key

    def key(name):
        return load_config(SMOKE, [f"algo.update.deepspeed_config={tmp_path / name}"]
                           ).algo.stage_key()

    assert key("a.yaml") == key("b.yaml") != key("c.yaml")


def test_stages_before_rl_computed_first_leave_the_run_nothing_to_compute(harness, monkeypatch):
    """What a sweep computes once before its cells run side by side (flows.train.before_rl)
    is what each run then reads: data, model, warm-up, the evaluation before RL and the curve's
    first point; the run computes only its RL and the evaluations of its RL checkpoints."""
    import ibtpo_core.data.splits
    import ibtpo_core.engines.held
    import ibtpo_core.models.tiny
    import ibtpo_core.training.warmup
    from configs.schema import load_config
    from flows.train import before_rl, train

    state = harness / "shared"
    extra = ["eval.every=1", "benchmark.enabled=false"]
    inputs = before_rl(load_config(SMOKE, [f"stage_cache_dir={state / 'stages'}", "threads=1",
                                           *extra]))
    starts = {p.name for p in (state / "stages").iterdir() if p.name.startswith("warmup-")}
    assert len(starts) == 1

    def boom(*a, **k):
        raise AssertionError("a stage before RL ran again in the run")

    for mod, name in ((ibtpo_core.data.splits, "write_splits"),
                      (ibtpo_core.training.warmup, "run_warmup"),
                      (ibtpo_core.models.tiny, "create_tiny_model")):
        monkeypatch.setattr(mod, name, boom)
    engine_for, evaluated = ibtpo_core.engines.held.stage_engine, []

    def counted(name, model_path, **k):  # the evaluation stage's engine, built per checkpoint
        evaluated.append(Path(model_path).name)
        return engine_for(name, model_path, **k)

    monkeypatch.setattr(ibtpo_core.engines.held, "stage_engine", counted)
    out = train(SMOKE, [f"output_dir={state / 'runs'}", f"stage_cache_dir={state / 'stages'}",
                        "threads=1", *extra])
    # the run reports the evaluation computed before it, not one of its own
    assert out["accuracy_before"] == inputs.before["metrics"]["accuracy"]
    assert out["accuracy_se_before"] == inputs.before["metrics"]["accuracy_se"]
    # curve points after iterations 1 and 2 (250 problems), then the final one (all 16)
    assert len(evaluated) == 3 and not set(evaluated) & starts, evaluated


def test_failed_iteration_resumes_there_and_logs_once(harness, monkeypatch):
    import ibtpo_core.rl

    other = ["rl.iterations=3", "seed=7"]
    monkeypatch.setenv("IBTPO_FAULT", "update_policy:1")
    with pytest.raises(RuntimeError, match="injected fault in update_policy"):
        _run(harness, *other)
    monkeypatch.delenv("IBTPO_FAULT")
    calls = []
    real = ibtpo_core.rl.grow_trees

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ibtpo_core.rl, "grow_trees", counting)
    out = _run(harness, *other)
    assert len(calls) == 1  # iteration 1's trees were cached; only iteration 2 samples anew
    assert _history(out["mlflow_run_id"], "iteration") == [0, 1, 2]


def test_corrupted_checkpoint_is_recomputed(harness):
    out = _run(harness)
    ckpt = Path(out["checkpoint"])
    weights = next(ckpt.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a truncated write
    again = _run(harness)
    assert Path(again["checkpoint"]) == ckpt and weights.read_bytes() == data


def test_tasks_through_fn(tmp_path):
    from configs.schema import DataConfig
    from tasks.prepare_data import prepare_data

    cfg = DataConfig(n_test=10, n_val=5)
    rec = prepare_data.fn(cfg, store=str(tmp_path))
    assert rec["metrics"]["data/test_rows"] == 10.0
    assert (Path(rec["path"]) / "train.jsonl").is_file()
    assert prepare_data.fn(cfg, store=str(tmp_path))["digest"] == rec["digest"]


def test_lost_tracking_connection_mid_run_then_rerun_logs_once(harness, monkeypatch):
    from mlflow.tracking import MlflowClient

    other = ["seed=11"]
    real = MlflowClient.log_batch

    def flaky(self, run_id, metrics=(), *a, **k):
        if any(m.key == "iteration" and m.step == 1 for m in metrics):
            raise ConnectionError("tracking server went away")
        return real(self, run_id, metrics, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    with pytest.raises(ConnectionError):
        _run(harness, *other)
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    out = _run(harness, *other)
    assert _history(out["mlflow_run_id"], "iteration") == [0, 1]
    assert len(MlflowClient().get_metric_history(out["mlflow_run_id"], "reward")) == 2


def test_corrupted_stage_output_is_recomputed(harness):
    own = f"output_dir={harness / 'runs_corrupt'}"  # only this run's iteration folders in it
    out = _run(harness, own)
    (folder,) = Path(out["checkpoint"]).parent.glob("it0001-sample-*")
    trees = folder / "trees.json"
    good = trees.read_text()
    trees.write_text(good.replace('"reward": 0.0', '"reward": 1.0', 1) if '"reward": 0.0' in good
                     else good[:-10])
    again = _run(harness, own)
    assert trees.read_text() == good and again["checkpoint"] == out["checkpoint"]


def test_evaluate_flow_scores_a_checkpoint(harness):
    from mlflow.tracking import MlflowClient

    from flows.evaluate_checkpoint import evaluate

    out = _run(harness)
    ev = evaluate(out["checkpoint"], SMOKE, [f"output_dir={harness / 'eval'}",
                                             f"stage_cache_dir={harness / 'stages'}", "threads=1"])
    assert ev["accuracy"] == out["accuracy_after"]  # the same checkpoint, the same test split
    assert "lm_eval/ibtpo_countdown/acc_none" in ev
    run = MlflowClient().get_run(ev["mlflow_run_id"])
    assert run.data.tags["ibtpo.kind"] == "evaluate" and run.info.status == "FINISHED"
    with pytest.raises(FileNotFoundError, match="model.path .* does not exist"):
        evaluate(str(harness / "no-such-checkpoint"), SMOKE)


def test_old_optimizer_states_are_deleted_and_the_run_still_resumes(harness, monkeypatch):
    import ibtpo_core.training.deepspeed_trainer

    # a stage cache of its own: the pruning below must not reach the other tests' iterations
    own = [f"output_dir={harness / 'runs_keep'}", f"stage_cache_dir={harness / 'stages_keep'}",
           "rl.iterations=3", "rl.keep_optimizer_states=1", "benchmark.enabled=false"]
    out = _run(harness, *own)
    ckpts = sorted(Path(out["checkpoint"]).parent.glob("it*-policy-*"))
    assert [(c / "optimizer.pt").is_file() for c in ckpts] == [False, False, True]
    assert all((c / "model.safetensors").is_file() for c in ckpts)  # weights are kept
    lineage = json.loads((harness / "runs_keep" / "lineage.json").read_text())
    assert [c["optimizer_state_deleted"] for c in lineage["checkpoints"]] == [True, True, False]

    def boom(*a, **k):
        raise AssertionError("a finished update ran again")

    monkeypatch.setattr(ibtpo_core.training.deepspeed_trainer, "train_on_sequences", boom)
    assert _run(harness, *own)["checkpoint"] == out["checkpoint"]  # pruned outputs are cache hits
    monkeypatch.undo()
    weights = Path(out["checkpoint"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the last checkpoint is lost ...
    with pytest.raises(ValueError, match="rl.keep_optimizer_states=null"):
        _run(harness, *own)  # ... and the state it must be recomputed from was deleted


def test_a_longer_run_continues_from_a_shorter_ones_iterations(harness, monkeypatch):
    """Runs that differ only in rl.iterations (and their folders) share their RL iterations: the
    3-iteration run computes one update, not three; each run's records list its own."""
    import ibtpo_core.training.deepspeed_trainer as trainer

    common = [f"stage_cache_dir={harness / 'stages_budget'}", "benchmark.enabled=false"]
    short = _run(harness, f"output_dir={harness / 'budget_1x'}", *common)
    real, calls = trainer.train_on_sequences, []

    def counted(*a, **k):
        calls.append(a[1])  # out_dir
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_on_sequences", counted)
    long = _run(harness, f"output_dir={harness / 'budget_3x'}", "rl.iterations=3", *common)
    assert len(calls) == 1 and "it0002-policy" in calls[0]
    assert long["iterations_dir"] == short["iterations_dir"]
    link = harness / "budget_3x" / "iterations"
    assert link.resolve() == Path(short["iterations_dir"]).resolve()
    assert long["decoded_tokens"] > short["decoded_tokens"] > 0
    # the shorter run, rerun now that its iterations folder holds three, still records two
    again = _run(harness, f"output_dir={harness / 'budget_1x'}", *common)
    assert len(calls) == 1 and again["checkpoint"] == short["checkpoint"]
    lineage = json.loads((harness / "budget_1x" / "lineage.json").read_text())
    assert [c["checkpoint"][:6] for c in lineage["checkpoints"]] == ["it0000", "it0001"]
    tree = json.loads((harness / "budget_1x" / "sample_trees" / "tree_0.json").read_text())
    last = next(Path(short["iterations_dir"]).glob("it0001-sample-*")) / "trees.json"
    assert tree == json.loads(last.read_text())[0]  # its own last iteration's, not it0002's


def test_a_tuning_run_is_scored_on_the_validation_split(harness):
    """eval.split: validation reads the validation split (8 problems in tiny_smoke), never the
    test split (16), for the before, after and curve evaluations alike."""
    out = _run(harness, "eval.split=validation", "eval.every=1", "eval.every_n=4")
    assert out["eval_split"] == "validation" and out["n_eval"] == 8
    from mlflow.tracking import MlflowClient

    curve = MlflowClient().get_metric_history(
        [
            r
            for r in MlflowClient().search_runs(
                [MlflowClient().get_run(out["mlflow_run_id"]).info.experiment_id],
                f"tags.`mlflow.parentRunId` = '{out['mlflow_run_id']}' "
                f"and tags.`ibtpo.stage` = 'curve'",
            )
        ][0].info.run_id,
        "curve/n_eval",
    )
    assert {m.value for m in curve} == {4.0}


def test_validation_scoring_without_a_validation_split_fails_before_any_work(tmp_path):
    from configs.schema import load_config
    from ibtpo_core.preflight import preflight

    cfg = load_config(SMOKE, ["eval.split=validation", "data.n_val=0", f"output_dir={tmp_path}/r",
                              f"stage_cache_dir={tmp_path}/s"])
    with pytest.raises(ValueError, match="set data.n_val"):
        preflight(cfg)


@pytest.mark.parametrize("method, extra", [
    ("treerl", []),
    ("treepo", ["algo.filter_groups.max_draws=2"]),
    # DAPO's refills stop at the run's token budget, and the run stops there too
    ("dapo", ["rl.iterations=3", "rl.decoded_tokens=1"]),
])
def test_the_peers_methods_run_through_the_flow(harness, method, extra):
    from mlflow.tracking import MlflowClient

    out = _run(harness, f"algo.method={method}", f"name=smoke_{method}", *extra)
    run = MlflowClient().get_run(out["mlflow_run_id"])
    assert run.data.params["algo.method"] == method and out["decoded_tokens"] > 0
    lineage = json.loads(Path(MlflowClient().download_artifacts(
        run.info.run_id, "lineage.json")).read_text())
    assert len(lineage["checkpoints"]) == (1 if method == "dapo" else 2)
    if method != "treerl":
        assert _history(run.info.run_id, "filter/draws") == ([0] if method == "dapo" else [0, 1])
    else:
        assert run.data.metrics["tree/shared_prefix_frac"] > 0  # forks share prefixes
    # a sweep's report reads the final evaluation where the run stopped (1 of 3 iterations for
    # dapo) and counts both peers' samplers as trees
    from pipeline.report import read_cell

    cell = read_cell(MlflowClient(), run)
    assert cell is not None and cell.final["accuracy"] == pytest.approx(out["accuracy_after"])
    assert cell.trees == (method != "dapo")
