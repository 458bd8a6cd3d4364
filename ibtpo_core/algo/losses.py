"""Policy losses (method.md §5 and §6), registered by name, one signature:

    fn(logprobs, old_logprobs, advantages, mask, spec, ref_logprobs=None, entropy=None)
        -> (loss, metrics)

all tensors (B, T); ``mask`` marks response tokens. The per-token loss is aggregated over the
batch by ``agg`` (``aggregate``; the KL and entropy terms stay token means):

    token_mean            sum_{i,t} l_it / sum_i |y_i|      (DAPO's token-level loss; default)
    seq_mean_token_mean   mean_i (sum_t l_it / |y_i|)       (GRPO as first published)
    seq_sum_norm          sum_{i,t} l_it / (B * agg_tokens) (Dr. GRPO: a constant normaliser,
                          agg_tokens = the rollout's max_new_tokens unless set)

    r_t  = exp(logprobs - old_logprobs)
    ppo_clip:  loss = -mean_t min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)
    cispo:     loss = -mean_t sg(min(r_t, 1 + eps_high)) A_t log pi_theta(t)
               (MiniMax-M1's CISPO: the importance weight truncated above and held constant, so
               every token keeps its gradient A_t w_t, however far its ratio moved; eps_low unused)
    gspo:      s_i  = exp(mean over sequence i's tokens of log r_t)   (one ratio per row)
               loss = -mean_t min(s_i A_t, clip(s_i, 1 - eps_low, 1 + eps_high) A_t)
               (GSPO's sequence-level ratio and clip, aggregated over tokens as TRL's
               importance_sampling_level: sequence does; the paper's band is 3e-4 / 4e-4)
    both:      + beta_kl * mean_t KL_k3(pi_theta || pi_ref)  - entropy_coef * mean_t H_t
    KL_k3 = exp(ref - logp) - (ref - logp) - 1     (Schulman's k3 estimator, >= 0)

Metrics (masked token means): ``loss/clipfrac`` (share of tokens where the clipped term is the
one taken), ``loss/approx_kl`` (k3 of pi_theta against pi_old), ``clip_ratio/low_mean`` (share
clipped at 1 - eps_low with A < 0), ``clip_ratio/high_mean`` (at 1 + eps_high with A > 0),
``entropy``, ``kl`` (to the reference, when given), ``loss/pg``. Pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from ibtpo_core.registry import Registry

LOSSES: Registry[Callable] = Registry("loss")


@dataclass(frozen=True)
class LossSpec:
    __pydantic_config__ = {"extra": "forbid"}  # config validation: unknown keys fail

    name: str = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta_kl: float = 0.0
    entropy_coef: float = 0.0
    agg: Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"] = "token_mean"
    agg_tokens: Optional[int] = None  # seq_sum_norm's constant; the config fills in max_new_tokens

    def __post_init__(self):
        LOSSES.get(self.name)
        if self.agg_tokens is not None and self.agg_tokens < 1:
            raise ValueError(f"agg_tokens must be >= 1 (got {self.agg_tokens}); leave it null for "
                             f"the rollout's max_new_tokens")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"eps_low must be in [0, 1) (got {self.eps_low})")
        if self.eps_high < 0:
            raise ValueError(f"eps_high must be >= 0 (got {self.eps_high})")
        if self.beta_kl < 0:
            raise ValueError(f"beta_kl must be >= 0 (got {self.beta_kl}); 0 turns the KL term off")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The batch loss from per-token losses (B, T) by ``spec.agg`` (module docstring)."""
    m = mask.to(per_token.dtype)
    if spec.agg == "token_mean":
        return masked_mean(per_token, mask)
    rows = m.sum(-1)
    has = rows > 0
    if spec.agg == "seq_mean_token_mean":
        return ((per_token * m).sum(-1)[has] / rows[has]).sum() / has.sum().clamp(min=1)
    if spec.agg_tokens is None:
        raise ValueError("agg seq_sum_norm needs agg_tokens (the config sets it to "
                         "rl.rollout.max_new_tokens)")
    return (per_token * m).sum() / (has.sum().clamp(min=1) * spec.agg_tokens)


def agg_units(lengths: list[int], spec: LossSpec) -> float:
    """What ``aggregate`` divides by, in units that add over micro-batches: response tokens for
    ``token_mean``, sequences (with a response) otherwise. A micro-batch's loss weighs
    units(micro) / units(mini-batch) in the mini-batch's."""
    if spec.agg == "token_mean":
        return float(sum(lengths))
    return float(sum(1 for n in lengths if n > 0))


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


@LOSSES.register("ppo_clip")
def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, spec: LossSpec,
                  ref_logprobs=None, entropy=None):
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    return _clipped(ratio, logprobs, old_logprobs, advantages, mask, spec, ref_logprobs, entropy)


@LOSSES.register("cispo")
def cispo_loss(logprobs, old_logprobs, advantages, mask, spec: LossSpec,
               ref_logprobs=None, entropy=None):
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    weight = ratio.clamp(max=1.0 + spec.eps_high).detach()
    pg = -weight * advantages * logprobs
    loss = aggregate(pg, mask, spec)
    with torch.no_grad():
        truncated = masked_mean((ratio > 1 + spec.eps_high).float(), mask)
        metrics = {
            "loss/pg": float(loss),
            "loss/clipfrac": float(truncated),  # tokens whose weight was truncated
            "loss/approx_kl": float(masked_mean(kl_k3(logprobs, old_logprobs), mask)),
            "clip_ratio/high_mean": float(truncated),
        }
    return _regularised(loss, metrics, logprobs, mask, spec, ref_logprobs, entropy)


@LOSSES.register("gspo")
def gspo_loss(logprobs, old_logprobs, advantages, mask, spec: LossSpec,
              ref_logprobs=None, entropy=None):
    m = mask.to(logprobs.dtype)
    log_s = ((logprobs - old_logprobs) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(
        min=1.0)  # (B, 1): one ratio per sequence
    ratio = torch.exp(log_s).expand_as(logprobs)  # (B, T)
    return _clipped(ratio, logprobs, old_logprobs, advantages, mask, spec, ref_logprobs, entropy)


def _clipped(ratio, logprobs, old_logprobs, advantages, mask, spec: LossSpec, ref_logprobs,
             entropy):
    """The clipped surrogate of ``ratio`` (per token, or a sequence's broadcast over its tokens)
    and its metrics, then ``_regularised``."""
    clipped = ratio.clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high)
    surr1, surr2 = ratio * advantages, clipped * advantages
    pg = -torch.minimum(surr1, surr2)
    loss = aggregate(pg, mask, spec)
    with torch.no_grad():
        took_clip = (surr2 < surr1) & mask.bool()
        metrics = {
            "loss/pg": float(loss),
            "loss/clipfrac": float(masked_mean(took_clip.float(), mask)),
            "loss/approx_kl": float(masked_mean(kl_k3(logprobs, old_logprobs), mask)),
            "clip_ratio/low_mean": float(
                masked_mean(((ratio < 1 - spec.eps_low) & (advantages < 0)).float(), mask)
            ),
            "clip_ratio/high_mean": float(
                masked_mean(((ratio > 1 + spec.eps_high) & (advantages > 0)).float(), mask)
            ),
        }
    return _regularised(loss, metrics, logprobs, mask, spec, ref_logprobs, entropy)


def _regularised(loss, metrics: dict, logprobs, mask, spec: LossSpec, ref_logprobs, entropy):
    """``loss`` with the KL term to the reference and the entropy bonus, and their metrics."""
    if ref_logprobs is not None and spec.beta_kl > 0:
        kl = masked_mean(kl_k3(logprobs, ref_logprobs), mask)
        loss = loss + spec.beta_kl * kl
        metrics["kl"] = float(kl.detach())
    if entropy is not None:
        ent = masked_mean(entropy, mask)
        metrics["entropy"] = float(ent.detach())
        if spec.entropy_coef:
            loss = loss - spec.entropy_coef * ent
    metrics["loss/total"] = float(loss.detach())
    return loss, metrics


def policy_loss(logprobs, old_logprobs, advantages, mask, spec: LossSpec, ref_logprobs=None,
                entropy=None):
    return LOSSES.get(spec.name)(logprobs, old_logprobs, advantages, mask, spec,
                                 ref_logprobs=ref_logprobs, entropy=entropy)
