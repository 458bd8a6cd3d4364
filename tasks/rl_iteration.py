"""The three stages of one RL iteration, each a cached task over files:

sample_trees      checkpoint k + prompts of iteration k -> trees.json (tree file format)
estimate_scores   trees.json -> sequences.json (per-token advantages) + reward / IB metrics
update_policy     checkpoint k + sequences.json -> checkpoint k + 1 (DeepSpeed step)

The rollout engine stays alive across iterations in this process and reloads weights when the
checkpoint changes, as a vLLM engine must.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from ibtpo_core import stages
from ibtpo_core.stages import StageRecord
from pipeline.stage_cache import CACHE, inject_fault, stage_dir

if TYPE_CHECKING:
    from configs.schema import AlgoConfig, EngineConfig, RolloutConfig


def get_engine(engine: EngineConfig, model_path: str):
    """The process's engine (kept alive; weights reloaded when the checkpoint changes)."""
    from ibtpo_core.engines.held import held_engine

    return held_engine(engine.name, model_path, **engine.kwargs())


@task(name="sample_trees", task_run_name="sample_trees[it {iteration}]",
      cache_policy=CACHE, persist_result=True)
def sample_trees(iteration: int, algo: AlgoConfig, rollout: RolloutConfig, engine: EngineConfig,
                 seed: int, policy: StageRecord, data: StageRecord, run_dir: str,
                 code: str) -> StageRecord:
    from transformers import AutoTokenizer

    from ibtpo_core.data.tokenizer import step_end_token_ids
    from ibtpo_core.rl import JsonlRows, draw_prompts, probe_diagnostic, save_trees
    from ibtpo_core.rl import sample_trees as sample
    from ibtpo_core.training.retention import require_weights

    folder = stage_dir(run_dir, f"it{iteration:04d}-sample", algo.stage_key(), rollout, engine,
                       seed, policy["digest"], data["digest"], code)
    with stages.claim(folder) as hit:  # one worker computes; others wait, then reuse
        if hit:
            return hit
        t0 = time.time()
        train = JsonlRows(Path(data["path"]) / "train.jsonl")
        rows = draw_prompts(train, iteration, rollout.prompts_per_iteration, seed)
        require_weights(policy["path"])
        tok = AutoTokenizer.from_pretrained(policy["path"])
        rollout_engine = get_engine(engine, policy["path"])
        steps = step_end_token_ids(tok, algo.tree.steps.delimiter)
        trees, metrics = sample(rollout_engine, tok, rows, algo.tree, steps, rollout.max_new_tokens,
                                rollout.temperature, seed * 100_003 + iteration)
        metrics["timing_s/sample_trees"] = time.time() - t0
        if rollout.probe_every and rollout.probe_prompts and iteration % rollout.probe_every == 0:
            t1 = time.time()
            probe = stages.read_jsonl(Path(data["path"]) / "validation.jsonl")[
                : rollout.probe_prompts
            ]
            if probe:  # the same prompts and seed for every method and run
                metrics.update(probe_diagnostic(rollout_engine, tok, probe, algo.tree.G, steps,
                                                rollout.max_new_tokens, rollout.temperature,
                                                seed=7919 + iteration, run_tree=algo.tree))
            metrics["timing_s/probe"] = time.time() - t1
        inject_fault("sample_trees", iteration)

        def write(tmp: Path) -> None:
            save_trees(trees, tmp / "trees.json")
            (tmp / "prompts.json").write_text(json.dumps(rows))

        return stages.publish(folder, write, metrics)


@task(name="estimate_scores", task_run_name="estimate_scores[it {iteration}]",
      cache_policy=CACHE, persist_result=True)
def estimate_scores(iteration: int, algo: AlgoConfig, trees: StageRecord, run_dir: str,
                    code: str) -> StageRecord:
    from ibtpo_core.rl import load_trees, save_sequences, score_trees

    folder = stage_dir(run_dir, f"it{iteration:04d}-scores", algo.stage_key(), trees["digest"],
                       code)
    with stages.claim(folder) as hit:  # one worker computes; others wait, then reuse
        if hit:
            return hit
        t0 = time.time()
        seqs, metrics = score_trees(load_trees(Path(trees["path"]) / "trees.json"), algo.tree,
                                    algo.advantage)
        metrics["timing_s/estimate_scores"] = time.time() - t0
        inject_fault("estimate_scores", iteration)
        return stages.publish(
            folder, lambda tmp: save_sequences(seqs, tmp / "sequences.json"), metrics
        )


@task(name="update_policy", task_run_name="update_policy[it {iteration}]",
      cache_policy=CACHE, persist_result=True)
def update_policy(iteration: int, algo: AlgoConfig, policy: StageRecord, scores: StageRecord,
                  ref: StageRecord, run_dir: str, code: str) -> StageRecord:
    from ibtpo_core.rl import load_sequences
    from ibtpo_core.training.deepspeed_trainer import update_policy as update
    from ibtpo_core.training.launch import launch_update

    folder = stage_dir(run_dir, f"it{iteration:04d}-policy", algo.stage_key(), policy["digest"],
                       scores["digest"], ref["digest"], code)
    with stages.claim(folder) as hit:  # one worker computes; others wait, then reuse
        if hit:
            return hit
        t0 = time.time()
        seqs_path = Path(scores["path"]) / "sequences.json"
        metrics: dict = {}

        def write(tmp: Path) -> None:
            if algo.update.world_size > 1:
                metrics.update(launch_update(policy["path"], str(tmp), str(seqs_path), algo.loss,
                                             algo.update, ref_dir=ref["path"]))
                (tmp / "update_metrics.json").unlink()
            else:
                metrics.update(
                    update(
                        policy["path"],
                        str(tmp),
                        load_sequences(seqs_path),
                        algo.loss,
                        algo.update,
                        ref_dir=ref["path"],
                    )
                )
            metrics["timing_s/update_policy"] = time.time() - t0
            inject_fault("update_policy", iteration)

        return stages.publish(folder, write, metrics, parent_checkpoint=policy["digest"],
                              data_digest=scores["digest"])
