"""GRPO / DAPO objective: group-relative advantages, dynamic sampling, the clipped policy loss, KL, overlong penalty.

Pure tensor functions (no model, no rollout), so each is checked against hand-computed numbers (tests/test_grpo.py);
the RL loop (issue 9: rollouts, rewards, ``sftforge rl``) is built on them.

Conventions: a prompt's ``n`` responses form a group; rewards are [groups, n]. Per-token tensors are flat over the
trained (response) tokens of a micro-batch, like the SFT loss: ``logp`` is log π(token) at each trained position,
``advantages`` the advantage of the token's response. Tool/observation tokens are not trained tokens (same mask rule as
SFT), so they never enter these tensors.

Loss aggregation is token-level (DAPO): the SUM over tokens of the per-token loss, divided by the GLOBAL number of
trained tokens of the step, exactly like the SFT cross-entropy — so long and short responses weigh per token, and
1 process == N processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Reward minus its group's mean, divided by the group's standard deviation (unbiased, as in GRPO) when
    ``scale_by_std``; rewards [groups, n] -> advantages [groups, n]. A group whose rewards are all equal gets 0."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, responses per prompt], got shape {tuple(rewards.shape)}.")
    r = rewards.to(torch.float64)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = r.std(dim=1, keepdim=True, unbiased=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def informative_groups(rewards: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """Dynamic sampling (DAPO): True for groups whose rewards are not all equal (all-equal groups have zero advantage
    and only dilute the batch)."""
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    return spread > atol


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment added to the reward: 0 up to ``max_length - buffer`` tokens, then falling
    linearly to ``-factor`` at ``max_length``, and ``-factor`` beyond."""
    if buffer <= 0:
        return torch.where(lengths > max_length, -factor, 0.0).to(torch.float32)
    start = max_length - buffer
    ramp = (start - lengths.to(torch.float32)) / buffer * factor
    out = torch.where(lengths <= start, torch.zeros_like(ramp), ramp)
    return out.clamp(min=-factor)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate "k3": exp(r) - r - 1 with r = log π_ref - log π (>= 0, unbiased)."""
    r = logp_ref - logp
    return torch.exp(r) - r - 1


@dataclass
class PolicyLossStats:
    tokens: int
    clipped_tokens: int
    """Tokens whose clipped branch was taken (the ratio left [1 - low, 1 + high] in the direction of the advantage)."""
    ratio_mean: float
    kl_sum: float


def policy_loss_sum(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_coef: float = 0.0,
    logp_ref: torch.Tensor | None = None,
    clip_c: float = 0.0,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """SUM over tokens of the clipped surrogate loss ``-min(ρ·A, clip(ρ, 1 - low, 1 + high)·A)`` (+ kl_coef · k3 KL
    to the reference); ρ = exp(logp - logp_old). ``clip_c`` > 1: dual clip, a token with A < 0 loses at most
    ``-clip_c·A`` (a far off-policy ratio cannot blow the loss up). Divide by the global trained-token count."""
    if not (logp.shape == logp_old.shape == advantages.shape):
        raise ValueError(
            f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)} and advantages {tuple(advantages.shape)} "
            "must have one value per trained token."
        )
    ratio = torch.exp(logp - logp_old.detach())
    adv = advantages.detach().to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if clip_c > 1.0:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -clip_c * adv), per_token)
    kl_sum = 0.0
    if kl_coef and logp_ref is not None:
        kl = kl_k3(logp, logp_ref.detach())
        per_token = per_token + kl_coef * kl
        kl_sum = float(kl.detach().sum())
    stats = PolicyLossStats(
        tokens=int(logp.numel()),
        clipped_tokens=int((clipped < unclipped).sum()),
        ratio_mean=float(ratio.detach().mean()) if logp.numel() else 1.0,
        kl_sum=kl_sum,
    )
    return per_token.sum(), stats


def token_advantages(advantages: torch.Tensor, response_lengths: list[int]) -> torch.Tensor:
    """Each response's advantage repeated over its trained tokens, flat in response order (the loss's layout)."""
    flat = advantages.reshape(-1)
    if flat.numel() != len(response_lengths):
        raise ValueError(f"{flat.numel()} advantages for {len(response_lengths)} responses.")
    return torch.repeat_interleave(flat, torch.tensor(response_lengths, dtype=torch.long))


__all__ = [
    "PolicyLossStats",
    "group_advantages",
    "informative_groups",
    "kl_k3",
    "overlong_penalty",
    "policy_loss_sum",
    "token_advantages",
]
