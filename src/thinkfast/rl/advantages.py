"""Advantages from the rewards of groups of samples: group-normalised (GRPO) and leave-one-out (RLOO).

``rewards`` [N] holds one total reward per sample, NaN where the sample cannot be scored (every reward
function returned ``None`` for it: :class:`thinkfast.rl.rewards.RewardRunner`); ``groups`` [N] the group
(prompt) id of each sample. An unscorable sample is left out of its group's baseline (mean, std, the others'
mean) rather than counted as a reward of 0, which would pull the baseline down and hand every scored sample
of the group a spurious positive advantage; its own advantage is 0 (and the policy step leaves it out of the
loss: :func:`thinkfast.rl.policy.policy_update`). TRL does the same (NaN-masked rewards, ``nanmean`` /
``nanstd`` baselines); so do RLOO's peers (REFERENCE.md section 6).

* :func:`group_normalised_advantages`: ``(r_i - mean(r)) / (std(r) + eps)`` over the group's scored samples,
  ``std`` the sample standard deviation (as TRL; DeepSeekMath's GRPO, Llama-Nemotron section 5).
* :func:`leave_one_out_advantages`: ``r_i - mean of the group's other scored samples`` (REINFORCE
  leave-one-out, Ahmadian et al. 2024; Llama-Nemotron's alignment RLOO); 0 for a sample with no scored peer.
* :func:`passing_only_up`: positive advantages kept only on samples that pass (a wrong answer is never
  pushed up; negative ones stay: cf. negative-sample reinforcement, Zhu et al. 2025, arXiv 2506.01347).
"""

from __future__ import annotations

import torch

__all__ = ["group_normalised_advantages", "leave_one_out_advantages", "passing_only_up", "rewards_tensor"]


def rewards_tensor(total, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample rewards (``None``: cannot be scored) -> float32 [N], NaN where ``None``.

    >>> rewards_tensor([1.0, None, 0.5]).tolist()
    [1.0, nan, 0.5]
    """
    return torch.tensor([float("nan") if r is None else float(r) for r in total], dtype=torch.float32,
                        device=device)


def group_normalised_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4,
                                scale: bool = True) -> torch.Tensor:
    """``rewards`` [N] (NaN: unscorable), ``groups`` [N] (group id per sample) -> advantages [N]: the reward
    minus the group's mean over its scored samples, divided by their standard deviation plus ``eps`` when
    ``scale``; 0 for unscorable samples.

    >>> a = group_normalised_advantages(torch.tensor([1., 0., 0., 0., 2., 2.]), torch.tensor([0, 0, 0, 0, 1, 1]))
    >>> [round(x, 3) for x in a.tolist()]  # group 0: mean 0.25, std 0.5; group 1: all equal
    [1.5, -0.5, -0.5, -0.5, 0.0, 0.0]
    >>> a = group_normalised_advantages(torch.tensor([1., 0., float("nan")]), torch.tensor([0, 0, 0]), eps=0.0)
    >>> [round(x, 3) for x in a.tolist()]  # the unscorable sample is not in the baseline: mean 0.5, std 0.707
    [0.707, -0.707, 0.0]
    """
    rewards = rewards.float()
    scored = ~torch.isnan(rewards)
    out = torch.zeros_like(rewards)
    for g in groups.unique():
        sel = (groups == g) & scored
        if not bool(sel.any()):
            continue
        r = rewards[sel]
        centred = r - r.mean()
        if scale:
            std = r.std() if r.numel() > 1 else torch.zeros(())
            centred = centred / (std + eps)
        out[sel] = centred
    return out


def leave_one_out_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``rewards`` [N] (NaN: unscorable), ``groups`` [N] -> advantages [N]: each scored sample's reward minus the
    mean reward of the other scored samples of its group, ``r_i - (sum(r) - r_i) / (k - 1)`` for ``k`` scored
    samples; 0 when ``k < 2`` (no baseline) and for unscorable samples.

    >>> leave_one_out_advantages(torch.tensor([1., 0., 0., 3., 1.]), torch.tensor([0, 0, 0, 1, 1])).tolist()
    [1.0, -0.5, -0.5, 2.0, -2.0]
    >>> leave_one_out_advantages(torch.tensor([1., float("nan"), 0., 5.]), torch.tensor([0, 0, 0, 1])).tolist()
    [1.0, 0.0, -1.0, 0.0]
    """
    rewards = rewards.float()
    scored = ~torch.isnan(rewards)
    out = torch.zeros_like(rewards)
    for g in groups.unique():
        sel = (groups == g) & scored
        k = int(sel.sum())
        if k < 2:
            continue
        r = rewards[sel]
        out[sel] = r - (r.sum() - r) / (k - 1)
    return out


def passing_only_up(advantages: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """``advantages`` [N], ``passed`` [N] bool -> advantages with every positive one of a sample that did not
    pass set to 0. In a group where no sample passes, the rewards still differ by format (a malformed answer
    scores below a well-formed wrong one): the malformed answer is pushed down, and the wrong answers are not
    pushed up (which, on prompts the model never solves, teaches wrong answers: docs/LOG.md session 6).

    >>> a = passing_only_up(torch.tensor([0.35, 0.35, -2.47, 1.2]), torch.tensor([False, False, False, True]))
    >>> [round(x, 2) for x in a.tolist()]
    [0.0, 0.0, -2.47, 1.2]
    """
    return torch.where((advantages > 0) & ~passed.to(advantages.device), torch.zeros_like(advantages), advantages)
