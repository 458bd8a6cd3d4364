"""The three stages of one RL iteration, each over files:

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
from prefect.cache_policies import NO_CACHE

from pipeline.stage import Output, StageRecord, stage

if TYPE_CHECKING:
    from configs.schema import AlgoConfig, EngineConfig, RolloutConfig


@task(task_run_name="sample_trees[it {iteration}]", cache_policy=NO_CACHE)
@stage("it{iteration:04d}-sample", code="rl")
def sample_trees(out: Path, iteration: int, algo: AlgoConfig, rollout: RolloutConfig,
                 engine: EngineConfig, seed: int, policy: StageRecord, data: StageRecord,
                 token_cap: float | None = None) -> dict:
    from transformers import AutoTokenizer

    from ibtpo_core.data.splits import read_jsonl
    from ibtpo_core.data.tokenizer import step_end_token_ids
    from ibtpo_core.engines.held import held_engine
    from ibtpo_core.rl import (
        JsonlRows,
        draw_prompts,
        grow_informative,
        grow_trees,
        probe_diagnostic,
        save_trees,
    )
    from ibtpo_core.training.replay import weights_home
    from ibtpo_core.training.retention import require_weights

    t0 = time.time()
    train = JsonlRows(Path(data["path"]) / "train.jsonl")
    require_weights(policy["path"])
    tok = AutoTokenizer.from_pretrained(policy["path"])
    # the resident trainer's weights in memory, where it wrote this checkpoint (no file read)
    rollout_engine = held_engine(engine.name, policy["path"], policy_weights(policy["path"], algo),
                                 base_path=weights_home(policy["path"]), **engine.kwargs())
    steps = step_end_token_ids(tok, algo.tree.steps.delimiter)

    def grow(rows: list[dict], draw: int):
        return grow_trees(rollout_engine, tok, rows, algo.tree, algo.score, steps,
                          rollout.max_new_tokens, rollout.temperature,
                          seed * 100_003 + iteration + 7_919 * draw, reward=algo.reward)

    if algo.filter_groups.enabled:  # DAPO's dynamic sampling: refills for uniform groups
        trees, rows, metrics = grow_informative(grow, train, iteration,
                                                rollout.prompts_per_iteration, seed,
                                                algo.filter_groups, token_cap)
    else:
        rows = draw_prompts(train, iteration, rollout.prompts_per_iteration, seed)
        trees, metrics = grow(rows, 0)
    metrics["timing_s/sample_trees"] = time.time() - t0
    if rollout.probe_every and rollout.probe_prompts and iteration % rollout.probe_every == 0:
        t1 = time.time()
        probe = read_jsonl(Path(data["path"]) / "validation.jsonl")[: rollout.probe_prompts]
        if probe:  # the same prompts and seed for every method and run
            metrics.update(probe_diagnostic(rollout_engine, tok, probe, algo.tree.G, steps,
                                            rollout.max_new_tokens, rollout.temperature,
                                            seed=7919 + iteration, run_tree=algo.tree,
                                            run_score=algo.score))
        metrics["timing_s/probe"] = time.time() - t1
    save_trees(trees, out / "trees.json")
    (out / "prompts.json").write_text(json.dumps(rows))
    return metrics


def policy_weights(path: str, algo: AlgoConfig) -> dict | None:
    """The weights of checkpoint ``path`` in memory where the resident trainer holds them; for
    one saved without its weights (``rl.save_every``) and not held (a resumed run), rebuilt by
    a replay from its last durable checkpoint. None: read them from the files."""
    from ibtpo_core.rl import load_sequences
    from ibtpo_core.training.replay import ref_path, weights_not_saved
    from ibtpo_core.training.resident import weights_for

    if not weights_not_saved(path):
        return weights_for(path)
    from ibtpo_core.training.deepspeed_trainer import held_weights

    return held_weights(path, algo.update, algo.loss, ref_path(path), load_sequences)


@task(task_run_name="estimate_scores[it {iteration}]", cache_policy=NO_CACHE)
@stage("it{iteration:04d}-scores", code="rl")
def estimate_scores(out: Path, iteration: int, algo: AlgoConfig, trees: StageRecord) -> dict:
    from ibtpo_core.rl import load_trees, save_sequences, score_trees

    t0 = time.time()
    seqs, metrics = score_trees(load_trees(Path(trees["path"]) / "trees.json"), algo.score,
                                algo.advantage)
    save_sequences(seqs, out / "sequences.json")
    metrics["timing_s/estimate_scores"] = time.time() - t0
    return metrics


@task(task_run_name="update_policy[it {iteration}]", cache_policy=NO_CACHE)
@stage("it{iteration:04d}-policy", code="rl")
def update_policy(out: Path, iteration: int, algo: AlgoConfig, policy: StageRecord,
                  scores: StageRecord, ref: StageRecord, save_optimizer: bool = True,
                  save_weights: bool = True) -> Output:
    from ibtpo_core.engines.held import sleep_held
    from ibtpo_core.rl import load_sequences
    from ibtpo_core.training.deepspeed_trainer import train_on_sequences
    from ibtpo_core.training.launch import launch_update
    from ibtpo_core.training.replay import NOT_SAVED

    t0 = time.time()
    sleep_held()  # a vLLM engine with sleep_during_update frees the GPU for the update
    seqs_path = Path(scores["path"]) / "sequences.json"
    if algo.update.world_size > 1 and algo.update.resident_ranks:  # one node (UpdateSpec)
        from ibtpo_core.training.server import served_update

        metrics = served_update(policy["path"], str(out), str(seqs_path), algo.loss, algo.update,
                                ref_dir=ref["path"])
    elif algo.update.world_size > 1:
        metrics = launch_update(policy["path"], str(out), str(seqs_path), algo.loss, algo.update,
                                ref_dir=ref["path"])
        (out / "update_metrics.json").unlink()
    else:  # without the optimizer state, the next update replays from the last one saved
        metrics = train_on_sequences(policy["path"], str(out), load_sequences(seqs_path),
                                     algo.loss, algo.update, ref_dir=ref["path"],
                                     save_optimizer=save_optimizer and save_weights,
                                     load_sequences=load_sequences, save_weights=save_weights)
    metrics["timing_s/update_policy"] = time.time() - t0
    lineage = {"parent_checkpoint": policy["digest"], "data_digest": scores["digest"],
               "parent_path": policy["path"], "sequences": str(seqs_path)}
    if not save_optimizer or not save_weights:
        lineage["optimizer_state"] = NOT_SAVED
    if not save_weights:  # held in memory; a resumed run replays to them (replay.py)
        lineage.update(weights=NOT_SAVED, ref_path=ref["path"])
    return Output(metrics, lineage)


def keep_recent(checkpoints: list[str], keep_optimizer_states: int, keep_checkpoints: int,
                keep_every: int) -> int:
    """Delete what ``rl.keep_*`` lets go of older RL checkpoints (optimizer states, weights);
    returns the bytes freed. Their folders stay valid stage outputs (``artifacts.prune``)."""
    from ibtpo_core.training.retention import prune_checkpoints, prune_optimizer_states

    return (prune_optimizer_states(checkpoints, keep_optimizer_states)
            + prune_checkpoints(checkpoints, keep_checkpoints, keep_every))
