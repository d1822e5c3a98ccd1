"""GRPO's pure functions: group-normalised advantages and the clipped policy-gradient loss with a KL term.

GRPO (Shao et al. 2024, DeepSeekMath) samples a group of ``G`` completions per prompt, scores them, and uses
each completion's reward relative to its group as the advantage of all its tokens: no value model.

With one optimisation step per sampled group (what DeepSeekMath and TRL's ``GRPOTrainer`` do by default,
and what the ``grpo`` task does), the "old" policy that sampled the completions IS the current policy at
the update: ``old_logps = logps.detach()``, so the ratio ``exp(logps - old_logps)`` is exactly 1 in value,
the clip never binds, and the surrogate's gradient is the plain policy gradient ``A * grad logp``. The clip
is implemented for real anyway (it binds when several updates reuse one group; a unit test checks it
with ``old_logps != logps``).
"""

from __future__ import annotations

from typing import Any


def group_advantages(rewards: Any, group_size: int, scale: bool = True, eps: float = 1e-4) -> Any:
    """``[P * G]`` rewards (the ``G = group_size`` completions of each prompt consecutive) -> advantages of
    the same shape: each reward minus its group's mean, divided by the group's standard deviation (the
    sample std, as DeepSeekMath and TRL) + ``eps`` when ``scale``. Within a group they sum to zero; a group
    whose completions all scored the same gets zero advantages (it teaches nothing)."""
    import torch

    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True)
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def grpo_loss(logps: Any, old_logps: Any, ref_logps: Any, mask: Any, advantages: Any, clip_range: float,
              kl_weight: float) -> tuple[Any, Any]:
    """``(loss, mean_kl)`` for ``[rows, tokens]`` per-token log-probabilities of the sampled completions
    under the policy (with gradient), the policy that sampled them (``old_logps``) and the reference, a
    ``[rows, tokens]`` mask of the completion tokens that count, and ``[rows]`` advantages.

    Per token: the PPO clipped surrogate ``-min(r * A, clip(r, 1 - c, 1 + c) * A)`` with
    ``r = exp(logps - old_logps)``, plus ``kl_weight`` times the k3 estimator of KL(policy || reference),
    ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, always >= 0, exactly 0 where the two agree).
    Averaged over each sequence's completion tokens, then over sequences (DeepSeekMath's normalisation).
    ``mean_kl`` is the same per-sequence-then-mean average of the KL term alone, without gradient."""
    import torch

    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * adv)
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1
    per_token = -surrogate + kl_weight * kl
    counts = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / counts).mean()
    mean_kl = ((kl.detach() * mask).sum(1) / counts).mean()
    return loss, mean_kl


__all__ = ["group_advantages", "grpo_loss"]
