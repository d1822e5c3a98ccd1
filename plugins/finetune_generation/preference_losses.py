"""Preference-tuning losses as pure tensor functions (one value per example; the caller averages).

Inputs are log-probabilities of answers (the answer tokens and their end token, never the prompt):
*summed* over the answer (``policy_chosen`` ...) or *length-normalised*, i.e. the mean per answer token
(``avg_chosen`` ...), as each method prescribes. Rewards are returned detached, for metrics.
"""

from __future__ import annotations

from typing import Any


def dpo_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float,
             label_smoothing: float = 0.0) -> tuple[Any, Any, Any]:
    """Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model", eq. 7)::

        h      = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
        loss   = -log sigmoid(h)

    with conservative label smoothing eps (cDPO, Mitchell 2023: the preference label is wrong with
    probability eps): ``loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)``. Log-probabilities are
    summed over the answer. The implicit rewards are ``beta * (log pi - log ref)`` of each answer.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``."""
    import torch.nn.functional as F

    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def simpo_loss(avg_chosen: Any, avg_rejected: Any, beta: float, gamma: float) -> tuple[Any, Any, Any]:
    """SimPO (Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6)::

        loss = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)

    The reward is the length-normalised log-probability times beta (``avg_*`` are the mean log-probability
    per answer token); no reference model; ``gamma`` is the target reward margin (the paper's gamma, not the
    ratio gamma/beta). Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``."""
    import torch.nn.functional as F

    chosen, rejected = beta * avg_chosen, beta * avg_rejected
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses, chosen.detach(), rejected.detach()


def orpo_loss(avg_chosen: Any, avg_rejected: Any, nll_chosen: Any, lam: float) -> tuple[Any, Any, Any]:
    """ORPO (Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    eqs. 6-7)::

        odds(y|x) = P(y|x) / (1 - P(y|x)),  log P(y|x) = mean log-probability per answer token
        L_OR      = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
        loss      = L_SFT + lam * L_OR,     L_SFT = nll_chosen (the chosen answer's mean token NLL)

    ``log odds = log P - log(1 - P) = avg - log1p(-exp(avg))``. No reference model. The rewards reported
    are ``lam * avg`` (length-normalised log-probabilities). Returns ``(losses, chosen_rewards,
    rejected_rewards)``, each ``[B]``."""
    import torch
    import torch.nn.functional as F

    def log_odds(avg: Any) -> Any:
        # log(1 - exp(avg)) for avg < 0; clamp so an answer of probability ~1 stays finite
        return avg - torch.log1p(-torch.exp(avg.clamp(max=-1e-6)))

    ratio = log_odds(avg_chosen) - log_odds(avg_rejected)
    losses = nll_chosen - lam * F.logsigmoid(ratio)
    return losses, (lam * avg_chosen).detach(), (lam * avg_rejected).detach()


def kto_loss(policy: Any, ref: Any, desirable: Any, kl: Any, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Any, Any, Any]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8)::

        r      = log pi(y|x) - log ref(y|x)                       (summed over the answer)
        z0     = max(0, KL estimate)                               (the reference point, no gradient)
        v      = lambda_D * sigmoid(beta (r - z0))   if y is desirable
                 lambda_U * sigmoid(beta (z0 - r))   if y is undesirable
        loss   = lambda_y - v

    ``kl`` is the batch's estimate of KL(pi || ref) (the paper's mismatched pairs: prompt i with the
    completion of another example); it is detached and clamped at 0 here. ``desirable`` is a bool tensor.

    Returns ``(losses, rewards, reference_point)``: ``[B]``, ``[B]`` (``beta * r``, detached) and the scalar
    ``beta * z0`` the rewards are compared with."""
    import torch

    z0 = kl.detach().clamp(min=0)
    r = policy - ref
    weight = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    value = torch.where(desirable, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    losses = weight * (1 - value)
    return losses, (beta * r).detach(), beta * z0


__all__ = ["dpo_loss", "kto_loss", "orpo_loss", "simpo_loss"]
