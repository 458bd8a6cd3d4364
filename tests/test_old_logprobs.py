"""pi_old for the update (training/old_logprobs.py): the rollout's log-probs or the trainer's
recomputed ones, truncated importance weights, and the mismatch metrics a user sees in MLflow."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ibtpo_core.algo.losses import LossSpec, policy_loss
from ibtpo_core.algo.tree import TrainingSequence
from ibtpo_core.training.deepspeed_trainer import UpdateSpec, train_on_sequences
from ibtpo_core.training.old_logprobs import corrected, mismatch_sums
from tests.test_deepspeed_update import sequences

E = math.e


def test_truncated_importance_weights_scale_the_advantages():
    # rollout log-probs -1, -2; the trainer's -1, -1: weights exp(0) = 1 and exp(1) = e,
    # capped at 2 -> advantages 0.5 * 1 and -1.0 * 2; one of two tokens capped
    seq = TrainingSequence([7], [3, 4], [-1.0, -2.0], [0.5, -1.0], [1, 1], 1.0)
    fixed, sums = corrected(seq, [-1.0, -1.0], cap=2.0)
    assert fixed.old_logprobs == [-1.0, -1.0]
    assert fixed.advantages == pytest.approx([0.5, -2.0])
    assert sums == pytest.approx({"mismatch/is_weight_mean": 3.0, "mismatch/is_capped_frac": 1})
    plain, none = corrected(seq, [-1.0, -1.0], cap=0.0)  # cap 0: pi_old replaced, no weights
    assert plain.advantages == [0.5, -1.0] and none == {}
    with pytest.raises(ValueError, match="2 recomputed log-probs for a response of 1 tokens"):
        corrected(dataclasses.replace(seq, tokens=[3]), [-1.0, -1.0], 2.0)


def test_a_weight_folded_into_the_advantage_weights_the_clipped_surrogate():
    # w * min(r A, clip(r) A) = min(r wA, clip(r) wA) for w > 0, on every branch of the clip
    logp = torch.tensor([[-0.5, -1.0, -2.0, -0.1]])
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])  # ratios e^0.5, 1, e^-1, e^0.9
    adv = torch.tensor([[1.0, -1.0, -2.0, 0.5]])
    w = torch.tensor([[2.0, 0.5, 1.5, 1.0]])
    mask = torch.ones(1, 4)
    spec = LossSpec()
    folded, _ = policy_loss(logp, old, adv * w, mask, spec)
    r = torch.exp(logp - old)
    per_token = -torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
    assert float(folded) == pytest.approx(float((w * per_token).mean()), abs=1e-7)


def test_mismatch_metrics_are_token_shares_of_the_batch():
    # ratios exp(0) = 1 and exp(1) = e over a batch of 4 tokens (2 here): mean share
    # (1 + e) / 4, e lies outside [0.8, 1.2]: clip share 1 / 4, max e
    trainer = torch.tensor([[-1.0, -1.0, 0.0]])
    rollout = torch.tensor([[-1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third is not a response token
    got = mismatch_sums(trainer, rollout, mask, 0.2, 0.2, total_tokens=4)
    assert got == pytest.approx({"mismatch/ratio_mean": (1 + E) / 4, "mismatch/clipfrac": 0.25,
                                 "mismatch/ratio_max": E})


def shifted(seqs, by: float):
    """The same sequences as a rollout engine that disagrees with the trainer by ``by`` nats."""
    return [dataclasses.replace(s, old_logprobs=[x + by for x in s.old_logprobs]) for s in seqs]


def test_the_mismatch_is_logged_and_recompute_removes_it(tiny_model_dir, tmp_path):
    seqs = sequences(tiny_model_dir)  # old log-probs from the same fp32 model: no mismatch
    loss = LossSpec()
    same = train_on_sequences(tiny_model_dir, str(tmp_path / "same"), seqs, loss,
                              UpdateSpec(lr=1e-3))
    assert same["mismatch/ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # ratio 1 at step one
    assert same["mismatch/clipfrac"] == 0.0

    off = train_on_sequences(tiny_model_dir, str(tmp_path / "off"), shifted(seqs, 0.3), loss,
                        UpdateSpec(lr=1e-3))
    assert off["mismatch/ratio_mean"] == pytest.approx(math.exp(-0.3), abs=1e-5)
    assert off["mismatch/clipfrac"] == 1.0  # e^-0.3 = 0.74 < 0.8 on every token
    assert off["loss/total"] != pytest.approx(same["loss/total"], abs=1e-4)

    fixed = train_on_sequences(tiny_model_dir, str(tmp_path / "fixed"), shifted(seqs, 0.3), loss,
                          UpdateSpec(lr=1e-3, old_logprobs="recompute"))
    assert fixed["mismatch/ratio_mean"] == pytest.approx(math.exp(-0.3), abs=1e-5)
    assert fixed["loss/total"] == pytest.approx(same["loss/total"], abs=1e-5)  # as if none

    weighted = train_on_sequences(tiny_model_dir, str(tmp_path / "tis"), shifted(seqs, 0.3), loss,
                             UpdateSpec(lr=1e-3, old_logprobs="recompute", rollout_is_cap=2.0))
    # every weight is exp(-0.3): the pg term scales by it (mean |A|-weighted), nothing capped
    assert weighted["mismatch/is_weight_mean"] == pytest.approx(math.exp(-0.3), abs=1e-5)
    assert weighted["mismatch/is_capped_frac"] == 0.0
    assert weighted["loss/pg"] == pytest.approx(same["loss/pg"] * math.exp(-0.3), abs=1e-5)


def test_the_importance_cap_needs_the_recompute():
    with pytest.raises(ValueError, match="set old_logprobs: recompute"):
        UpdateSpec(rollout_is_cap=2.0)
