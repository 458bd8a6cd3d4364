"""The clipped surrogate with hand-worked numbers, its gradient, clipping band and metrics."""
import math

import pytest
import torch

from ibtpo_core.algo.losses import LossSpec, kl_k3, policy_loss


def one_token(ratio, adv, spec=None):
    spec = spec or LossSpec()
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, m = policy_loss(logp, old, torch.tensor([[adv]]), torch.ones(1, 1), spec)
    loss.backward()
    return float(loss), m, float(logp.grad)


def test_hand_worked_clipping():
    # r = 1.5, A = 1: min(1.5, clip(1.5) = 1.2) = 1.2 -> loss -1.2, clipped above, no gradient
    loss, m, g = one_token(1.5, 1.0)
    assert loss == pytest.approx(-1.2) and g == 0.0
    assert (
        m["loss/clipfrac"] == 1.0
        and m["clip_ratio/high_mean"] == 1.0
        and m["clip_ratio/low_mean"] == 0.0
    )
    # r = 1.5, A = -1: min(-1.5, -1.2) = -1.5 -> loss 1.5; the unclipped term keeps the gradient
    loss, m, g = one_token(1.5, -1.0)
    assert loss == pytest.approx(1.5) and m["loss/clipfrac"] == 0.0 and g == pytest.approx(1.5)
    # r = 0.5, A = -1: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped below
    loss, m, g = one_token(0.5, -1.0)
    assert loss == pytest.approx(0.8) and g == 0.0
    assert m["clip_ratio/low_mean"] == 1.0 and m["loss/clipfrac"] == 1.0
    # inside the band the gradient is -A * r: r = 1.1, A = 1 -> d loss / d logp = -1.1
    loss, m, g = one_token(1.1, 1.0)
    assert loss == pytest.approx(-1.1) and g == pytest.approx(-1.1) and m["loss/clipfrac"] == 0.0


def test_clip_higher_widens_only_the_upper_band():
    # eps_high = 0.28: r = 1.25 is inside the band now
    loss, m, g = one_token(1.25, 1.0, LossSpec(eps_high=0.28))
    assert loss == pytest.approx(-1.25) and g == pytest.approx(-1.25)
    loss, m, g = one_token(1.25, 1.0)
    assert loss == pytest.approx(-1.2) and g == 0.0


def test_token_mean_over_the_mask_and_zero_advantage_gives_zero_gradient():
    old = torch.zeros(2, 3)
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 0.0, 5.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, m = policy_loss(logp, old, adv, mask, LossSpec())
    # r = 1 everywhere: loss = -(1 + 0 - 2 + 0 + 0) / 5 = 0.2 (the masked 5.0 is ignored)
    assert float(loss) == pytest.approx(0.2)
    loss.backward()
    assert logp.grad[0, 1] == 0 and logp.grad[1, 1] == 0 and logp.grad[0, 2] == 0
    assert logp.grad[0, 0] == pytest.approx(-1 / 5)


def test_k3_kl_and_entropy_bonus():
    # logp = ln 0.5, ref = ln 0.25: d = ln 0.5; k3 = 0.5 - ln 0.5 - 1 = ln 2 - 0.5
    v = kl_k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))
    assert float(v) == pytest.approx(math.log(2) - 0.5)
    logp = torch.full((1, 2), math.log(0.5))
    ent = torch.tensor([[1.0, 3.0]])
    spec = LossSpec(beta_kl=0.1, entropy_coef=0.01)
    loss, m = policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), spec,
                          ref_logprobs=torch.full((1, 2), math.log(0.25)), entropy=ent)
    # pg 0 + 0.1 * (ln 2 - 0.5) - 0.01 * mean(1, 3)
    assert float(loss) == pytest.approx(0.1 * (math.log(2) - 0.5) - 0.02, abs=1e-6)
    assert m["kl"] == pytest.approx(math.log(2) - 0.5) and m["entropy"] == pytest.approx(2.0)
    assert m["loss/approx_kl"] == pytest.approx(0.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eps_low=1.2), "eps_low must be in"), (dict(eps_high=-0.1), "eps_high must be >= 0"),
    (dict(beta_kl=-1), "beta_kl must be >= 0"),
    (dict(name="ppo"), "Valid names: cispo, gspo, ppo_clip"),
])
def test_bad_loss_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossSpec(**kwargs)


def test_hand_worked_cispo_keeps_the_gradient_where_the_clip_drops_it():
    spec = LossSpec(name="cispo", eps_high=0.28)
    # r = 1.5, A = 1: the weight is truncated at 1.28 and held constant; loss = -1.28 A logp with
    # logp = -1 + ln 1.5; the gradient is -1.28 (ppo_clip's is 0 here: the clip binds)
    loss, m, g = one_token(1.5, 1.0, spec)
    assert loss == pytest.approx(-1.28 * (-1.0 + math.log(1.5)))
    assert g == pytest.approx(-1.28) and m["clip_ratio/high_mean"] == 1.0
    assert one_token(1.5, 1.0, LossSpec(eps_high=0.28))[2] == 0.0
    # r = 0.5, A = -1: no lower truncation, weight 0.5: gradient +0.5 (ppo_clip: 0, clipped below)
    loss, m, g = one_token(0.5, -1.0, spec)
    assert g == pytest.approx(0.5) and m["loss/clipfrac"] == 0.0
    assert one_token(0.5, -1.0, LossSpec(eps_high=0.28))[2] == 0.0
    # inside the band both give -A r: r = 1.1, A = 1
    assert one_token(1.1, 1.0, spec)[2] == pytest.approx(-1.1)
    assert one_token(1.1, 1.0, LossSpec(eps_high=0.28))[2] == pytest.approx(-1.1)


def test_hand_worked_gspo_gives_a_sequence_one_ratio_and_one_clip():
    # one sequence of two tokens, ratios 1.2 and 0.9, A = 1, a third position masked out
    old = torch.full((1, 3), -1.0)
    ratios = torch.tensor([[1.2, 0.9, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])

    def grads(spec):
        logp = (old + ratios.log()).requires_grad_(True)
        loss, m = policy_loss(logp, old, torch.ones(1, 3), mask, spec)
        loss.backward()
        return float(loss), m, logp.grad[0].tolist()

    # s = exp((ln 1.2 + ln 0.9) / 2) = sqrt(1.08) = 1.03923, inside the band: loss -s; each
    # token's gradient -s / 2 (token-level ppo_clip: its own -r_t / 2, -0.6 and -0.45)
    loss, m, g = grads(LossSpec(name="gspo"))
    assert loss == pytest.approx(-math.sqrt(1.08))
    assert g == pytest.approx([-math.sqrt(1.08) / 2] * 2 + [0.0])
    assert grads(LossSpec())[2] == pytest.approx([-0.6, -0.45, 0.0])
    # GSPO's own band (3e-4, 4e-4): s = 1.039 > 1.0004 with A > 0, so the whole sequence is
    # clipped and neither token moves, though token 2's ratio (0.9) would not be clipped above
    loss, m, g = grads(LossSpec(name="gspo", eps_low=3e-4, eps_high=4e-4))
    assert loss == pytest.approx(-1.0004) and g == [0.0, 0.0, 0.0]
    assert m["clip_ratio/high_mean"] == 1.0 and m["loss/clipfrac"] == 1.0
