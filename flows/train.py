"""The training flow: one run of any method of method.md §6 on any config.

``train_steps`` reads top to bottom: inputs (data, model, warm-up) -> evaluate (before) -> per
RL iteration (``rl_iteration``): sample trees -> estimate IB-Scores and advantages -> update the
policy (DeepSpeed) -> (benchmark every k) -> evaluate (after) -> benchmark with lm-eval -> result.
Each step gets the typed config section it needs.

Every stage is a task over files, keyed and cached by ``pipeline/stage.py``; a rerun of the same
command skips what is finished and resumes at the first iteration that is not, and MLflow
records are written once. Reads like a script: no math, no model code here.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from tqdm import tqdm

from configs.schema import ExperimentConfig, load_config
from ibtpo_core.artifacts import digest_json
from ibtpo_core.preflight import preflight
from ibtpo_core.runtime import set_accelerator_default, set_offline_defaults, set_threads
from pipeline import summaries, tracking
from pipeline.code_digest import code_version
from pipeline.stage import StageRecord, external_record, key_digest
from tasks.benchmark import benchmark
from tasks.create_model import create_model
from tasks.evaluate_policy import evaluate_policy
from tasks.prepare_data import prepare_data
from tasks.rl_iteration import estimate_scores, keep_recent, sample_trees, update_policy
from tasks.warm_up import warm_up


def labelled(task, label: str):
    """``task`` under the run name ``name[label]`` in the Prefect UI (``evaluate_policy[after]``),
    where one stage runs several times in a run."""
    return task.with_options(task_run_name=f"{task.name}[{label}]")


def run_key(cfg: ExperimentConfig) -> str:
    """What identifies a run: its whole config (the update's launch settings aside) and the
    library code (a rerun with both unchanged continues the same MLflow run; a finished one is a
    cache hit for a sweep)."""
    return digest_json([{**cfg.model_dump(), "algo": cfg.algo.stage_key()}, code_version()])


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


@dataclass
class Run:
    """Where one training run writes: its folder, its MLflow run, and the folder of its RL
    iterations (``rl_dir``, set once the checkpoint RL starts from is known)."""

    cfg: ExperimentConfig
    run_dir: str
    mlflow_id: str
    config_file: str
    t0: float = field(default_factory=time.time)
    rl_dir: str = ""


@dataclass
class RLProgress:
    """Running totals over the RL iterations done so far."""

    policy: StageRecord  # the latest checkpoint
    decoded: float = 0.0  # decoded tokens
    rl_wall: float = 0.0  # seconds spent in RL stages, as first computed (cache hits add theirs)
    freed: int = 0  # bytes of optimizer state deleted by rl.keep_optimizer_states
    checkpoints: list[str] = field(default_factory=list)  # this run's RL checkpoints, oldest first
    samples: list[str] = field(default_factory=list)  # its sampled trees' folders, oldest first


@flow(name="train", log_prints=True)
def train(
    config: str, overrides: list[str] | None = None, tags: dict[str, str] | None = None
) -> dict:
    """One training run of ``config`` with ``overrides`` (``key.sub=value``); ``tags`` go on its
    MLflow run (a sweep links its cells with ``ibtpo.sweep_run_id``)."""
    set_offline_defaults()
    set_accelerator_default()
    cfg: ExperimentConfig = load_config(config, overrides or [])
    preflight(cfg)
    tracking.use_lock_dir(cfg.stage_cache_dir)
    tracking.check_tracking_store()
    threads = set_threads(cfg.threads)
    run = start_run(cfg, config, threads, tags or {})
    try:
        return train_steps(run)
    except BaseException:
        tracking.finish(run.mlflow_id, "FAILED")  # a rerun of the same command resumes this run
        raise


def train_steps(run: Run) -> dict:
    cfg = run.cfg
    record_config(run)
    inputs = before_rl(cfg)
    log_before_rl(run, inputs)
    data, start, before = inputs.data, inputs.start, inputs.before
    run.rl_dir = str(link_iterations(run, rl_lineage_dir(cfg, start, data)))
    rl = RLProgress(policy=start)
    bar = tqdm(total=cfg.rl.iterations, desc="RL iterations", unit="it")
    for k in range(cfg.rl.iterations):
        if cfg.rl.decoded_tokens and rl.decoded >= cfg.rl.decoded_tokens:
            break  # the run's token budget is spent (rl.decoded_tokens)
        metrics = rl_iteration(run, k, rl, start, data)
        after_iteration(run, k + 1, rl, data)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", eff_rate=f"{metrics['eff_rate']:.2f}",
                        decoded=f"{rl.decoded:.0f}")
    bar.close()
    if cfg.algo.update.resident_ranks:  # the resident update ranks free their memory
        from ibtpo_core.training.server import stop_server

        stop_server()
    if rl.freed:  # one line, not one an iteration
        get_run_logger().info(f"deleted {rl.freed / 2**20:.0f} MiB of older optimizer states "
                              f"and weights (rl.keep_optimizer_states: "
                              f"{cfg.rl.keep_optimizer_states}, rl.keep_checkpoints: "
                              f"{cfg.rl.keep_checkpoints})")
    after = (held_out_accuracy(cfg, rl.policy, data, cfg.eval.n, "after") if cfg.rl.iterations
             else before)
    final_records(run, before, after, rl, data, start)
    return write_result(run, before, after, rl)


def start_run(cfg: ExperimentConfig, config: str, threads: int, tags: dict[str, str]) -> Run:
    """The run's folder and MLflow run, with the config as given and as resolved."""
    run_dir = str(cfg.resolved_output_dir())
    params = {**cfg.model_dump(), "seed": cfg.seed, "threads": threads}
    mlflow_id = tracking.parent_run(cfg.tracking.experiment, run_key(cfg), cfg.name, params=params,
                                    tags={"prefect.flow_run_id": str(flow_run.id),
                                          "ibtpo.method": cfg.algo.method, **tags})
    return Run(cfg=cfg, run_dir=run_dir, mlflow_id=mlflow_id,
               config_file=str(Path(config).resolve()))


ITERATIONS_LINK = "iterations"  # in a run's folder: its RL iterations' folder (rl_lineage_dir)


def rl_lineage_dir(cfg: ExperimentConfig, start: StageRecord, data: StageRecord) -> Path:
    """The folder of a run's RL iterations (trees, scores, checkpoints), in the stage cache.

    Keyed on what the iterations depend on (the method, the rollout, the engine, the seed, the
    checkpoint RL starts from, the data and the RL code) and not on the number of iterations or
    the run's name, so a longer run of the same config continues from a shorter one's stages
    (the table's 3x budget reuses the default budget's first iterations), and a run under
    another name or sweep reuses them all. Each stage is still keyed on its own inputs."""
    key = key_digest([cfg.algo, cfg.rl.rollout, cfg.engine, cfg.seed, start, data], "rl")
    return Path(cfg.stage_cache_dir) / f"rl-{key[:12]}"


def link_iterations(run: Run, rl_dir: Path) -> Path:
    """``<run>/iterations``: a link to the run's RL iterations folder (made, or moved there)."""
    rl_dir.mkdir(parents=True, exist_ok=True)
    link = Path(run.run_dir) / ITERATIONS_LINK
    link.parent.mkdir(parents=True, exist_ok=True)
    target = rl_dir.resolve()
    if link.is_symlink() and link.resolve() == target:
        return rl_dir
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} exists and is not a link: move it away (the run's RL "
                              f"iterations are kept in {rl_dir} and linked from there)")
    link.symlink_to(target, target_is_directory=True)
    return rl_dir


def record_config(run: Run) -> None:
    """The config file as given and the resolved config, as artifacts of the run."""
    resolved = Path(run.run_dir) / "config.json"
    resolved.parent.mkdir(parents=True, exist_ok=True)
    tmp = resolved.with_suffix(f".{os.getpid()}.tmp")  # whole for a second run of the config
    tmp.write_text(json.dumps(run.cfg.model_dump(), indent=1))
    tmp.replace(resolved)
    tracking.log_artifact_once(run.mlflow_id, str(resolved))
    tracking.log_artifact_once(run.mlflow_id, run.config_file)


@dataclass
class BeforeRL:
    """The stages before RL (``before_rl``)."""

    data: StageRecord  # the data splits
    start: StageRecord  # the checkpoint RL starts from, and the KL reference
    before: StageRecord  # its evaluation
    curve0: StageRecord | None  # the accuracy curve's first point, where the config asks for one


def before_rl(cfg: ExperimentConfig) -> BeforeRL:
    """Data, model, warm-up (when the config asks), the evaluation before RL and the curve's
    first point: stages every method and seed on the same task, model and warm-up share through
    the stage cache. No MLflow run here, so a sweep can compute them once before its cells."""
    shared = cfg.stage_cache_dir
    data = prepare_data(cfg.data, store=shared)
    if cfg.model.path is None:
        start = create_model(cfg.model, store=shared)
    else:
        start = external_record(cfg.model.path, store=shared)
    if cfg.warmup.enabled:
        start = warm_up(cfg.warmup, cfg.data.countdown, start, data, store=shared)
    before = held_out_accuracy(cfg, start, data, cfg.eval.n, "before")
    curve0 = None
    if cfg.eval.every and cfg.rl.iterations:  # the accuracy curve: every k iterations
        curve0 = held_out_accuracy(cfg, start, data, cfg.eval.every_n, "curve it 0")
    return BeforeRL(data, start, before, curve0)


def log_before_rl(run: Run, inputs: BeforeRL) -> None:
    """The data splits as the run's dataset inputs, the warm-up's metrics, the curve's first
    point."""
    data_run = tracking.child_run(run.mlflow_id, "prepare_data")
    for split, ctx in (("train", "training"), ("test", "evaluation")):
        tracking.log_dataset(data_run, str(Path(inputs.data["path"]) / f"{split}.jsonl"), split,
                             inputs.data["digest"], ctx)
    tracking.log_metrics_once(data_run, 0, inputs.data["metrics"])
    if run.cfg.warmup.enabled:
        tracking.log_metrics_once(
            tracking.child_run(run.mlflow_id, "warm_up"), 0, inputs.start["metrics"]
        )
    if inputs.curve0 is not None:
        log_curve_point(run.mlflow_id, 0, inputs.curve0, 0.0, 0.0)


def held_out_accuracy(cfg: ExperimentConfig, checkpoint: StageRecord, data: StageRecord,
                      n: int | None, label: str) -> StageRecord:
    """Held-out accuracy of ``checkpoint`` on ``n`` problems of the evaluation split."""
    return labelled(evaluate_policy, label)(cfg.eval.on(n), cfg.engine, checkpoint, data,
                                            store=cfg.stage_cache_dir)


def rl_iteration(run: Run, k: int, rl: RLProgress, reference: StageRecord,
                 data: StageRecord) -> dict:
    """Iteration ``k``: sample trees with the current policy, score them, update the policy;
    logs the iteration's metrics and returns them."""
    cfg = run.cfg
    # DAPO's refills stop where the run's token budget does (rl.decoded_tokens)
    cap = (cfg.rl.decoded_tokens - rl.decoded
           if cfg.rl.decoded_tokens and cfg.algo.filter_groups.enabled else None)
    trees = sample_trees(k, cfg.algo, cfg.rl.rollout, cfg.engine, cfg.seed, rl.policy, data,
                         cap, store=run.rl_dir)
    scores = estimate_scores(k, cfg.algo, trees, store=run.rl_dir)
    durable = saves_weights(cfg, k + 1, rl.decoded + trees["metrics"]["tree/decoded_tokens"])
    new = update_policy(k, cfg.algo, rl.policy, scores, reference,
                        durable and (k + 1) % cfg.rl.save_optimizer_every == 0, durable,
                        store=run.rl_dir)
    metrics = {**trees["metrics"], **scores["metrics"], **new["metrics"]}
    rl.decoded += metrics["tree/decoded_tokens"]
    rl.rl_wall += stage_seconds(metrics)
    metrics["decoded_tokens_total"], metrics["rl_wall_s_total"] = rl.decoded, rl.rl_wall
    tracking.log_metrics_once(run.mlflow_id, k, metrics)
    rl.policy = new
    rl.checkpoints.append(new["path"])
    rl.samples.append(trees["path"])
    rl.freed += keep_recent(rl.checkpoints, cfg.rl.keep_optimizer_states, cfg.rl.keep_checkpoints,
                            cfg.rl.keep_checkpoint_every)
    return metrics


def saves_weights(cfg: ExperimentConfig, done: int, decoded: float) -> bool:
    """Whether the checkpoint after ``done`` iterations (``decoded`` tokens in all) is written
    with its weights: every ``rl.save_every``-th, the last (``rl.iterations`` or the token
    budget) and those an evaluation or a benchmark reads; the others stay in memory (the
    optimizer state is written with the ``rl.save_optimizer_every``-th, a multiple)."""
    rl = cfg.rl
    return (done % rl.save_every == 0 or done == rl.iterations
            or bool(rl.decoded_tokens and decoded >= rl.decoded_tokens)
            or bool(cfg.eval.every and done % cfg.eval.every == 0)
            or bool(cfg.benchmark.enabled and cfg.benchmark.every
                    and done % cfg.benchmark.every == 0))


def stage_seconds(metrics: dict) -> float:
    """Seconds an iteration's stages took (``timing_s/*``), the diagnostic probe excepted."""
    return sum(v for key, v in metrics.items()
               if key.startswith("timing_s/") and key != "timing_s/probe")


def after_iteration(run: Run, done: int, rl: RLProgress, data: StageRecord) -> None:
    """The accuracy curve and the periodic benchmark, where ``done`` iterations call for them."""
    cfg = run.cfg
    if cfg.eval.every and done % cfg.eval.every == 0:
        point = held_out_accuracy(cfg, rl.policy, data, cfg.eval.every_n, f"curve it {done}")
        log_curve_point(run.mlflow_id, done, point, rl.decoded, rl.rl_wall)
    if cfg.benchmark.enabled and cfg.benchmark.every and done % cfg.benchmark.every == 0:
        b = labelled(benchmark, f"it {done}")(cfg.benchmark, rl.policy, data,
                                              store=cfg.stage_cache_dir)
        tracking.log_metrics_once(
            tracking.child_run(run.mlflow_id, "benchmark"), done, b["metrics"]
        )


def final_records(run: Run, before: StageRecord, after: StageRecord, rl: RLProgress,
                  data: StageRecord, reference: StageRecord) -> None:
    """Evaluations before/after, the final lm-eval benchmark, lineage, sample trees, plots."""
    cfg, parent, policy = run.cfg, run.mlflow_id, rl.policy
    eval_run = tracking.child_run(parent, "evaluate")
    tracking.log_metrics_once(eval_run, 0, before["metrics"])
    tracking.log_metrics_once(eval_run, len(rl.checkpoints), after["metrics"])
    if cfg.benchmark.enabled:
        b = labelled(benchmark, "final")(cfg.benchmark, policy, data, store=cfg.stage_cache_dir)
        bench_run = tracking.child_run(parent, "benchmark")
        tracking.log_metrics_once(bench_run, len(rl.checkpoints), b["metrics"])
        tracking.log_artifact_once(bench_run, str(Path(b["path"]) / "lm_eval_results.json"))
    tracking.log_lineage(parent, run.run_dir, rl.checkpoints, policy, data, reference)
    last_trees = rl.samples[-1] if rl.samples else None
    tracking.log_sample_trees(parent, run.run_dir, last_trees, cfg.tracking.sample_trees,
                              policy["path"])
    tracking.log_plots(parent, run.run_dir)
    tracking.finish(parent)


def write_result(run: Run, before: StageRecord, after: StageRecord, rl: RLProgress) -> dict:
    """result.json (what a sweep reads back) and the result artifact on the flow run's page."""
    cfg = run.cfg
    m_b, m_a = before["metrics"], after["metrics"]
    k8 = f"pass_at_{cfg.eval.spec.num_samples}"
    result = {"accuracy_before": m_b["accuracy"], "accuracy_after": m_a["accuracy"],
              "accuracy_se_before": m_b["accuracy_se"], "accuracy_se_after": m_a["accuracy_se"],
              f"{k8}_before": m_b[k8], f"{k8}_after": m_a[k8], "n_eval": int(m_a["n_eval"]),
              "eval_split": cfg.eval.split, "decoded_tokens": rl.decoded,
              "rl_wall_s": round(rl.rl_wall, 1), "wall_s": round(time.time() - run.t0, 1),
              "mlflow_run_id": run.mlflow_id, "checkpoint": rl.policy["path"],
              "iterations_dir": run.rl_dir,
              "run_key": run_key(cfg)}
    out = Path(run.run_dir) / "result.json"
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # two runs of one config may finish together
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    summaries.publish_run_result(cfg.name, cfg.algo.method, result)
    return result
