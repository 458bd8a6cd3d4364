"""Run an experiment config stage by stage, skipping stages whose output is already on disk.

Each stage's folder is named by a digest of its config section and its inputs' digests, so a
rerun with the same config only reads manifests, and a changed knob redoes only the stages
downstream of it. (The Prefect flow in ``flows/`` adds retries, MLflow and the RL loop on top of
the same stage functions.)
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ibtpo_core import stages
from ibtpo_core.artifacts import digest_json


def _section(obj) -> dict:
    return obj.model_dump() if hasattr(obj, "model_dump") else dataclasses.asdict(obj)


def _stage(out: Path, kind: str, key_parts: list, make) -> dict:
    folder = out / f"{kind}-{digest_json(key_parts)[:12]}"
    hit = stages.cached(folder)
    if hit is not None:
        print(f"[{kind}] cached: {folder}", flush=True)
        return hit
    print(f"[{kind}] running -> {folder}", flush=True)
    return make(folder)


def run_experiment(config_path: str, overrides: list[str]) -> dict:
    from tqdm import tqdm

    from configs.schema import load_config
    from ibtpo_core.runtime import set_threads

    cfg = load_config(config_path, overrides)
    set_threads(cfg.threads)
    out = cfg.resolved_output_dir()
    t0 = time.time()
    data = _stage(out, "data", [_section(cfg.data)], lambda f: stages.prepare_data(cfg.data, f))
    if cfg.model.path is None:
        model = _stage(out, "model", [_section(cfg.model)], lambda f: stages.create_model(cfg.model, f))
    else:
        model = {"path": cfg.model.path, "digest": digest_json([cfg.model.path]), "metrics": {}}
    policy = model
    if cfg.warmup.enabled:
        def _warm(folder):
            bar = tqdm(total=cfg.warmup.spec.steps, desc="warm-up", unit="step", mininterval=2)

            def progress(step, total, loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

            try:
                return stages.warm_up(model["path"], data["path"], cfg.data.countdown,
                                      cfg.warmup.spec, folder, progress=progress)
            finally:
                bar.close()

        policy = _stage(out, "warmup", [_section(cfg.warmup), data["digest"], model["digest"]], _warm)
    ev = _stage(out, "eval", [_section(cfg.eval), data["digest"], policy["digest"]],
                lambda f: stages.evaluate_checkpoint(policy["path"], data["path"], cfg.eval,
                                                     cfg.engine, f))
    m = ev["metrics"]
    return {"accuracy_before": None, "accuracy_after": m["accuracy"],
            "accuracy_se": m["accuracy_se"], "n_eval": int(m["n_eval"]),
            f"pass_at_{cfg.eval.spec.num_samples}": m[f"pass_at_{cfg.eval.spec.num_samples}"],
            "checkpoint": policy["path"], "wall_s": round(time.time() - t0, 1)}
