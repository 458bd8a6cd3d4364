"""Several copies of one rollout engine, each in a process of its own (one per GPU), that split
every call (``engine.replicas``).

A call's prefixes are cut into contiguous parts, one per replica, sent at once and answered in
parallel; each part carries its place in the call (``first_index``), so with an engine that
seeds per prefix (vLLM; ``hf`` with ``seed_per_prefix: true``) the completions are those one
engine gives for the whole call, whatever the number of replicas. Weight loads (from a
checkpoint or from memory) and prefix-cache resets go to every replica. On a GPU machine
replica ``r`` sees only GPU ``r`` (``CUDA_VISIBLE_DEVICES``); on CPU the replicas are processes
over the cores. The processes start by ``spawn`` (vLLM and CUDA do not survive a fork) and stop
with the engine.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback

from ibtpo_core.engines.base import Completion, RolloutEngine, build_engine, check_options


def _serve(conn, name: str, kwargs: dict, env: dict) -> None:
    """A replica's loop: build the engine, then run each ``(method, args, kwargs)`` received and
    send back ``("ok", result)`` or ``("error", traceback)``; ``None`` stops it."""
    os.environ.update(env)
    try:
        engine = build_engine(name, **kwargs)
        conn.send(("ok", {"max_context": engine.max_context,
                          "seeds_per_prefix": engine.seeds_per_prefix}))
    except Exception:  # noqa: BLE001 - the parent raises it with the replica's traceback
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg is None:
            break
        method, args, kw = msg
        try:
            result = (dict(engine.stats) if method == "stats"
                      else getattr(engine, method)(*args, **kw))
            conn.send(("ok", result))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


def build(name: str, replicas: int = 1, **kwargs) -> RolloutEngine:
    """Engine ``name`` built with ``kwargs``: one, or with ``replicas`` > 1 that many copies in
    processes of their own that split each call (options checked here, before any starts)."""
    if replicas > 1:
        check_options(name, kwargs)
        return ReplicatedEngine(name, replicas, **kwargs)
    return build_engine(name, **kwargs)


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(n)``, sizes differing by at
    most one, the larger first (empty ranges where ``n < parts``)."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for r in range(parts):
        stop = start + size + (1 if r < extra else 0)
        out.append((start, stop))
        start = stop
    return out


class ReplicatedEngine(RolloutEngine):
    """``replicas`` copies of engine ``name`` (built with ``kwargs``), one process each."""

    one_per_process = True
    seeds_per_prefix = True

    def __init__(self, name: str, replicas: int, model_path: str, **kwargs):
        if replicas < 2:
            raise ValueError(f"replicas must be >= 2 (got {replicas}); one engine needs no "
                             f"replicas: build it directly")
        gpus = str(kwargs.get("device", "cpu")).startswith("cuda")
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for r in range(replicas):
            parent, child = ctx.Pipe()
            env = {"CUDA_VISIBLE_DEVICES": str(r)} if gpus else {}
            proc = ctx.Process(target=_serve, args=(child, name, {"model_path": model_path,
                                                                  **kwargs}, env), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        ready = [self._answer(r) for r in range(replicas)]
        if not all(x["seeds_per_prefix"] for x in ready):
            self.close()
            raise ValueError(f"engine.replicas: {replicas} splits each call between replicas, "
                             f"which gives one engine's samples only if every prefix has its "
                             f"own seed; engine {name!r} as configured draws one generator per "
                             f"call: set engine.options.seed_per_prefix: true (hf)")
        self._max_context = ready[0]["max_context"]
        self.replicas = replicas

    def _answer(self, r: int):
        status, value = self._conns[r].recv()
        if status == "error":
            raise RuntimeError(f"rollout engine replica {r} failed:\n{value}")
        return value

    def _all(self, method: str, *args, **kw) -> list:
        for conn in self._conns:
            conn.send((method, args, kw))
        return [self._answer(r) for r in range(len(self._conns))]

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def stats(self) -> dict:
        """Each counter summed over the replicas."""
        total: dict = {}
        for s in self._all("stats"):
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        return total

    def _generate(self, prefixes, num_samples, temperature, max_new_tokens, stop, seed,
                  first_index=0) -> list[Completion]:
        import random

        if seed is None:  # one seed for every part, so the parts make one call
            seed = random.SystemRandom().randrange(2**62)
        parts = [(a, b) for a, b in split_evenly(len(prefixes), len(self._conns)) if b > a]
        for r, (a, b) in enumerate(parts):
            self._conns[r].send(("generate", (prefixes[a:b],),
                                 {"num_samples": num_samples, "temperature": temperature,
                                  "max_new_tokens": max_new_tokens[a:b], "stop": stop,
                                  "seed": seed, "first_index": first_index + a}))
        out: list[Completion] = []
        for r, (a, _) in enumerate(parts):
            for c in self._answer(r):
                c.prefix_index += a
                out.append(c)
        return out

    def load_weights(self, path: str) -> None:
        self._all("load_weights", path)

    def load_state(self, state: dict) -> bool:
        return all(self._all("load_state", {k: v.detach().cpu() for k, v in state.items()}))

    def reset_prefix_cache(self) -> None:
        self._all("reset_prefix_cache")

    def sleep(self) -> None:
        self._all("sleep")

    def wake(self) -> None:
        self._all("wake")

    def close(self) -> None:
        """Stop the replicas' processes (also when the engine is dropped)."""
        for conn, proc in zip(self._conns, self._procs):
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        self._conns, self._procs = [], []

    def __del__(self):
        if getattr(self, "_procs", None):
            self.close()
