"""The rollout engine interface (method.md §1).

An engine samples continuations of token-id prefixes and reports, per new token, the sampling
policy's log-prob and the entropy of its full next-token distribution. Plain Python types only:
no transformers or vLLM objects cross this boundary, so the tree sampler and the pipeline work
with any engine. Engines register in ``ENGINES`` and are built by name from config.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ibtpo_core.registry import Registry

ENGINES: Registry[Callable[..., "RolloutEngine"]] = Registry("engine")
# The engines this project ships, by name -> the module that registers it (imported when first
# built: the hf engine needs transformers, the vllm one vLLM). Configs check names against this.
ENGINE_MODULES: dict[str, str] = {"hf": "ibtpo_core.engines.hf", "vllm": "ibtpo_core.engines.vllm"}


@dataclass(frozen=True)
class StopConditions:
    """When a sampled continuation ends.

    ``eos_token_ids`` always end it. With ``stop_at_step_end``, any token in
    ``step_end_token_ids`` (the tokens whose text holds the step delimiter) ends it too.
    """

    eos_token_ids: tuple[int, ...]
    step_end_token_ids: tuple[int, ...] = ()
    stop_at_step_end: bool = False


@dataclass
class Completion:
    """One sampled continuation of ``prefixes[prefix_index]``."""

    prefix_index: int
    token_ids: list[int]
    logprobs: list[float]  # log pi_sample(token) per new token, pi_sample = softmax(logits / T)
    entropies: list[float] | None  # entropy of pi_sample per new token; None if not exposed
    finish_reason: str  # "eos" | "step_end" | "length"
    meta: dict = field(default_factory=dict)


class RolloutEngine(ABC):
    """Sample continuations; batched, seeded, reusing shared prefixes where the engine can."""

    # costly to build (a vLLM engine holds GPU memory and compiled graphs): one per process,
    # shared by every stage (engines/held.py); otherwise a stage may build its own
    one_per_process: bool = False
    # keyword arguments a stage that builds its own engine passes (e.g. no prefix store)
    fresh_options: dict = {}

    @property
    def seeds_per_prefix(self) -> bool:
        """Whether each prefix samples from its own seed, derived from the call's seed and the
        prefix's index (``first_index`` + its place in the call), so its samples do not depend on
        the other prefixes of the call: what lets replicas split a call (engines/replicas.py)."""
        return False

    @property
    @abstractmethod
    def max_context(self) -> int:
        """Longest prefix + continuation the model accepts, in tokens."""

    @abstractmethod
    def _generate(
        self,
        prefixes: list[list[int]],
        num_samples: int,
        temperature: float,
        max_new_tokens: list[int],
        stop: StopConditions,
        seed: int | None,
    ) -> list[Completion]:
        """``max_new_tokens`` holds one limit per prefix."""

    @abstractmethod
    def load_weights(self, path: str) -> None:
        """Replace the policy's weights with the checkpoint at ``path`` (same architecture)."""

    def load_state(self, state: dict) -> bool:
        """Replace the weights with ``state``, a state dict in memory (the resident trainer's);
        False where the engine takes weights from a checkpoint only (the caller then calls
        ``load_weights``)."""
        return False

    def reset_prefix_cache(self) -> None:  # noqa: B027 - a no-op unless the engine keeps prefixes
        """Forget reusable prefixes, so results depend only on the inputs of this call on."""

    def sleep(self) -> None:  # noqa: B027 - a no-op unless the engine can free its memory
        """Free the accelerator memory the engine holds (its KV cache; its weights kept off the
        GPU) while the update trains on the same GPUs; ``wake`` before the next call."""

    def wake(self) -> None:  # noqa: B027
        """Take back what ``sleep`` freed (a no-op when awake)."""

    def generate(self, prefixes: Sequence[Sequence[int]], *, num_samples: int = 1,
                 temperature: float = 1.0, max_new_tokens: int | Sequence[int],
                 stop: StopConditions, seed: int | None = None,
                 first_index: int = 0) -> list[Completion]:
        """Sample ``num_samples`` continuations of every prefix.

        ``max_new_tokens`` is one limit for all prefixes or one per prefix.
        Returns ``len(prefixes) * num_samples`` completions, prefix-major (all samples of
        prefix 0 first). The same seed and inputs give the same samples. ``first_index``: this
        call's prefixes are those from ``first_index`` on of a larger call split into parts (for
        their seeds; engines that ``seeds_per_prefix`` only).
        """
        prefixes = [list(p) for p in prefixes]
        if isinstance(max_new_tokens, int):
            limits = [max_new_tokens] * len(prefixes)
        else:
            limits = [int(x) for x in max_new_tokens]
            if len(limits) != len(prefixes):
                raise ValueError(f"max_new_tokens has {len(limits)} limits for {len(prefixes)} "
                                 f"prefixes: give one int or one per prefix")
        validate_request(prefixes, num_samples, temperature, limits, self.max_context)
        if not prefixes:
            return []
        if first_index:
            if not self.seeds_per_prefix:
                raise ValueError(f"{type(self).__name__} samples a call with one generator, so a "
                                 f"part of a call (first_index {first_index}) cannot get its own "
                                 f"prefixes' samples; use an engine that seeds per prefix")
            return self._generate(prefixes, num_samples, temperature, limits, stop, seed,
                                  first_index=first_index)
        return self._generate(prefixes, num_samples, temperature, limits, stop, seed)


def validate_request(prefixes: list[list[int]], num_samples: int, temperature: float,
                     limits: list[int], max_context: int) -> None:
    """Reject bad sampling requests with the fix in the message."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1 (got {num_samples})")
    if limits and min(limits) < 1:
        raise ValueError(
            f"max_new_tokens must be >= 1 (got {min(limits)}): raise the response length "
            f"limit (max_new_tokens / max_response_tokens in the config)")
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 for sampling (got {temperature}): the policy-gradient "
            f"log-probs are those of softmax(logits / T); use e.g. temperature: 1.0")
    for i, (p, max_new_tokens) in enumerate(zip(prefixes, limits)):
        if len(p) == 0:
            raise ValueError(
                f"prefix {i} is empty: a prefix needs at least one token; pass the prompt's "
                f"token ids (with BOS if the model uses one)")
        if len(p) + max_new_tokens > max_context:
            raise ValueError(
                f"prefix {i} has {len(p)} tokens and max_new_tokens is {max_new_tokens}: "
                f"{len(p) + max_new_tokens} exceeds the model's context of {max_context} tokens; "
                f"shorten the prompt or lower max_new_tokens to {max(max_context - len(p), 0)}")


def engine_class(name: str) -> type[RolloutEngine]:
    """The engine class registered as ``name``, its module imported on first use."""
    if name in ENGINE_MODULES and name not in ENGINES:
        importlib.import_module(ENGINE_MODULES[name])  # the module registers its engine
    return ENGINES.get(name)


def check_options(name: str, kwargs: dict) -> type[RolloutEngine]:
    """The class of engine ``name``, after checking that it takes every keyword in ``kwargs``."""
    cls = engine_class(name)
    import inspect

    accepted = inspect.signature(cls).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        valid = ", ".join(k for k in accepted if k != "model_path")
        raise ValueError(f"engine {name!r} has no option(s) {unknown} (from engine.options); "
                         f"its options: {valid}")
    return cls


def build_engine(name: str, **kwargs) -> RolloutEngine:
    """Build the engine registered as ``name`` (``hf``; ``vllm`` where installed); several
    copies that split each call: ``replicas.build``."""
    return check_options(name, kwargs)(**kwargs)
