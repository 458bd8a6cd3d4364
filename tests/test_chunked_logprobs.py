"""The memory-bounded update (policy.response_logprobs, token-budget micro-batches, gradient
checkpointing) computes what the whole-vocabulary path computes: log-probs, entropies, the loss
and its gradients to 1e-5, on a tiny Qwen3-architecture model as well as the tiny Llama."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ibtpo_core.algo.losses import LossSpec, policy_loss
from ibtpo_core.algo.tree import TrainingSequence
from ibtpo_core.training.deepspeed_trainer import UpdateSpec, train_on_sequences
from ibtpo_core.training.micro_batches import rank_micro_batches
from ibtpo_core.training.policy import collate, response_logprobs, token_logprobs
from tests.test_deepspeed_update import sequences


def qwen3_tiny(vocab: int = 1000):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, max_position_embeddings=256, tie_word_embeddings=False)
    return Qwen3ForCausalLM(cfg)


def batch_of(vocab: int, lengths=((5, 7), (3, 11), (8, 2))):
    g = torch.Generator().manual_seed(1)
    seqs = []
    for p, n in lengths:
        prompt = torch.randint(1, vocab, (p,), generator=g).tolist()
        toks = torch.randint(1, vocab, (n,), generator=g).tolist()
        adv = torch.randn(n, generator=g).tolist()
        seqs.append(TrainingSequence(prompt, toks, [-1.0] * n, adv, [1] * n, 0.0))
    return collate(seqs, 0)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("build", ["qwen3", "llama"])
def test_chunked_logprobs_entropies_loss_and_gradients_equal_the_whole_vocabulary(
        build, chunk, tiny_model_dir):
    model = qwen3_tiny() if build == "qwen3" else AutoModelForCausalLM.from_pretrained(
        tiny_model_dir)
    vocab = model.config.vocab_size
    batch = batch_of(vocab)
    loss_spec = LossSpec(entropy_coef=0.01)  # the entropy's gradient is part of the check

    def loss_and_grads(fn):
        model.zero_grad()
        lp, ent = fn()
        value, _ = policy_loss(lp, batch.old_logprobs, batch.advantages, batch.response_mask,
                               loss_spec, entropy=ent)
        value.backward()
        return lp.detach(), ent.detach(), value.detach(), {
            k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    full = loss_and_grads(lambda: token_logprobs(model, batch, 0.7))
    part = loss_and_grads(lambda: response_logprobs(model, batch, 0.7, chunk, entropy_grad=True))
    mask = batch.response_mask.bool()
    torch.testing.assert_close(part[0][mask], full[0][mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(part[1][mask], full[1][mask], atol=1e-5, rtol=0)
    assert float((part[0][~mask]).abs().sum()) == 0.0  # nothing outside the response
    torch.testing.assert_close(part[2], full[2], atol=1e-5, rtol=0)
    assert full[3].keys() == part[3].keys()
    for k in full[3]:
        torch.testing.assert_close(part[3][k], full[3][k], atol=1e-5, rtol=1e-4, msg=k)


def test_entropy_carries_no_gradient_unless_its_coefficient_asks(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = batch_of(model.config.vocab_size)
    lp, ent = response_logprobs(model, batch, 1.0, 4, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    assert response_logprobs(model, batch, 1.0, 4, entropy_grad=True)[1].requires_grad


class Seq:
    def __init__(self, n):
        self.prompt, self.tokens = [0] * 2, [0] * (n - 2)

    def __repr__(self):
        return f"Seq({len(self.prompt) + len(self.tokens)})"


def test_token_budget_micro_batches_group_by_length():
    # lengths 10, 3, 9, 4, 8 on one rank, budget 20 padded tokens, at most 4 a micro-batch:
    # longest first 10, 9 (2 x 10 = 20 fits), 8 (3 x 10 = 30 does not) -> [10, 9], [8, 4]
    # (2 x 8 = 16), then 3 (3 x 8 = 24 > 20) -> [3]
    seqs = [Seq(n) for n in (10, 3, 9, 4, 8)]
    got = rank_micro_batches(seqs, 0, 1, 4, max_tokens=20)
    assert [[len(s.prompt) + len(s.tokens) for s in c] for c, _ in got] == [[10, 9], [8, 4], [3]]
    assert all(w == 1.0 for _, w in got)
    # two ranks: shards [10, 9, 8] and [3, 4]; rank 0 needs [10, 9], [8]: 2; rank 1 [4, 3]: 1,
    # then its shortest sequence again with weight 0, so both run 2 micro-batches
    r1 = rank_micro_batches(seqs, 1, 2, 4, max_tokens=20)
    assert [([len(s.prompt) + len(s.tokens) for s in c], w) for c, w in r1] == [
        ([4, 3], 1.0), ([3], 0.0)]
    assert len(rank_micro_batches(seqs, 0, 2, 4, max_tokens=20)) == 2
    # one sequence over the budget still trains, alone
    assert [len(c) for c, _ in rank_micro_batches([Seq(50), Seq(5)], 0, 1, 4, 20)] == [1, 1]


def test_the_memory_settings_leave_the_update_unchanged(tiny_model_dir, tmp_path):
    seqs = sequences(tiny_model_dir)
    loss = LossSpec()
    old = train_on_sequences(tiny_model_dir, str(tmp_path / "old"), seqs, loss,
                        UpdateSpec(lr=1e-3, micro_batch_size=4, logprob_chunk_tokens=0))
    new = train_on_sequences(tiny_model_dir, str(tmp_path / "new"), seqs, loss,
                        UpdateSpec(lr=1e-3, micro_batch_size=4, logprob_chunk_tokens=5,
                                   gradient_checkpointing=True, max_tokens_per_micro_batch=24))
    assert new["num_tokens"] == old["num_tokens"] == 42
    assert new["loss/total"] == pytest.approx(old["loss/total"], abs=1e-5)
    # 1e-5, not the 2e-6 of two launches of one path: gradients agree to 1e-5 (above), and
    # AdamW's first step, about lr * g / |g|, magnifies their float differences in weights whose
    # gradient is near zero (measured: 6.8e-6 at most)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "old").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "new").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)


LOAD = r"""
import json, sys
import torch
from ibtpo_core.training.deepspeed_trainer import (_ensure_dist_env, init_process_group,
                                                   load_for_training)
_ensure_dist_env()
init_process_group()
model, keep = load_for_training(sys.argv[1], json.loads(sys.argv[2]))
p = next(model.parameters())
print(json.dumps({"dtype": str(p.dtype), "partitioned": hasattr(p, "ds_id"),
                  "placeholder_numel": p.numel(),
                  "held": int(getattr(p, "ds_numel", p.numel()))}))
"""


@pytest.mark.parametrize("ds, dtype, partitioned", [
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "torch.bfloat16", False),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}, "torch.float32", False),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
      "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}, "torch.float32",
     True),
])
def test_the_policy_loads_in_the_training_dtype_and_partitioned_under_zero3(
        tiny_model_dir, ds, dtype, partitioned):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", LOAD, tiny_model_dir, json.dumps(ds)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["dtype"] == dtype and got["partitioned"] == partitioned
    if partitioned:  # the module holds an empty placeholder; DeepSpeed holds the shard
        assert got["placeholder_numel"] == 0 and got["held"] > 0
