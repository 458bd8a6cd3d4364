"""Checks shared by the conformance tests of every rollout engine (hf here, vllm in
.venv-vllm): the same questions asked of each, against a fresh forward pass of the model."""
import torch


def forward_logprobs(model, prefix, tokens, temperature=1.0):
    """(logprobs, entropies) of ``tokens`` after ``prefix`` under softmax(logits / T)."""
    ids = torch.tensor([prefix + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prefix) - 1:-1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(1, torch.tensor(tokens)[:, None]).squeeze(1), ent


def assert_stops(comps, eos_id: int, newline: int, limit_of) -> None:
    """Every sample ends at its first EOS or step end, or runs to its prefix's length limit
    (``limit_of(prefix_index)``), and says which; at least one ended at a step end."""
    for c in comps:
        body = c.token_ids[:-1]
        assert newline not in body and eos_id not in body
        if c.finish_reason == "step_end":
            assert c.token_ids[-1] == newline
        elif c.finish_reason == "eos":
            assert c.token_ids[-1] == eos_id
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == limit_of(c.prefix_index)
    assert any(c.finish_reason == "step_end" for c in comps)
