"""Per-token log-probs and entropies of training sequences under a causal LM.

Pads a list of ``TrainingSequence`` into tensors, runs the model once, and returns the
response tokens' log-probs and entropies under softmax(logits / T) (the sampling policy's
form), aligned with the sequences' old log-probs and advantages. Knows nothing of optimizers.

``response_logprobs`` never holds the logits of a whole sequence: the output layer runs on the
response positions only, a chunk of tokens at a time, each chunk recomputed in the backward
pass, so memory grows with ``chunk_tokens x V`` and not with ``B x L x V`` (Qwen3's 151,936-token
vocabulary: 5 GB of fp32 logits for one 8k-token sequence). ``token_logprobs`` is the
whole-vocabulary form, kept for checkpoints whose output layer is not a plain projection and as
the reference the chunked form is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

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


def _chunk_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                    entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target and the entropy of its distribution, for one chunk of tokens:
    ``hidden`` (n, H), ``targets`` (n,) -> two (n,) tensors. Without ``entropy_grad`` the
    entropy is computed in place, one (n, V) buffer, and carries no gradient."""
    logits = head(hidden).float()  # (n, V)
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if entropy_grad and torch.is_grad_enabled():
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # H = lse - E_p[logit]
        return logp, entropy
    with torch.no_grad():
        p = torch.softmax(logits, dim=-1).mul_(logits)
        entropy = lse - p.sum(-1)
    return logp, entropy


def response_logprobs(model, batch: Batch, temperature: float = 1.0, chunk_tokens: int = 256,
                      entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs, entropy)``, each (B, L - 1) and 0 outside the response, computed over the
    response positions only, ``chunk_tokens`` at a time (see the module docstring). The entropy
    carries a gradient only with ``entropy_grad`` (an entropy bonus in the loss)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    backbone, head = module.get_decoder(), module.get_output_embeddings()
    hidden = backbone(input_ids=batch.input_ids,
                      attention_mask=batch.attention_mask).last_hidden_state  # (B, L, H)
    where = batch.response_mask.bool()  # (B, L - 1)
    h = hidden[:, :-1][where]  # (N, H): the states that predict response tokens
    targets = batch.targets[where]  # (N,)
    parts_logp, parts_ent = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        args = (head, h[start:start + chunk_tokens], targets[start:start + chunk_tokens],
                temperature, entropy_grad)
        if torch.is_grad_enabled():  # the chunk's logits are recomputed, not kept, for backward
            lp, en = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, en = _chunk_logprobs(*args)
        parts_logp.append(lp)
        parts_ent.append(en)
    flat_logp = torch.cat(parts_logp) if parts_logp else h.new_zeros(0, dtype=torch.float32)
    flat_ent = torch.cat(parts_ent) if parts_ent else h.new_zeros(0, dtype=torch.float32)
    logp = torch.zeros(where.shape, dtype=torch.float32, device=h.device)
    entropy = torch.zeros(where.shape, dtype=torch.float32, device=h.device)
    return logp.masked_scatter(where, flat_logp), entropy.masked_scatter(where, flat_ent)
