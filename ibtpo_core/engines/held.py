"""One rollout engine per process, kept alive across stages.

Building a vLLM engine costs tens of seconds and most of a GPU's free memory, so the RL
iterations and the evaluations of one run share a single engine: it is built on first use and,
when a later stage asks for another checkpoint of the same config, the new weights are loaded
into it: from memory where the resident trainer still holds them (training/resident.py), as
both shipped engines take a state dict, else from the checkpoint's files. A different engine
config replaces it.
"""
from __future__ import annotations

import json

from ibtpo_core.engines.base import RolloutEngine, engine_class
from ibtpo_core.engines.replicas import build

_HELD: dict = {}


def held_engine(name: str, model_path: str, weights: dict | None = None,
                base_path: str | None = None, **kwargs) -> RolloutEngine:
    """The process's engine for ``name`` / ``kwargs``, holding the weights of ``model_path``;
    ``weights``: that checkpoint's state dict already in memory (the resident trainer's), taken
    instead of reading the file where the engine can. ``base_path``: a checkpoint of the same
    model with its weights on disk, to build a new engine from when ``model_path`` has none (saved
    without them, ``rl.save_every``; ``weights`` then replaces them). Its reusable prefixes are
    cleared, so a stage's samples depend on its inputs only."""
    key = json.dumps([name, kwargs], sort_keys=True, default=str)
    engine = _HELD.get("engine")
    if engine is None or _HELD.get("key") != key:
        _HELD.clear()  # drop the old engine (and its memory) before building the next
        source = base_path if weights is not None and base_path else model_path
        engine = build(name, model_path=source, **kwargs)
        _HELD.update(engine=engine, key=key, path=source)
    engine.wake()  # asleep since the last update (sleep_held), if the engine sleeps
    if _HELD.get("path") != model_path:
        in_memory = weights is not None and engine.load_state(weights)
        if not in_memory:
            engine.load_weights(model_path)
        _HELD["path"] = model_path
        _HELD["loads_in_memory"] = _HELD.get("loads_in_memory", 0) + int(in_memory)
    engine.reset_prefix_cache()
    return engine


def sleep_held() -> None:
    """Put the process's held engine to sleep, if there is one (the update stage, before it
    trains on the GPUs the engine shares); the next ``held_engine`` call wakes it."""
    engine = _HELD.get("engine")
    if engine is not None:
        engine.sleep()


def stage_engine(name: str, model_path: str, **kwargs) -> RolloutEngine:
    """An engine for one stage outside the RL loop (an evaluation): the process's held one for
    engines built once per process (vLLM), else a fresh one with the engine's fresh options."""
    cls = engine_class(name)
    if cls.one_per_process or kwargs.get("replicas", 1) > 1:  # replicas: processes to keep
        return held_engine(name, model_path, **kwargs)
    return build(name, model_path=model_path, **{**kwargs, **cls.fresh_options})
