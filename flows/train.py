"""The training flow: one run of any method of method.md §6 on any config.

prepare data -> (create model) -> warm up -> evaluate (before) -> per RL iteration:
sample trees -> estimate IB-Scores and advantages -> update the policy (DeepSpeed) ->
(benchmark every k) -> evaluate (after) -> benchmark with lm-eval.

Every stage is a cached task over files; a rerun of the same command skips what is finished
and resumes at the first iteration that is not, and MLflow records are written once. Reads like
a script: no math, no model code here.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger
from tqdm import tqdm
from prefect.runtime import flow_run

from configs.schema import ExperimentConfig, load_config
from ibtpo_core import stages
from ibtpo_core.artifacts import digest_files, digest_json, folder_digest
from ibtpo_core.preflight import preflight
from ibtpo_core.runtime import set_accelerator_default, set_offline_defaults, set_threads
from ibtpo_core.training.deepspeed_trainer import prune_optimizer_states
from pipeline import summaries, tracking
from tasks.benchmark import benchmark
from pipeline.stage_cache import code_version, inject_fault
from tasks.evaluate_policy import evaluate_policy
from tasks.prepare_data import prepare_data
from tasks.rl_iteration import estimate_scores, sample_trees, update_policy
from tasks.warm_up import create_model, warm_up


def ensure(task, *args, iteration: int = -1, label: str | None = None):
    """Run (or fetch from cache) a stage; if its cached output was altered or deleted on disk,
    recompute it instead of trusting it. ``label`` names the task run in the Prefect UI
    (``evaluate_policy[after]``) where one stage runs several times."""
    if label is not None:
        task = task.with_options(task_run_name=f"{task.name}[{label}]")
    rec = task(*args)
    if stages.cached(Path(rec["path"])) is None:
        get_run_logger().warning(f"{task.name}: cached output {rec['path']} is missing or corrupted; recomputing")
        rec = task.with_options(refresh_cache=True)(*args)
    inject_fault(f"after_{task.name}", iteration)
    return rec


def run_key(cfg: ExperimentConfig) -> str:
    """What identifies a run: its whole config and the library code (a rerun with both unchanged
    continues the same MLflow run; a finished one is a cache hit for a sweep)."""
    return digest_json([cfg.model_dump(), code_version()])


def finished_result(cfg: ExperimentConfig) -> dict | None:
    """The result of a finished run of exactly this config and code, if its folder holds one."""
    path = cfg.resolved_output_dir() / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("run_key") == run_key(cfg) else None


def log_curve_point(run_id: str, step: int, result: dict, decoded: float, rl_wall: float) -> None:
    m = result["metrics"]
    tracking.log_metrics_once(tracking.child_run(run_id, "curve"), step, {
        "curve/accuracy": m["accuracy"], "curve/accuracy_se": m["accuracy_se"],
        "curve/n_eval": m["n_eval"], "curve/decoded_tokens": decoded, "curve/rl_wall_s": rl_wall})


def external_model(path: str) -> dict:
    """A checkpoint the run did not make (checked by preflight; a hub id resolves to its local
    snapshot): its path and content digest."""
    from ibtpo_core.models.hub import resolve_model_path

    path = resolve_model_path(path)
    return {"path": path, "digest": folder_digest(digest_files(Path(path))), "metrics": {}}


@flow(name="train", log_prints=True)
def train(config: str, overrides: list[str] | None = None, tags: dict[str, str] | None = None) -> dict:
    """One training run of ``config`` with ``overrides`` (``key.sub=value``); ``tags`` go on its
    MLflow run (a sweep links its cells with ``ibtpo.sweep_run_id``)."""
    set_offline_defaults()
    set_accelerator_default()
    cfg: ExperimentConfig = load_config(config, overrides or [])
    preflight(cfg)
    tracking.check_tracking_store()
    threads = set_threads(cfg.threads)
    t0 = time.time()
    run_dir = str(cfg.resolved_output_dir())
    code = code_version("rl")
    c = cfg.model_dump()
    parent = tracking.parent_run(cfg.tracking.experiment, run_key(cfg), cfg.name,
                                 params={**c, "seed": cfg.seed, "threads": threads},
                                 tags={"prefect.flow_run_id": str(flow_run.id), "ibtpo.method": cfg.algo.method,
                                       **(tags or {})})
    try:
        return _train(cfg, config, run_dir, code, parent, c, t0)
    except BaseException:
        tracking.finish(parent, "FAILED")  # a rerun of the same command resumes this run
        raise


def _train(cfg: ExperimentConfig, config: str, run_dir: str, code: str, parent: str, c: dict,
           t0: float) -> dict:  # noqa: C901 - reads top to bottom like the pipeline it runs
    cfg_copy = Path(run_dir) / "config.json"
    cfg_copy.parent.mkdir(parents=True, exist_ok=True)
    cfg_copy.write_text(json.dumps(c, indent=1))
    tracking.log_artifact_once(parent, str(cfg_copy))
    tracking.log_artifact_once(parent, str(Path(config).resolve()))

    shared = cfg.stage_cache_dir  # stages keyed by their inputs alone, reused across runs
    data = ensure(prepare_data, c["data"], shared, code_version("prepare_data"))
    data_run = tracking.child_run(parent, "prepare_data")
    for split, ctx in (("train", "training"), ("test", "evaluation")):
        tracking.log_dataset(data_run, str(Path(data["path"]) / f"{split}.jsonl"), split,
                             data["digest"], ctx)
    tracking.log_metrics_once(data_run, 0, data["metrics"])

    if cfg.model.path is None:
        policy = ensure(create_model, c["model"], shared, code_version("create_model"))
    else:
        policy = external_model(cfg.model.path)
    if cfg.warmup.enabled:
        policy = ensure(warm_up, c["warmup"], c["data"]["countdown"], policy, data, shared,
                        code_version("warm_up"))
        tracking.log_metrics_once(tracking.child_run(parent, "warm_up"), 0, policy["metrics"])
    reference = policy

    def evaluate(checkpoint: dict, n: int | None, label: str) -> dict:
        return ensure(evaluate_policy, cfg.eval.section(n), c["engine"], checkpoint, data, shared,
                      code_version("evaluate_policy"), label=label)

    before = evaluate(policy, cfg.eval.n, "before")
    curve = cfg.eval.every and cfg.rl.iterations
    if curve:  # the accuracy curve: a subset of the test split every k iterations
        log_curve_point(parent, 0, evaluate(policy, cfg.eval.every_n, "curve it 0"), 0.0, 0.0)
    decoded = rl_wall = 0.0
    freed = 0  # bytes of optimizer state deleted by rl.keep_optimizer_states
    updated: list[str] = []  # this run's RL checkpoints, oldest first
    bar = tqdm(total=cfg.rl.iterations, desc="RL iterations", unit="it")
    for k in range(cfg.rl.iterations):
        trees = ensure(sample_trees, k, c["algo"], c["rl"]["rollout"], c["engine"], cfg.seed,
                       policy, data, run_dir, code, iteration=k)
        scores = ensure(estimate_scores, k, c["algo"], trees, run_dir, code, iteration=k)
        new = ensure(update_policy, k, c["algo"], policy, scores, reference, run_dir, code,
                     iteration=k)
        decoded += trees["metrics"]["tree/decoded_tokens"]
        metrics = {**trees["metrics"], **scores["metrics"], **new["metrics"],
                   "decoded_tokens_total": decoded}
        rl_wall += sum(v for key, v in metrics.items()
                       if key.startswith("timing_s/") and key != "timing_s/probe")
        metrics["rl_wall_s_total"] = rl_wall  # time spent on RL itself, as first computed
        metrics["kl"] = metrics.get("kl", metrics.get("loss/approx_kl", 0.0))
        tracking.log_metrics_once(parent, k, metrics)
        policy = new
        updated.append(new["path"])
        freed += prune_optimizer_states(updated, cfg.rl.keep_optimizer_states)
        if curve and (k + 1) % cfg.eval.every == 0:
            log_curve_point(parent, k + 1, evaluate(policy, cfg.eval.every_n, f"curve it {k + 1}"),
                            decoded, rl_wall)
        if cfg.benchmark.enabled and cfg.benchmark.every and (k + 1) % cfg.benchmark.every == 0:
            b = ensure(benchmark, c["benchmark"], policy, data, shared, code_version("benchmark"),
                       label=f"it {k + 1}")
            tracking.log_metrics_once(tracking.child_run(parent, "benchmark"), k + 1, b["metrics"])
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", eff_rate=f"{metrics['eff_rate']:.2f}",
                        decoded=f"{decoded:.0f}")
    bar.close()
    if freed:  # one line, not one an iteration
        get_run_logger().info(f"deleted {freed / 2**20:.0f} MiB of older optimizer states "
                              f"(rl.keep_optimizer_states: {cfg.rl.keep_optimizer_states})")
    after = evaluate(policy, cfg.eval.n, "after") if cfg.rl.iterations else before
    eval_run = tracking.child_run(parent, "evaluate")
    tracking.log_metrics_once(eval_run, 0, before["metrics"])
    tracking.log_metrics_once(eval_run, cfg.rl.iterations, after["metrics"])
    if cfg.benchmark.enabled:
        b = ensure(benchmark, c["benchmark"], policy, data, shared, code_version("benchmark"),
                   label="final")
        bench_run = tracking.child_run(parent, "benchmark")
        tracking.log_metrics_once(bench_run, cfg.rl.iterations, b["metrics"])
        tracking.log_artifact_once(bench_run, str(Path(b["path"]) / "lm_eval_results.json"))
    tracking.log_lineage(parent, run_dir, policy, data, reference)
    tracking.log_sample_trees(parent, run_dir, cfg.tracking.sample_trees, policy["path"])
    tracking.log_plots(parent, run_dir)
    tracking.finish(parent)
    m_b, m_a = before["metrics"], after["metrics"]
    k8 = f"pass_at_{cfg.eval.spec.num_samples}"
    result = {"accuracy_before": m_b["accuracy"], "accuracy_after": m_a["accuracy"],
            "accuracy_se_before": m_b["accuracy_se"], "accuracy_se_after": m_a["accuracy_se"],
            f"{k8}_before": m_b[k8], f"{k8}_after": m_a[k8], "n_eval": int(m_a["n_eval"]),
            "eval_split": cfg.eval.split,
            "decoded_tokens": decoded, "rl_wall_s": round(rl_wall, 1), "wall_s": round(time.time() - t0, 1),
            "mlflow_run_id": parent, "checkpoint": policy["path"], "run_key": run_key(cfg)}
    out = Path(run_dir) / "result.json"
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
    out.with_suffix(".tmp").replace(out)
    summaries.publish_run_result(cfg.name, cfg.algo.method, result)
    return result
