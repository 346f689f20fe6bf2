"""Unit tests for slmrl_ray.rl_math against numbers worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slmrl_ray import rl_math as rm


def close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ----------------------------------------------------------------- masked stats


def test_masked_mean_ignores_padding_and_empty_mask_is_zero() -> None:
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # (1 + 3) / 2 = 2 over everything; row 1 has no tokens -> 0, not NaN.
    assert rm.masked_mean(x, mask).item() == pytest.approx(2.0)
    close(rm.masked_mean(x, mask, dim=1), [2.0, 0.0])


def test_masked_var_unbiased_and_biased() -> None:
    x = torch.tensor([2.0, 4.0, 6.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # mean 4; squared deviations 4, 0, 4 -> biased 8/3, unbiased 8/2 = 4.
    assert rm.masked_var(x, mask).item() == pytest.approx(4.0)
    assert rm.masked_var(x, mask, unbiased=False).item() == pytest.approx(8 / 3)


def test_masked_whiten_ignores_padding() -> None:
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 4, unbiased std 2 -> (x - 4) / 2 = [-1, 0, 1]; the pad's 100 is ignored and output 0.
    close(rm.masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)
    # shift_mean=False adds the mean back: [-1, 0, 1] + 4 = [3, 4, 5].
    close(rm.masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 5.0, 0.0]], atol=1e-6)


# ------------------------------------------------------------ logits functions


def test_logprobs_from_logits_float32_even_for_bf16() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[1, 0]])
    out = rm.logprobs_from_logits(logits, labels)
    close(out, [[math.log(0.75), math.log(0.25)]])
    out_bf16 = rm.logprobs_from_logits(logits.to(torch.bfloat16), labels)
    assert out_bf16.dtype == torch.float32 and out_bf16.shape == (1, 2)


def test_entropy_from_logits() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]])
    # uniform over 4 -> ln 4; [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(rm.entropy_from_logits(logits), [[math.log(4.0), h]], atol=1e-5)


# ----------------------------------------------------------- rewards and GAE


def test_kl_penalty_rewards_score_at_last_real_token() -> None:
    scores = torch.tensor([2.0, -1.0, 5.0])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 7.0], [-1.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 3.0], [-1.0, -1.0, -1.0, -2.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    rewards, kl = rm.kl_penalty_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # row 0: kl = [0.5, -1.0, 0.0, pad->0]; -0.1*kl = [-0.05, 0.1, 0, 0]; score 2 at t=2 (last real).
    # row 1: kl = [0, 0, 0, 1.0]; -0.1*kl = [0, 0, 0, -0.1]; score -1 at t=3 -> -1.1.
    # row 2: no response tokens -> kl 0 and the score 5 is not added anywhere.
    close(kl, [[0.5, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0, 0.0], [0.0, 0.0, 0.0, -1.1], [0.0, 0.0, 0.0, 0.0]])


def test_gae_three_tokens_by_hand() -> None:
    # gamma = 1, lam = 0.95; row 0 full, row 1 right-padded with garbage in the pad slot.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = rm.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0:
    #   t=2: delta = 1 + 1*0 - 0.7 = 0.3;            A2 = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1;            A1 = 0.1 + 0.95*0.3   = 0.385
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1;            A0 = 0.1 + 0.95*0.385 = 0.46575
    #   returns = A + V = [0.96575, 0.985, 1.0]
    # row 1 (t=2 is padding: its value 9 and reward 5 must be ignored; V after t=1 is 0):
    #   t=1: delta = 1 + 0 - 0.6 = 0.4;              A1 = 0.4
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1;            A0 = 0.1 + 0.95*0.4 = 0.48
    #   returns = [0.98, 1.0, 0]
    close(adv, [[0.46575, 0.385, 0.3], [0.48, 0.4, 0.0]])
    close(ret, [[0.96575, 0.985, 1.0], [0.98, 1.0, 0.0]])


def test_gae_discounting() -> None:
    # gamma = 0.5, lam = 1 -> A_t = discounted return - V_t.
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[0.0, 0.0]])
    adv, _ = rm.gae_advantages(rewards, values, torch.ones(1, 2), gamma=0.5, lam=1.0)
    # A1 = 2; A0 = 1 + 0.5*0 - 0 + 0.5*1*2 = 2
    close(adv, [[2.0, 2.0]])


# ------------------------------------------------------------------- losses


def _policy_example() -> tuple[torch.Tensor, ...]:
    # tokens: (ratio 1.5, A= 1) (ratio 0.9, A=-2) (ratio 1.5, A=-1) + one pad with garbage
    old = torch.zeros(1, 4)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.9), math.log(1.5), 3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, -1.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    return logprobs, old, adv, mask


def test_policy_loss_clipped_and_unclipped_tokens() -> None:
    logprobs, old, adv, mask = _policy_example()
    stats = rm.policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    # token 0: -A*r = -1.5, -A*clip(r) = -1.2 -> max -1.2  (clipped)
    # token 1: -A*r =  1.8, -A*clip(r) =  1.8 -> 1.8       (ratio inside [0.8, 1.2])
    # token 2: -A*r =  1.5, -A*clip(r) =  1.2 -> 1.5       (clip would help, so unclipped)
    # loss = (-1.2 + 1.8 + 1.5) / 3 = 0.7; clip fraction 1/3; ratio mean (1.5+0.9+1.5)/3 = 1.3
    assert stats.loss.item() == pytest.approx(0.7, abs=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(1 / 3)
    assert stats.ratio_mean.item() == pytest.approx(1.3, abs=1e-6)
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + math.log(0.9) ** 2) / 3
    assert stats.approx_kl.item() == pytest.approx(expected_kl, abs=1e-6)
    stats.loss.backward()
    # d/dlogp of (-A*r)/3 = -A*r/3: token 0 clipped -> 0; token 1: 2*0.9/3 = 0.6; token 2: 1.5/3 = 0.5; pad 0
    close(logprobs.grad, [[0.0, 0.6, 0.5, 0.0]])
    assert not stats.clip_fraction.requires_grad


def test_policy_loss_gradient_zero_where_clipped_in_advantage_direction() -> None:
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(8, 64, generator=gen)
    logprobs = (old + 0.5 * torch.randn(8, 64, generator=gen)).requires_grad_(True)
    adv = torch.randn(8, 64, generator=gen)
    mask = (torch.rand(8, 64, generator=gen) > 0.2).long()
    eps = 0.2
    rm.policy_loss(logprobs, old, adv, mask, eps).loss.backward()
    ratio = torch.exp(logprobs.detach() - old)
    clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    assert clipped.any() and (~clipped).any()
    assert torch.all(logprobs.grad[clipped] == 0)
    assert torch.all(logprobs.grad[mask == 0] == 0)
    active = ~clipped & (mask == 1) & (adv != 0)
    assert torch.all(logprobs.grad[active] != 0)


def test_value_loss_clipping() -> None:
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[1.5, 1.1, 1.5, 42.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    stats = rm.value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: v_clip = 1.2; (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 (clipped)
    # token 1: v_clip = 1.1; both 0.81                           -> 0.81
    # token 2: v_clip = 1.2; (1.5-0)^2 = 2.25, (1.2-0)^2 = 1.44  -> 2.25 (unclipped)
    # loss = 0.5 * (0.64 + 0.81 + 2.25) / 3 = 0.61666...
    assert stats.loss.item() == pytest.approx(0.5 * 3.7 / 3, abs=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(1 / 3)
    stats.loss.backward()
    # token 0 clipped -> no gradient; token 1: 0.5*2*(1.1-2)/3 = -0.3; token 2: 0.5*2*1.5/3 = 0.5
    close(values.grad, [[0.0, -0.3, 0.5, 0.0]])


# ------------------------------------------------------------- controllers


def test_adaptive_kl_controller_update_is_clipped() -> None:
    ctl = rm.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # 10/6 - 1 = 0.667 > 0.2 -> clipped to 0.2: 0.2 * (1 + 0.2*64/10000) = 0.200256
    ctl.update(current_kl=10.0, n_steps=64)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000), rel=1e-12)
    # 3/6 - 1 = -0.5 -> clipped to -0.2
    before = ctl.value
    ctl.update(current_kl=3.0, n_steps=64)
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 64 / 10000), rel=1e-12)
    # 6.6/6 - 1 = 0.1 -> not clipped
    before = ctl.value
    ctl.update(current_kl=6.6, n_steps=100)
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 100 / 10000), rel=1e-12)


def test_kl_controllers_state_roundtrip() -> None:
    ctl = rm.AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(10.0, 64)
    other = rm.AdaptiveKLController(1.0, 1.0, 1.0)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.state_dict() == ctl.state_dict()
    fixed = rm.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    fixed2 = rm.FixedKLController(1.0)
    fixed2.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert fixed2.value == 0.05


def test_running_moments_two_batches_equal_concatenation() -> None:
    moments = rm.RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    # [1..5]: mean 3, sample var (4+1+0+1+4)/4 = 2.5
    assert moments.count == 5
    assert moments.mean == pytest.approx(3.0)
    assert moments.std == pytest.approx(math.sqrt(2.5))
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(17, generator=gen) * 3 + 1, torch.randn(5, generator=gen) - 4
    moments = rm.RunningMoments()
    moments.update(a)
    moments.update(b)
    both = torch.cat([a, b]).double()
    assert moments.mean == pytest.approx(both.mean().item(), rel=1e-12)
    assert moments.std == pytest.approx(both.std().item(), rel=1e-12)
    restored = rm.RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(moments.state_dict())))
    assert (restored.mean, restored.std, restored.count) == (moments.mean, moments.std, moments.count)


def test_normalize_scores_clips_at_three() -> None:
    moments = rm.RunningMoments()
    moments.update(torch.tensor([-1.0, 0.0, 1.0]))  # mean 0, sample std 1
    out = rm.normalize_scores(torch.tensor([0.5, 10.0, -10.0]), moments, clip=3.0)
    close(out, [0.5, 3.0, -3.0], atol=1e-6)


def test_is_finite() -> None:
    assert rm.is_finite(torch.ones(3), torch.zeros(2, 2))
    assert not rm.is_finite(torch.ones(3), torch.tensor([1.0, float("nan")]))
    assert not rm.is_finite(torch.tensor([float("inf")]))


def test_masked_mean_ignores_inf_and_nan_at_masked_positions() -> None:
    """inf * 0 is NaN: masking must select, not multiply."""
    x = torch.tensor([[1.0, 3.0, -math.inf], [2.0, math.nan, math.inf]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert rm.masked_mean(x, mask).item() == pytest.approx(2.0)
    close(rm.masked_mean(x, mask, dim=1), [2.0, 2.0])
    rewards, kl = rm.kl_penalty_rewards(torch.tensor([1.0]), torch.tensor([[-1.0, -math.inf]]),
                                        torch.tensor([[-1.5, -2.0]]), torch.tensor([[1, 0]]), kl_coef=0.1)
    assert torch.isfinite(rewards).all() and torch.isfinite(kl).all()
    close(kl, [[0.5, 0.0]])


def test_normalize_scores_floors_the_std_of_a_flat_reward() -> None:
    moments = rm.RunningMoments()
    flat = torch.tensor([1.0, 1.0001, 0.9999, 1.0])  # std ~8e-5: noise, not signal
    moments.update(flat)
    out = rm.normalize_scores(flat, moments, clip=3.0, min_std=1e-2)
    assert out.abs().max().item() < 0.011  # without the floor these would be about +-1.2
    close(rm.normalize_scores(flat, moments, clip=3.0, min_std=0.0), (flat - 1.0) / moments.std, atol=1e-4)
