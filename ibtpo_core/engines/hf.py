"""The ``hf`` rollout engine: a transformers checkpoint, sampled on CPU or GPU.

Loads the policy with ``AutoModelForCausalLM.from_pretrained`` (the same path a Qwen3 checkpoint
takes) and decodes with ``LeanDecoder``. Prefix reuse at two levels: identical prefixes in one
call are fed once and their key/values copied to every sample, and a ``PrefixStore`` keeps the
key/values of earlier sequences so that branching from a node of a tree feeds only the tokens
past the longest stored match. Weight loads clear the store (the key/values change with them).
"""
from __future__ import annotations

import torch

from ibtpo_core.engines.base import ENGINES, Completion, RolloutEngine, StopConditions
from ibtpo_core.engines.lean import LeanDecoder
from ibtpo_core.engines.prefix_store import PrefixStore


def _sample(probs: torch.Tensor, gen: torch.Generator | None,
            u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row by inverse CDF: a single uniform per row (``multinomial`` draws one
    exponential per vocabulary entry, which dominated small-model decode steps), from ``gen`` or
    given as ``u`` (B,)."""
    cdf = probs.cumsum(-1)  # (B, V)
    if u is None:
        u = torch.rand(probs.shape[0], 1, generator=gen, device=probs.device, dtype=cdf.dtype)
    else:
        u = u.to(device=probs.device, dtype=cdf.dtype)[:, None]
    tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return tok.clamp_(max=probs.shape[1] - 1)


# splitmix64 (Steele, Lea and Flood 2014) in signed int64: torch's int64 products wrap
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_M1, _M2 = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64


def _wrap(x: int) -> int:
    """A Python integer as the int64 that its low 64 bits are."""
    return (x + 2**63) % 2**64 - 2**63


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function of ``z`` (int64, elementwise)."""
    z = (z ^ _lsr(z, 30)) * _M1
    z = (z ^ _lsr(z, 27)) * _M2
    return z ^ _lsr(z, 31)


def row_keys(seed: int, prefix_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """(B,) int64: one key per sampled row, from the call's seed, the row's prefix (its index in
    the whole call) and its sample number; nothing else about the call enters."""
    base = mix64(torch.full_like(prefix_index, int(seed) % 2**63) + _GOLDEN)
    return mix64(mix64(base + (prefix_index + 1) * _GOLDEN) + (sample_index + 1) * _GOLDEN)


def row_uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """(B,) float64 in [0, 1): each row's uniform at decode step ``step``."""
    return _lsr(mix64(keys + _wrap((step + 1) * _GOLDEN)), 11).double() * 2.0**-53


@ENGINES.register("hf")
class HFEngine(RolloutEngine):
    fresh_options = {"reuse_prefixes": False}  # cheap to build; a fresh one needs no prefix store

    def __init__(self, model_path: str, device: str = "cpu", dtype: str = "float32",
                 max_batch: int = 256, prefix_cache_tokens: int = 1_000_000,
                 reuse_prefixes: bool = True, trust_remote_code: bool = False,
                 seed_per_prefix: bool = False):
        from transformers import AutoModelForCausalLM  # heavy import kept local

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        self.decoder = LeanDecoder(self.model)
        self.max_batch = max_batch
        self.reuse_prefixes = reuse_prefixes
        self.store = PrefixStore(prefix_cache_tokens)
        # each row's uniforms from (seed, prefix index, sample, step) instead of one generator
        # per call: a prefix's samples do not depend on the rest of the call, so replicas can
        # split it (engines/replicas.py); off by default, which keeps the published runs' draws
        self.seed_per_prefix = seed_per_prefix
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "decoded_tokens": 0}

    @property
    def max_context(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def seeds_per_prefix(self) -> bool:
        return self.seed_per_prefix

    def load_weights(self, path: str) -> None:
        import glob
        import os

        from safetensors.torch import load_file

        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}: pass a checkpoint directory "
                                    f"written by save_pretrained")
        state = {}
        for f in files:
            state.update(load_file(f, device=str(self.device)))
        self._apply(state, f"checkpoint {path}")

    def load_state(self, state: dict) -> bool:
        """The weights copied from a state dict in memory (no file read)."""
        self._apply(state, "the state given")
        return True

    def _apply(self, state: dict, source: str) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"{source} does not match the engine's model: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}")
        self.model.tie_weights()
        self.decoder.refresh()
        self.store.clear()

    def reset_prefix_cache(self) -> None:
        self.store.clear()

    def _generate(self, prefixes, num_samples, temperature, max_new_tokens, stop, seed,
                  first_index=0):
        seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
        gen = None
        if not self.seed_per_prefix:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        rows_per_prefix = max(1, self.max_batch // num_samples)
        out: list[Completion] = []
        for start in range(0, len(prefixes), rows_per_prefix):
            chunk = prefixes[start:start + rows_per_prefix]
            limits = max_new_tokens[start:start + rows_per_prefix]
            keys = None
            if self.seed_per_prefix:
                index = torch.arange(len(chunk)).repeat_interleave(num_samples)
                keys = row_keys(seed, index + first_index + start,
                                torch.arange(num_samples).repeat(len(chunk)))
            for c in self._generate_chunk(chunk, num_samples, temperature, limits, stop, gen,
                                          keys):
                c.prefix_index += start
                out.append(c)
        return out

    @torch.inference_mode()
    def _generate_chunk(
        self,
        prefixes: list[list[int]],
        n: int,
        temperature: float,
        limits: list[int],
        stop: StopConditions,
        gen: torch.Generator | None,
        keys: torch.Tensor | None = None,
    ) -> list[Completion]:
        dev = self.device
        P = len(prefixes)
        max_new = max(limits)
        # 1. reuse stored key/values; always feed at least the last prefix token (for its logits)
        hits = []
        for p in prefixes:
            kv, m = self.store.lookup(p) if self.reuse_prefixes else (None, 0)
            m = min(m, len(p) - 1)
            hits.append((kv, m) if kv is not None and m > 0 else (None, 0))
        cached = [m for _, m in hits]
        suffix_len = [len(p) - m for p, m in zip(prefixes, cached)]
        S = max(suffix_len)
        # right padding writes up to position cached + S - 1 in every row
        buf = self.decoder.new_buffer(P, max(m + S for m in cached) + max_new)
        for i, (kv, m) in enumerate(hits):
            if kv is not None:
                buf.load_rows(i, kv, m)
        # 2. prefill the uncached suffixes, right-padded; garbage written past a row's end is
        #    masked by causality and overwritten as that row decodes
        toks = torch.zeros(P, S, dtype=torch.long)
        pos = torch.zeros(P, S, dtype=torch.long)
        for i, (p, m) in enumerate(zip(prefixes, cached)):
            s = len(p) - m
            toks[i, :s] = torch.tensor(p[m:])
            pos[i] = torch.arange(m, m + S)
        logits = self.decoder.forward(toks.to(dev), pos.to(dev), buf,
                                      torch.tensor(suffix_len, device=dev) - 1)  # (P, V)
        self.stats["prefill_tokens"] += sum(suffix_len)
        self.stats["reused_tokens"] += sum(cached)
        # 3. one row per sample
        index = torch.arange(P, device=dev).repeat_interleave(n)
        if n > 1:
            buf.expand_rows(index)
            logits = logits.index_select(0, index)
        B = P * n
        lengths = torch.tensor([len(prefixes[i]) for i in index.tolist()], device=dev)  # (B,)
        limit = torch.tensor(limits, device=dev).index_select(0, index)  # (B,)
        eos_set = set(stop.eos_token_ids)
        step_set = set(stop.step_end_token_ids) if stop.stop_at_step_end else set()
        stop_ids = torch.tensor(sorted(eos_set | step_set), dtype=torch.long, device=dev)
        new_tok = torch.zeros(B, max_new, dtype=torch.long, device=dev)
        new_lp = torch.zeros(B, max_new, device=dev)
        new_ent = torch.zeros(B, max_new, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        n_new = torch.zeros(B, dtype=torch.long, device=dev)
        for t in range(max_new):
            logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
            probs = logp.exp()  # (B, V)
            tok = _sample(probs, gen, None if keys is None else row_uniforms(keys, t))  # (B,)
            new_tok[:, t] = tok
            new_lp[:, t] = logp.gather(1, tok[:, None]).squeeze(1)
            new_ent[:, t] = -(probs * logp).sum(-1)
            n_new += ~done
            done = done | torch.isin(tok, stop_ids) | (n_new >= limit)
            if bool(done.all()):
                break
            logits = self.decoder.forward(tok[:, None], (lengths + t)[:, None], buf)
        self.stats["decoded_tokens"] += int(n_new.sum())
        out = []
        toks_l, lp_l, ent_l = new_tok.tolist(), new_lp.tolist(), new_ent.tolist()
        for b in range(B):
            k = int(n_new[b])
            i = b // n
            last = toks_l[b][k - 1]
            reason = "eos" if last in eos_set else "step_end" if last in step_set else "length"
            out.append(Completion(i, toks_l[b][:k], lp_l[b][:k], ent_l[b][:k], reason))
            if self.reuse_prefixes:
                fed = prefixes[i] + toks_l[b][: k - 1]  # the last sampled token was never fed
                self.store.insert(fed, buf.rows(b, len(fed)))
        return out
