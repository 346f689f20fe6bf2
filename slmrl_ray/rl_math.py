"""The one home of the PPO / RLHF math: small, pure tensor functions.

Model-free, in the style of torchtune / verl "core_algos". Shapes: B = batch
of sequences, T = response length (response tokens only, right-padded),
V = vocabulary. ``response_mask`` [B, T] is 1 on real response tokens
(including the EOS that ends a response) and 0 on padding after it.

Inputs are never detached here: the caller decides what runs under
``torch.no_grad()``. Diagnostic statistics returned next to a loss are
detached so logging them never keeps a graph alive.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController", "FixedKLController", "PolicyLossStats", "RunningMoments",
    "ValueLossStats", "entropy_from_logits", "gae_advantages", "is_finite", "kl_penalty_rewards",
    "logprobs_from_logits", "masked_mean", "masked_var", "masked_whiten", "normalize_scores",
    "penalize_short_responses", "policy_loss", "value_loss",
]


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    Args:
        x: [...] values.
        mask: [...] same shape as ``x``; 1 keeps, 0 drops (float weights work).
        dim: reduce over this dim only; ``None`` reduces over everything.

    Returns:
        Scalar tensor (``dim=None``) or ``x`` reduced over ``dim``. A slice
        with an empty mask gives 0 rather than NaN, so a fully padded row can
        never poison a loss.
    """
    mask = mask.to(x.dtype)
    # Select rather than multiply: inf * 0 is NaN, so padding that holds garbage (a
    # logprob of -inf at a masked slot, say) would poison the sum. The shape stays static.
    weighted = torch.where(mask != 0, x * mask, torch.zeros_like(x))
    num = weighted.sum() if dim is None else weighted.sum(dim=dim)
    den = mask.sum() if dim is None else mask.sum(dim=dim)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked elements (all dims), a scalar tensor.

    Args:
        x: [...] values.
        mask: [...] same shape as ``x``.
        unbiased: apply Bessel's correction n / (n - 1). With fewer than two
            masked elements the correction is undefined and skipped (the
            variance is then 0), instead of raising inside a training step.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.to(x.dtype).sum()
        if count > 1:
            var = var * count / (count - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Standardise ``x`` with mean/variance taken over masked elements only.

    Args:
        x: [...] values, e.g. advantages [B, T].
        mask: [...] same shape as ``x``.
        shift_mean: if False the mean is added back (only the scale changes),
            the convention used when whitening rewards.

    Returns:
        [...] whitened values; exactly 0 where ``mask`` is 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of ``labels`` under ``logits``.

    Args:
        logits: [B, T, V] (any float dtype).
        labels: [B, T] token ids.

    Returns:
        [B, T] float32 log-probabilities. bf16 log-softmax loses enough
        precision to bias the PPO ratio, so we always compute in float32.
    """
    logits = logits.float()
    picked = torch.gather(logits, dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)
    # gather - logsumexp == log_softmax gathered, without a second [B,T,V] buffer.
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution given by ``logits``.

    Args:
        logits: [B, T, V] (any float dtype).

    Returns:
        [B, T] float32 entropy in nats: logsumexp(z) - sum softmax(z) * z.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def kl_penalty_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: KL penalty everywhere plus the score at the end.

    Args:
        scores: [B] sequence-level reward-model scores (already normalised).
        logprobs: [B, T] policy log-probs of the sampled response tokens.
        ref_logprobs: [B, T] reference-model log-probs of the same tokens.
        response_mask: [B, T].
        kl_coef: weight of the KL penalty (beta).

    Returns:
        rewards: [B, T] ``-kl_coef * kl`` with ``scores[b]`` added at the last
            real response token of row b. A row without any response token
            receives no score anywhere (there is no action to credit).
        kl: [B, T] the "k1" estimate ``logprobs - ref_logprobs``, 0 on padding.
    """
    mask = response_mask.to(logprobs.dtype)
    kl = torch.where(mask != 0, (logprobs - ref_logprobs) * mask, torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[-1], device=mask.device, dtype=mask.dtype)
    # argmax of mask * position finds the last real token even if the mask has
    # holes; rows with an empty mask point at 0 and are zeroed via has_token.
    last = (mask * positions).argmax(dim=-1)
    has_token = mask.sum(dim=-1) > 0
    bonus = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards = rewards.index_put((rows, last), bonus, accumulate=True)
    return rewards, kl


def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), backwards in t.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    with V and A after the last real token taken as 0.

    Args:
        rewards: [B, T] per-token rewards (e.g. from ``kl_penalty_rewards``).
        values: [B, T] value estimates from the rollout (old values).
        response_mask: [B, T].
        gamma: discount.
        lam: GAE lambda.

    Returns:
        advantages: [B, T], 0 where the mask is 0. Not whitened: whitening is
            a separate ``masked_whiten`` call so the caller controls it.
        returns: [B, T] ``advantages + values`` (value targets), 0 on padding.
    """
    mask = response_mask.to(values.dtype)
    batch, length = values.shape
    next_value = values.new_zeros(batch)
    next_adv = values.new_zeros(batch)
    reversed_adv = []
    for t in reversed(range(length)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        # Masked positions pass the running values through untouched, so
        # garbage in padded values/rewards never leaks into real tokens.
        next_value = values[:, t] * m + next_value * (1 - m)
        next_adv = adv_t * m + next_adv * (1 - m)
        reversed_adv.append(next_adv)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


class PolicyLossStats(NamedTuple):
    """Output of ``policy_loss``; all but ``loss`` are detached scalars."""

    loss: Tensor
    clip_fraction: Tensor
    ratio_mean: Tensor
    approx_kl: Tensor


class ValueLossStats(NamedTuple):
    """Output of ``value_loss``; ``clip_fraction`` is a detached scalar."""

    loss: Tensor
    clip_fraction: Tensor


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_range: float,
) -> PolicyLossStats:
    """PPO clipped surrogate objective (Schulman et al. 2017), as a loss.

    loss = masked_mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))),
    r = exp(logprobs - old_logprobs).

    Args:
        logprobs: [B, T] current policy log-probs (carry gradients).
        old_logprobs: [B, T] rollout-time log-probs.
        advantages: [B, T].
        response_mask: [B, T].
        clip_range: epsilon.

    Returns:
        PolicyLossStats with scalar ``loss``; ``clip_fraction`` = share of
        tokens where the clipped term was chosen; ``ratio_mean`` = masked mean
        ratio (the caller skips mini-batches above its ratio threshold);
        ``approx_kl`` = 0.5 * masked_mean((logprobs - old_logprobs) ** 2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), response_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), response_mask)
        ratio_mean = masked_mean(ratio, response_mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, response_mask)
    return PolicyLossStats(loss, clip_fraction, ratio_mean, approx_kl)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    clip_range_value: float,
) -> ValueLossStats:
    """Clipped value loss: 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2)).

    v_clip = clip(v, old - eps, old + eps) keeps the value head from moving
    further than eps per update, pessimistically as in the policy loss.

    Args:
        values: [B, T] current value predictions (carry gradients).
        old_values: [B, T] rollout-time value predictions.
        returns: [B, T] targets from ``gae_advantages``.
        response_mask: [B, T].
        clip_range_value: epsilon for the value clip.

    Returns:
        ValueLossStats(scalar loss, detached clip_fraction).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    err_unclipped = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), response_mask)
    with torch.no_grad():
        clip_fraction = masked_mean((err_clipped > err_unclipped).to(values.dtype), response_mask)
    return ValueLossStats(loss, clip_fraction)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").

    The coefficient moves towards whatever keeps the observed KL near
    ``target``; the proportional error is clipped to +-0.2 so one noisy batch
    cannot change it by more than 20% * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update after ``n_steps`` samples (usually the batch size) with mean KL ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """JSON-serialisable state."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from ``state_dict()`` output."""
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class FixedKLController:
    """Constant KL coefficient with the ``AdaptiveKLController`` interface."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        """JSON-serialisable state."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from ``state_dict()`` output."""
        self.value = float(state["value"])


class RunningMoments:
    """Running mean / std of scalar scores across batches.

    Batches are merged with the parallel algorithm of Chan et al. (1979), in
    float64 python floats, so the result equals the statistics of the
    concatenation of all batches seen. ``std`` is the sample std (ddof=1,
    like ``torch.std``); it is 0 until two values have been seen.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.count = 0

    @property
    def var(self) -> float:
        """Sample variance (ddof=1); 0.0 with fewer than two values."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1)."""
        return math.sqrt(self.var)

    def update(self, x: Tensor) -> None:
        """Fold a batch of scores ``x`` [B] into the running statistics."""
        values = x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        n_b = values.numel()
        if n_b == 0:
            return
        mean_b = values.mean().item()
        m2_b = ((values - mean_b) ** 2).sum().item()
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta**2 * self.count * n_b / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        """JSON-serialisable state."""
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from ``state_dict()`` output."""
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.count = int(state["count"])


def normalize_scores(scores: Tensor, moments: RunningMoments, clip: float, min_std: float = 1e-2) -> Tensor:
    """Running score normalisation then clipping: the study's +-3 clip.

    The caller must ``moments.update(scores)`` first, so the current batch is
    part of the statistics (otherwise the first batch divides by std 0).

    Args:
        scores: [B] raw reward-model scores.
        moments: running statistics, already updated with ``scores``.
        clip: clip bound; output lies in [-clip, clip].
        min_std: floor of the divisor. A flat reward (every response scored
            alike, std ~1e-4) would otherwise blow noise up into +-clip
            "signal"; with the floor, differences smaller than it stay small.

    Returns:
        [B] normalised, clipped scores, same dtype as ``scores``.
    """
    normalized = (scores - moments.mean) / max(moments.std, min_std)
    return normalized.clamp(-clip, clip)


def penalize_short_responses(
    normalized: Tensor, short: Tensor, penalty: float
) -> Tensor:
    """Replace the normalised score of short or empty responses by a fixed penalty.

    lm-human-preferences' ``penalty_reward_value`` and torchtune's ``reward_penalty``:
    a reward model never trained on empty or fragment answers scores them by
    accident, and under a per-token KL penalty ending early always pays, so a
    policy drifts to them unless they cost a known amount. The caller keeps these
    scores out of the running statistics.

    Args:
        normalized: [B] normalised scores.
        short: [B] bool, True where the response is too short (or empty).
        penalty: the score given to those responses.

    Returns:
        [B] scores, ``penalty`` where ``short``.
    """
    return torch.where(short, torch.full_like(normalized, penalty), normalized)


def is_finite(*tensors: Tensor) -> bool:
    """True if every element of every tensor is finite (syncs with the device)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)
