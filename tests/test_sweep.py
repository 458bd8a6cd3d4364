"""Sweep files (validation, expansion into cells) and the sweep flow on tiny_smoke: every cell
trains, the report is written and logged, a rerun is cache hits, a failed cell does not stop the
others and can be rerun alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from configs.sweep import check_cells, expand, load_sweep

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "experiments" / "tiny_smoke.yaml")


def _write(tmp_path: Path, body: dict, name: str = "s.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body))
    return str(p)


def test_every_sweep_file_loads_and_its_cells_validate():
    files = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert {f.name for f in files} >= {"paper_table1_tiny.yaml", "ibtpo_ablation_tiny.yaml"}
    for f in files:
        assert f.read_text().startswith("# "), f"{f.name} needs a comment header"
        spec = load_sweep(f)
        check_cells(spec, expand(spec))
    table = expand(load_sweep(ROOT / "configs/sweeps/paper_table1_tiny.yaml"))
    assert len(table) == 15 and len({c.label for c in table}) == 5
    assert {c.seed for c in table} == {0, 1, 2}


def test_expand_is_variants_times_grid_times_seeds(tmp_path):
    spec = load_sweep(_write(tmp_path, {
        "name": "x", "base": SMOKE, "set": {"threads": 1},
        "variants": [{"name": "a", "set": {"algo.method": "grpo"}}, {"name": "b"}],
        "grid": {"algo.update.lr": [0.001, 0.0001]}, "seeds": [0, 5]}))
    cells = expand(spec)
    assert len(cells) == 2 * 2 * 2
    first = cells[0]
    assert first.label == "a,lr=0.001" and first.seed == 0 and first.name == "x.a,lr=0.001.s0"
    assert "algo.method=grpo" in first.overrides and "threads=1" in first.overrides
    assert "output_dir=runs/sweeps/x/a,lr=0.001/s0" in first.overrides
    cfgs = check_cells(spec, cells)
    assert cfgs[first.name].algo.update.lr == 0.001 and cfgs[first.name].seed == 0
    assert cfgs[first.name].algo.tree.sampler == "independent"  # the grpo preset applied


def test_a_variant_can_have_its_own_seeds(tmp_path):
    spec = load_sweep(_write(tmp_path, {
        "name": "x", "base": SMOKE, "seeds": [0, 1],
        "variants": [{"name": "a", "seeds": [0, 1, 2, 3]}, {"name": "b"}]}))
    assert [(c.label, c.seed) for c in expand(spec)] == [
        ("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1)]


@pytest.mark.parametrize("body, message", [
    ({"variants": [{"name": "a", "seeds": [1, 1]}]}, "seeds repeat"),
    ({"grid": {"algo.score.beta": []}}, "have no values"),
    ({}, "the sweep has no cells"),
    ({"grid": {"seed": [1]}, "seedz": [1]}, "did you mean 'seeds'"),
    ({"grid": {"algo.score.beta": [1.0]}, "concurrency": 2}, "needs executor: deployment"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variant names must be unique"),
    ({"variants": [{"name": "a"}], "seeds": []}, "seeds"),
    ({"grid": {"seed": [1]}, "ray_address": "10.0.0.1:6379"}, "read with executor: ray only"),
    ({"grid": {"seed": [1]}, "executor": "dask"}, "executor"),
])
def test_bad_sweep_files_fail_with_the_fix(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(_write(tmp_path, {"name": "bad", "base": SMOKE, **body}))


def test_bad_cell_config_is_named_before_any_work(tmp_path):
    spec = load_sweep(_write(tmp_path, {"name": "bad", "base": SMOKE,
                                        "grid": {"algo.score.betta": [1.0]}}))
    with pytest.raises(ValueError, match=r"(?s)cell betta=1.0 \(seed 0\).*did you mean 'beta'"):
        check_cells(spec, expand(spec))
    with pytest.raises(FileNotFoundError, match="base config"):
        load_sweep(_write(tmp_path, {"name": "b", "base": "nope.yaml", "grid": {"seed": [1]}}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_unknown_cell_selection_lists_the_cells(tmp_path):
    from flows.sweep import select_cells

    spec = load_sweep(_write(tmp_path, {"name": "x", "base": SMOKE, "variants": [
        {"name": "a"}, {"name": "b"}], "seeds": [0, 1]}))
    cells = expand(spec)
    assert [c.name for c in select_cells(cells, ["b.s1"])] == ["x.b.s1"]
    assert len(select_cells(cells, ["a"])) == 2
    with pytest.raises(ValueError, match="a.s0, a.s1, b.s0, b.s1"):
        select_cells(cells, ["c"])


def _smoke_sweep(state: Path, name: str, grpo_seeds: list[int] | None = None) -> str:
    grpo = {"name": "grpo", "set": {"algo.method": "grpo"}}
    return _write(state, {
        "name": name, "base": SMOKE,
        "set": {"threads": 1, "benchmark.enabled": False, "eval.every": 1,
                "stage_cache_dir": str(state / "stages"), "tracking.sample_trees": 0},
        "variants": [{"name": "ibtpo", "set": {"algo.method": "ibtpo"}},
                     {**grpo, "seeds": grpo_seeds} if grpo_seeds else grpo],
        "seeds": [0, 1], "output_dir": str(state / "runs" / "${name}"),
        "report": {"baseline": "grpo"}}, f"{name}.yaml")


def test_sweep_runs_cells_reports_and_reruns_from_cache(harness, monkeypatch):
    from mlflow.tracking import MlflowClient

    import ibtpo_core.rl
    from flows.sweep import sweep

    path = _smoke_sweep(harness, "smoke")
    out = sweep(path)
    assert set(out["cells"].values()) == {"completed"} and len(out["cells"]) == 4
    report = json.loads((Path(out["report"]).parent / "report.json").read_text())
    assert set(report["methods"]) == {"ibtpo", "grpo"}
    ib = report["methods"]["ibtpo"]
    assert ib["n_seeds"] == 2 and 0 <= ib["acc_mean"] <= 1 and ib["decoded_tokens"] > 0
    assert "diff_vs_grpo" in ib and ib["unique_leaves_vs_grpo"] > 0
    assert "| ibtpo | 2 |" in Path(out["report"]).read_text()
    client = MlflowClient()
    sweep_run = client.get_run(out["sweep_run_id"])
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["ibtpo.kind"] == "sweep"
    cells = client.search_runs([sweep_run.info.experiment_id],
                               f"tags.`ibtpo.sweep_run_id` = '{out['sweep_run_id']}'")
    assert len(cells) == 4 and all(c.info.status == "FINISHED" for c in cells)
    assert {a.path for a in client.list_artifacts(out["sweep_run_id"], "report")} == {
        "report/report.md", "report/report.json", "report/report.png"}
    # the sweep's Prefect flow run carries the report (issue 13, item 4)
    from tests.test_pipeline import _flow_run_page

    _, arts = _flow_run_page(sweep_run.data.tags["prefect.flow_run_id"])
    assert "| ibtpo | 2 |" in arts["report-smoke"] and out["sweep_run_id"] in arts["report-smoke"]
    # the IB diagnostic on probe trees exists for GRPO too (method.md §2)
    grpo = next(c for c in cells if c.data.tags["ibtpo.sweep_cell"] == "grpo")
    assert "ib_probe/score_mean" in grpo.data.metrics

    # `ibtpo report` by the sweep's name writes the same table again, elsewhere
    from ibtpo.cli import main

    assert main(["report", "smoke", "--out", str(harness / "again")]) == 0
    assert (harness / "again" / "report.md").read_text() == Path(out["report"]).read_text()
    assert main(["report", "no-such-sweep"]) == 2

    def boom(*a, **k):
        raise AssertionError("a finished cell trained again")

    monkeypatch.setattr(ibtpo_core.rl, "grow_trees", boom)
    again = sweep(path)
    assert set(again["cells"].values()) == {"cached"}
    assert again["sweep_run_id"] == out["sweep_run_id"]

    # the file gains a seed: a new sweep run, one new cell, and a report that still holds the
    # four cells finished under the first sweep run (cache hits linked to that run)
    monkeypatch.undo()
    grown = sweep(_smoke_sweep(harness, "smoke", grpo_seeds=[0, 1, 2]))
    assert grown["sweep_run_id"] != out["sweep_run_id"]
    assert sorted(grown["cells"].values()) == ["cached"] * 4 + ["completed"]
    table = json.loads((Path(grown["report"]).parent / "report.json").read_text())["methods"]
    assert (table["ibtpo"]["n_seeds"], table["grpo"]["n_seeds"]) == (2, 3)
    assert table["ibtpo"]["acc_mean"] == report["methods"]["ibtpo"]["acc_mean"]
    assert list(table) == ["ibtpo", "grpo"]  # rows in the file's order


def test_an_edit_to_the_base_config_starts_a_new_sweep_run(tmp_path):
    """A sweep run's report holds the cells tagged with it: when the base YAML changes (a new
    warm-up, say), the cells trained from the old file must not land in the new report."""
    from configs.sweep import load_sweep
    from flows.sweep import sweep_key

    base = tmp_path / "base.yaml"
    base.write_text(Path(SMOKE).read_text())
    path = _write(tmp_path, {"name": "k", "base": str(base), "seeds": [0],
                             "variants": [{"name": "ibtpo"}]})
    first = sweep_key(load_sweep(path))
    assert sweep_key(load_sweep(path)) == first  # the same file, the same sweep run
    base.write_text(base.read_text().replace("steps: 20", "steps: 30"))
    assert sweep_key(load_sweep(path)) != first


def test_failed_cell_does_not_stop_the_others_and_reruns_alone(harness, monkeypatch):
    import flows.train
    from flows.sweep import sweep

    path = _smoke_sweep(harness, "faulty")
    real = flows.train.train_steps

    def fail_one(run):
        if run.cfg.name.endswith("grpo.s1"):
            raise RuntimeError("simulated crash in one cell")
        return real(run)

    monkeypatch.setattr(flows.train, "train_steps", fail_one)
    with pytest.raises(RuntimeError, match=r"1 of 4 cells failed: faulty.grpo.s1.*--cell grpo.s1"):
        sweep(path)
    monkeypatch.setattr(flows.train, "train_steps", real)
    report = json.loads((harness / "runs" / "faulty" / "report.json").read_text())
    assert report["methods"]["grpo"]["n_seeds"] == 1  # the others were reported
    out = sweep(path, ["grpo.s1"])
    assert out["cells"] == {"faulty.grpo.s1": "completed"}
    report = json.loads((harness / "runs" / "faulty" / "report.json").read_text())
    assert report["methods"]["grpo"]["n_seeds"] == 2


def test_deployment_executor_needs_a_registered_deployment(harness, tmp_path):
    from flows.sweep import sweep

    path = _write(tmp_path, {"name": "pool", "base": SMOKE, "variants": [{"name": "a"}],
                             "executor": "deployment", "deployment": "train/not-deployed",
                             "concurrency": 2, "output_dir": str(tmp_path / "out")})
    with pytest.raises(ValueError, match="deployment 'train/not-deployed' not found"):
        sweep(path)


def test_a_cell_asking_more_than_the_ray_cluster_has_is_named():
    from configs.schema import load_config
    from flows.sweep_ray import check_cluster_fits

    small = load_config(SMOKE, ["resources.num_cpus=2"])
    gpu = load_config(SMOKE, ["resources.num_gpus=0.5"])
    check_cluster_fits({"a": small}, {"CPU": 2.0})  # exactly fits
    with pytest.raises(ValueError, match=r"cell b asks for 0.5 GPU\(s\).*has 0 in all"):
        check_cluster_fits({"a": small, "b": gpu}, {"CPU": 4.0})
    with pytest.raises(ValueError, match=r"cell a asks for 2 CPU\(s\).*has 1 in all"):
        check_cluster_fits({"a": small}, {"CPU": 1.0, "GPU": 8.0})


def test_a_granted_cpu_count_sizes_torch_threads(monkeypatch):
    import torch

    from ibtpo_core.runtime import GRANTED_CPUS_ENV, set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(GRANTED_CPUS_ENV, "3")
        assert set_threads(0) == 3 and torch.get_num_threads() == 3
        assert set_threads(1) == 1  # an explicit threads: wins
    finally:
        torch.set_num_threads(before)


def test_a_ray_address_where_no_head_listens_fails_at_once():
    from flows.sweep_ray import check_ray_address
    from ibtpo_core.runtime import free_port

    port = free_port()
    with pytest.raises(ValueError, match=rf"no Ray head answers at ray_address '127.0.0.1:{port}'"
                                         rf".*ray start --head --port {port}"):
        check_ray_address(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(ValueError, match="is not host:port"):
        check_ray_address("my-head")
    check_ray_address(None)  # a local Ray for the sweep: nothing to check
