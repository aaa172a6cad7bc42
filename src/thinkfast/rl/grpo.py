"""GRPO's group-normalised advantages and token-level clipped objective with an optional k3 KL.

Llama-Nemotron section 5 / REFERENCE.md section 5 (DeepSeekMath's GRPO): for the G completions of a
prompt with rewards r, the advantage of completion i is ``(r_i - mean(r)) / (std(r) + eps)`` (``std``:
the sample standard deviation, as TRL); every token of the completion carries it. Per token,
``ratio = exp(logp - old_logp)`` and the objective is ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``
minus ``beta * k3``, ``k3 = exp(ref - logp) - (ref - logp) - 1`` (Schulman's unbiased, positive KL
estimate to the reference model). Token-level: the loss is averaged over every completion token of the
batch (long and short completions weigh by their tokens, as the paper's and DAPO's token-level loss),
not per sequence first.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "grpo_loss"]


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4,
                     scale: bool = True) -> torch.Tensor:
    """``rewards`` [N], ``groups`` [N] (group id per sample) -> advantages [N].

    >>> a = group_advantages(torch.tensor([1., 0., 0., 0., 2., 2.]), torch.tensor([0, 0, 0, 0, 1, 1]))
    >>> [round(x, 3) for x in a.tolist()]  # group 0: mean 0.25, std 0.5; group 1: all equal
    [1.5, -0.5, -0.5, -0.5, 0.0, 0.0]
    """
    rewards = rewards.float()
    out = torch.zeros_like(rewards)
    for g in groups.unique():
        sel = groups == g
        r = rewards[sel]
        centred = r - r.mean()
        if scale:
            std = r.std() if r.numel() > 1 else torch.zeros(())
            centred = centred / (std + eps)
        out[sel] = centred
    return out


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_eps: float = 0.2, ref_logp: torch.Tensor | None = None, kl_beta: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """``logp``, ``old_logp``, ``ref_logp``, ``mask`` [N, T] (mask 1 on completion tokens), ``advantages`` [N]
    -> (loss, stats). Stats: ``clip_fraction`` (share of tokens where the clipped term is the minimum and
    differs from the unclipped one), ``kl`` (mean k3 per token; 0 without a reference), ``ratio`` (mean)."""
    mask = mask.float()
    n = mask.sum().clamp(min=1.0)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
    per_token = -(objective - kl_beta * kl)
    loss = (per_token * mask).sum() / n
    with torch.no_grad():
        was_clipped = (clipped < unclipped) & ((ratio - 1).abs() > clip_eps)
        stats = {"clip_fraction": float((was_clipped.float() * mask).sum() / n),
                 "kl": float((kl * mask).sum() / n), "ratio": float((ratio * mask).sum() / n)}
    return loss, stats
