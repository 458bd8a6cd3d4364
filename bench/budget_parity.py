"""Equal budget, measured on the sampler alone: decoded tokens per prompt of each method from the
same policy, prompts and seeds.

Builds (or reuses from the stage cache, shared with ``ibtpo run``) the experiment's data and
warm-up checkpoint, then samples ``--batches`` batches of the config's prompts per iteration with
each method's sampler, from the warm-up policy (or ``--checkpoint``, e.g. a run's late
``itNNNN-policy-*`` folder), and reports per method: decoded tokens per prompt, their ratio to
GRPO's, decoded tokens per tree budget (1.00 = on budget), the share of trees more than 10% over
their budget, leaves and unique leaves per budget, the share of branches that repeat a
sibling's first step, the share expected from pi_old's probabilities at the picks, and the
budget-fill samples per tree. A method may carry overrides after ``+`` (``ibtpo+algo.tree.
max_branch_cover=0.5``). Token counts do not depend on the machine's load. Prints a table,
writes JSON.

    python bench/budget_parity.py [--config configs/experiments/deep_ibtpo.yaml]
        [--methods ibtpo,grpo,tree_entropy] [--batches 8] [--checkpoint DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_json  # noqa: E402


def warm_policy(cfg) -> tuple[dict, dict]:
    """The data and starting-checkpoint stage records, as the train flow builds them."""
    from tasks.create_model import create_model
    from tasks.prepare_data import prepare_data
    from tasks.warm_up import warm_up

    shared = cfg.stage_cache_dir
    data = prepare_data.fn(cfg.data, store=shared)
    start = create_model.fn(cfg.model, store=shared)
    if cfg.warmup.enabled:
        start = warm_up.fn(cfg.warmup, cfg.data.countdown, start, data, store=shared)
    return data, start


def measure(cfg, data: dict, start: dict, batches: int) -> dict:
    """Sample ``batches`` prompt batches (iterations 1..batches of seed cfg.seed) with cfg's
    sampler from the starting checkpoint; per-batch and overall token accounting."""
    from transformers import AutoTokenizer

    from ibtpo_core.data.tokenizer import step_end_token_ids
    from ibtpo_core.engines.held import held_engine
    from ibtpo_core.rl import JsonlRows, draw_prompts, grow_trees

    train = JsonlRows(Path(data["path"]) / "train.jsonl")
    tok = AutoTokenizer.from_pretrained(start["path"])
    engine = held_engine(cfg.engine.name, start["path"], **cfg.engine.kwargs())
    steps = step_end_token_ids(tok, cfg.algo.tree.steps.delimiter)
    per_batch, over = [], []
    for it in range(1, batches + 1):
        rows = draw_prompts(train, it, cfg.rl.rollout.prompts_per_iteration, cfg.seed)
        trees, m = grow_trees(engine, tok, rows, cfg.algo.tree, cfg.algo.score, steps,
                              cfg.rl.rollout.max_new_tokens, cfg.rl.rollout.temperature,
                              cfg.seed * 100_003 + it)
        n = len(trees)
        budget = m["tree/budget_tokens"]
        per_batch.append({
            "decoded_per_prompt": m["tree/decoded_tokens"] / n,
            "decoded_per_budget": m["tree/decoded_tokens"] / (n * budget),
            "leaves_per_budget": m["tree/leaves_per_budget"],
            "unique_leaves_per_budget": m["tree/unique_leaves_per_budget"],
            "identical_sibling_frac": m.get("tree/identical_sibling_frac", 0.0),
            "expected_identical_frac": m.get("tree/expected_identical_frac", 0.0),
            "fill_samples": m.get("tree/fill_samples", 0.0),
        })
        over += [t.meta.get("decoded_tokens", 0) > 1.1 * budget for t in trees]
    mean = {k: statistics.fmean(b[k] for b in per_batch) for k in per_batch[0]}
    mean["over_10pct_frac"] = sum(over) / max(1, len(over))
    return {"batches": per_batch, **mean}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/experiments/deep_ibtpo.yaml")
    ap.add_argument("--methods", default="ibtpo,grpo,tree_entropy")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], help="config override, as ibtpo run")
    ap.add_argument("--checkpoint", default=None,
                    help="sample from this policy checkpoint (a folder of config.json and "
                         "model.safetensors) instead of the warm-up")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the free cores)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from configs.schema import load_config
    from ibtpo_core.runtime import set_offline_defaults, set_threads

    set_offline_defaults()
    set_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    cfgs = {m: load_config(args.config, args.set + [f"algo.method={m.split('+')[0]}"]
                           + m.split("+")[1:]) for m in methods}
    if args.checkpoint:
        from tasks.prepare_data import prepare_data

        if not (Path(args.checkpoint) / "config.json").is_file():
            raise SystemExit(f"--checkpoint {args.checkpoint}: no config.json there; give a "
                             f"policy checkpoint folder (a run's iterations/itNNNN-policy-* or "
                             f"final/)")
        first = cfgs[methods[0]]
        data = prepare_data.fn(first.data, store=first.stage_cache_dir)
        start = {"path": str(Path(args.checkpoint).resolve())}
    else:
        data, start = warm_policy(cfgs[methods[0]])
    results = {m: measure(cfg, data, start, args.batches) for m, cfg in cfgs.items()}
    base = results.get("grpo", results[methods[0]])["decoded_per_prompt"]
    policy = args.checkpoint or f"warm-up policy of {args.config}"
    print(f"{args.batches} batches x {cfgs[methods[0]].rl.rollout.prompts_per_iteration} prompts, "
          f"{policy}")
    w = max(14, *(len(m) for m in methods))
    print(f"{'method':<{w}} {'decoded/prompt':>14} {'vs grpo':>8} {'decoded/budget':>14} "
          f"{'trees >10% over':>15} {'leaves/budget':>13} {'unique/budget':>13} "
          f"{'identical sib':>13} {'expected':>8} {'fill/tree':>9}")
    for m, r in results.items():
        r["vs_grpo"] = r["decoded_per_prompt"] / base
        print(f"{m:<{w}} {r['decoded_per_prompt']:>14.1f} {r['vs_grpo']:>8.3f} "
              f"{r['decoded_per_budget']:>14.3f} {r['over_10pct_frac']:>15.2f} "
              f"{r['leaves_per_budget']:>13.2f} {r['unique_leaves_per_budget']:>13.2f} "
              f"{r['identical_sibling_frac']:>13.2f} {r['expected_identical_frac']:>8.2f} "
              f"{r['fill_samples']:>9.2f}")
    write_json(args.json, {"config": args.config, "batches": args.batches,
                           "checkpoint": args.checkpoint, "methods": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
