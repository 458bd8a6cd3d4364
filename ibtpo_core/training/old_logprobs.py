"""pi_old for an update, and how far the rollout engine's log-probs are from the trainer's.

The sampled sequences carry the rollout engine's log-probs (``mu``: vLLM in bf16 with its own
kernels). ``old_logprobs: rollout`` uses them as pi_old, so the ratio pi_theta / pi_old is not 1
at the first optimizer step wherever the two engines disagree. ``recompute`` replaces them by
the trainer's own log-probs of the same tokens before the first step (what verl, OpenRLHF and
TRL do), and with ``rollout_is_cap > 0`` weights each token's policy-gradient term by the
truncated importance weight ``min(pi_old / mu, cap)`` (TIS), which corrects the sampling
mismatch the recompute exposes. The weight is folded into the advantage: for the clipped
surrogate ``w * min(r A, clip(r) A) = min(r (w A), clip(r) (w A))`` with ``w > 0``.

Metrics (token shares of the whole batch, summed over ranks like the loss metrics):
``mismatch/ratio_mean``, ``mismatch/ratio_max`` (exp(trainer - rollout), what the first step's
ratio would be without the recompute), ``mismatch/clipfrac`` (share of tokens whose mismatch
alone lies outside [1 - eps_low, 1 + eps_high]), ``mismatch/is_weight_mean`` and
``mismatch/is_capped_frac`` with TIS. Pure torch; knows nothing of DeepSpeed.
"""
from __future__ import annotations

import dataclasses

import torch

from ibtpo_core.algo.tree import TrainingSequence


def mismatch_sums(trainer: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor,
                  eps_low: float, eps_high: float, total_tokens: int) -> dict[str, float]:
    """This micro-batch's share of the mismatch metrics (all tensors (B, T); ``total_tokens``:
    the response tokens of the whole batch, every rank)."""
    m = mask.bool()
    ratio = torch.exp(trainer.detach() - rollout)[m]
    if ratio.numel() == 0:
        return {}
    outside = (ratio < 1 - eps_low) | (ratio > 1 + eps_high)
    return {"mismatch/ratio_mean": float(ratio.sum()) / total_tokens,
            "mismatch/clipfrac": float(outside.sum()) / total_tokens,
            "mismatch/ratio_max": float(ratio.max())}


def corrected(seq: TrainingSequence, trainer_logprobs: list[float],
              cap: float) -> tuple[TrainingSequence, dict[str, float]]:
    """``seq`` with pi_old := the trainer's log-probs and, with ``cap > 0``, each token's
    advantage times ``min(exp(trainer - rollout), cap)``; and the token sums of the weights."""
    if len(trainer_logprobs) != len(seq.tokens):
        raise ValueError(f"{len(trainer_logprobs)} recomputed log-probs for a response of "
                         f"{len(seq.tokens)} tokens")
    if cap <= 0:
        return dataclasses.replace(seq, old_logprobs=list(trainer_logprobs)), {}
    mu = torch.tensor(seq.old_logprobs, dtype=torch.float64)
    old = torch.tensor(trainer_logprobs, dtype=torch.float64)
    raw = torch.exp(old - mu)
    w = raw.clamp(max=cap)
    adv = (torch.tensor(seq.advantages, dtype=torch.float64) * w).tolist()
    sums = {"mismatch/is_weight_mean": float(w.sum()),
            "mismatch/is_capped_frac": float((raw > cap).sum())}
    return dataclasses.replace(seq, old_logprobs=list(trainer_logprobs), advantages=adv), sums


def response_slice(row: torch.Tensor, seq: TrainingSequence) -> list[float]:
    """The response tokens' values of one collated row (L - 1,): positions p - 1 .. p + n - 2."""
    p, n = len(seq.prompt), len(seq.tokens)
    return row[p - 1:p - 1 + n].tolist()
