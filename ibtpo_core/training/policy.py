"""Per-token log-probs and entropies of training sequences under a causal LM.

Pads a list of ``TrainingSequence`` into tensors, runs the model once, and returns the
response tokens' log-probs and entropies under softmax(logits / T) (the sampling policy's
form), aligned with the sequences' old log-probs and advantages. Knows nothing of optimizers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ibtpo_core.algo.tree import TrainingSequence


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L - 1) next-token ids
    response_mask: torch.Tensor  # (B, L - 1) 1 where the target is a response token
    old_logprobs: torch.Tensor  # (B, L - 1)
    advantages: torch.Tensor  # (B, L - 1)

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate(seqs: list[TrainingSequence], pad_id: int) -> Batch:
    L = max(len(s.prompt) + len(s.tokens) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    att = torch.zeros(B, L, dtype=torch.long)
    resp = torch.zeros(B, L - 1)
    old = torch.zeros(B, L - 1)
    adv = torch.zeros(B, L - 1)
    for i, s in enumerate(seqs):
        p, n = len(s.prompt), len(s.tokens)
        ids[i, : p + n] = torch.tensor(s.prompt + s.tokens)
        att[i, : p + n] = 1
        # the logits at position j predict token j + 1; response tokens sit at p .. p + n - 1
        resp[i, p - 1: p - 1 + n] = 1
        old[i, p - 1: p - 1 + n] = torch.tensor(s.old_logprobs)
        adv[i, p - 1: p - 1 + n] = torch.tensor(s.advantages)
    return Batch(ids, att, ids[:, 1:], resp, old, adv)


def token_logprobs(
    model, batch: Batch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy)``, each (B, L - 1), of every next token under softmax(logits / T)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logits = logits[:, :-1].float() / temperature  # (B, L - 1, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
