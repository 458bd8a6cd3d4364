"""Where an RL iteration's time and disk go, before and after the resident trainer (issue 29).

Runs ``--iterations`` RL iterations of a config twice, each in its own stage cache (the second
links the first's data, model, warm-up and evaluation stages, so only RL is computed again):

    before   algo.update.resident: false, rl.save_optimizer_every: 1 (an engine built from disk
             every iteration, the optimizer state written every iteration)
    after    algo.update.resident: true, rl.save_optimizer_every: --save-every, rl.save_every:
             --weights-every (the weights written every k-th iteration and the last)

and reports medians over the iterations of: the iteration's stage time, sampling, scoring, the
update's optimizer steps (``update/compute_s``), everything else of the update (build, loads,
save, hashing) and of the iteration, bytes written to the iteration's stage folders, and the
process's peak RSS. Bytes hashed equal bytes written by construction (each output is hashed
once, when published; a cache hit hashes nothing: tests/test_manifest.py). Prints a table, ends
with one JSON line, writes JSON with --json. TRL's side by side run (issue 29) is not in it.

    python bench/iteration.py [--config configs/experiments/deep_ibtpo.yaml] [--iterations 6]
        [--save-every 5] [--weights-every 5] [--threads 2] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"before": ["algo.update.resident=false", "rl.save_optimizer_every=1"],
            "after": ["algo.update.resident=true"]}


def run(config: str, work: Path, sets: list[str], threads: int) -> tuple[dict, float, float]:
    """``ibtpo run`` in ``work``; its result, wall seconds and peak RSS (GB, polled)."""
    import psutil

    cmd = [sys.executable, "-m", "ibtpo", "run", config, "--set", f"threads={threads}",
           "--set", f"output_dir={work / 'runs'}", "--set", f"stage_cache_dir={work / 'stages'}",
           "--set", "benchmark.enabled=false", "--set", "eval.n=50", "--set", "eval.every=0",
           "--set", "rl.rollout.probe_every=0", "--set", "tracking.sample_trees=0"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    t0, peak = time.time(), 0
    with (work / "out.txt").open("w") as out, (work / "err.txt").open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(True)]))
            except psutil.Error:
                pass
            time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"the run failed: see {work / 'err.txt'}")
    result = json.loads((work / "out.txt").read_text().strip().splitlines()[-1])
    return result, time.time() - t0, peak / 2**30


def iteration_stats(rl_dir: Path) -> list[dict]:
    """Per iteration: stage seconds and bytes written, from the stage folders' manifests."""
    rows = {}
    for folder in sorted(rl_dir.glob("it*-*")):
        if not (folder / "manifest.json").is_file():
            continue
        m = json.loads((folder / "manifest.json").read_text())
        it = int(folder.name[2:6])
        row = rows.setdefault(it, {"bytes_written": 0})
        # what was written, files pruned since included (the manifest keeps their sizes)
        sizes = [v[0] for v in m.get("stat", {}).values()]
        row["bytes_written"] += sum(sizes) if sizes else sum(
            f.stat().st_size for f in folder.rglob("*") if f.is_file())
        row.update(m.get("metrics", {}))
    out = []
    for it in sorted(rows):
        r = rows[it]
        sample = r.get("timing_s/sample_trees", 0.0)
        score = r.get("timing_s/estimate_scores", 0.0)
        update = r.get("timing_s/update_policy", 0.0)
        compute = r.get("update/compute_s", update)
        out.append({"iteration_s": sample + score + update, "sample_s": sample, "score_s": score,
                    "update_compute_s": compute, "other_s": update - compute,
                    "bytes_written": r["bytes_written"]})
    return out


def link_shared_stages(src: Path, dst: Path) -> None:
    """``dst``'s stage cache with links to ``src``'s stages that precede RL."""
    (dst / "stages").mkdir(parents=True)
    for folder in (src / "stages").iterdir():
        if not folder.name.startswith(("rl-", ".")):
            (dst / "stages" / folder.name).symlink_to(folder.resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/experiments/deep_ibtpo.yaml")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--save-every", type=int, default=5,
                    help="after: rl.save_optimizer_every (the optimizer state)")
    ap.add_argument("--weights-every", type=int, default=5,
                    help="after: rl.save_every (the weights; 1: every iteration)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ibtpo-iteration-"))
    out = {"config": args.config, "iterations": args.iterations, "world_size": 1}
    first = None
    for name, sets in VARIANTS.items():
        work = base / name
        if first is None:
            work.mkdir()
        else:
            link_shared_stages(first, work)
        extra = ([f"rl.save_optimizer_every={args.save_every}",
                  f"rl.save_every={args.weights_every}"] if name == "after" else [])
        result, wall, peak = run(args.config, work, sets + extra +
                                 [f"rl.iterations={args.iterations}"], args.threads)
        rows = iteration_stats(Path(result["iterations_dir"]))
        rows = rows[1:] if len(rows) > 1 else rows  # the first iteration builds everything
        stats = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        stats["bytes_written_per_iteration"] = [r["bytes_written"] for r in rows]
        stats["peak_rss_gb"] = peak
        stats["bytes_hashed"] = stats["bytes_written"]  # each output hashed once, when published
        out[name] = stats
        first = first or work
    keys = ["iteration_s", "sample_s", "score_s", "update_compute_s", "other_s", "bytes_written",
            "peak_rss_gb"]
    print(f"{'':8}" + "".join(f"{k:>18}" for k in keys))
    for name in VARIANTS:
        print(f"{name:8}" + "".join(f"{out[name][k]:>18.3f}" if isinstance(out[name][k], float)
                                    else f"{out[name][k]:>18}" for k in keys))
    out["model"] = args.config
    write_json(args.json, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
