"""RLOO: REINFORCE with a leave-one-out baseline, as one use of the policy-gradient core (:mod:`thinkfast.rl.policy`).

Llama-Nemotron section 6 (REFERENCE.md section 6) trains instruction following with RLOO (Ahmadian et al. 2024,
"Back to Basics", arXiv 2402.14740): ``k`` samples per prompt, and the advantage of sample ``i`` is its reward minus
the mean reward of its ``k - 1`` siblings (:func:`thinkfast.rl.advantages.leave_one_out_advantages`).

Where the pieces enter:

* **Unscorable and truncated samples** (no reward could score them, or no stop token before ``max_new_tokens``)
  leave their group's baseline and get no gradient: their reward is NaN here (GRPO instead scores a truncated
  sample 0); a group with fewer than two scorable samples has no baseline and no signal.
* **KL to the starting model is folded into the reward**, per sequence, as in the RLOO paper and TRL's classic
  ``RLOOTrainer``: ``r_i <- r_i - kl_beta * sum_t (log pi(y_t) - log ref(y_t))`` over the sample's completion
  tokens, both log-probs taken with the policy as it sampled (before this step's update). It therefore enters the
  baseline too, and needs no per-token term in the loss.
* **The objective is token-level**: every completion token carries its sample's advantage, and the loss is the
  mean over all completion tokens of the batch (``-ratio * A``); with ``clip_eps`` set, PPO's clipped surrogate
  ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``. With one update per rollout the ratio is 1 and both are
  REINFORCE's gradient; clipping matters when ``updates > 1`` reuses the samples.
"""

from __future__ import annotations

import torch

from ..generation import Backend, LocalBackend
from .advantages import leave_one_out_advantages, passing_only_up, rewards_tensor
from .policy import policy_update, sample_and_score, step_record
from .rollout import policy_logprobs

__all__ = ["kl_penalised_rewards", "passes", "rloo_loss", "rloo_step"]


def rloo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_eps: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``logp``, ``old_logp``, ``mask`` [N, T], ``advantages`` [N] -> (loss, stats): the token-level mean of
    ``-ratio * A`` (``clip_eps``: PPO's clipped surrogate instead). Stats: ``clip_fraction``, ``ratio``, ``kl``
    (0: the KL is in the reward).

    >>> lp = torch.log(torch.tensor([[0.5, 0.5, 1.0]]))
    >>> loss, st = rloo_loss(lp, lp, torch.tensor([2.0]), torch.tensor([[1.0, 1.0, 0.0]]))
    >>> float(loss), st["ratio"]  # ratio 1 on both completion tokens: -(1 * 2 + 1 * 2) / 2
    (-2.0, 1.0)
    """
    mask = mask.float()
    n = mask.sum().clamp(min=1.0)
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    objective = ratio * adv
    clipped_share = torch.zeros(())
    if clip_eps is not None:
        clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
        with torch.no_grad():
            clipped_share = ((clipped < objective) & ((ratio - 1).abs() > clip_eps)).float()
        objective = torch.minimum(objective, clipped)
    loss = -(objective * mask).sum() / n
    with torch.no_grad():
        stats = {"clip_fraction": float((clipped_share * mask).sum() / n) if clip_eps is not None else 0.0,
                 "ratio": float((ratio * mask).sum() / n), "kl": 0.0}
    return loss, stats


def kl_penalised_rewards(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards`` [N] (NaN: unscorable) minus ``kl_beta`` times each sample's summed ``logp - ref_logp`` over its
    completion tokens -> (penalised rewards [N], the per-sample KL estimate [N]).

    >>> r, kl = kl_penalised_rewards(torch.tensor([1.0, float("nan")]), torch.tensor([[-1.0, -1.0], [-1.0, -1.0]]),
    ...                              torch.tensor([[-2.0, -1.5], [-2.0, -2.0]]), torch.ones(2, 2), 0.1)
    >>> [round(x, 3) for x in r.tolist()[:1]], kl.tolist()
    ([0.85], [1.5, 2.0])
    """
    kl = ((logp - ref_logp) * mask.float()).sum(-1).cpu()
    return rewards - kl_beta * kl, kl


def passes(scored) -> list[bool]:
    """Per sample of a scored rollout: not cut off, scored by some reward, and every reward that scored it gave
    at least 1 (a correct, well-formed answer that follows each of its instructions, if it has any)."""
    values = list(scored.parts.values())
    return [not t and any(v[i] is not None for v in values) and all(v[i] is None or v[i] >= 1.0 for v in values)
            for i, t in enumerate(scored.truncated)]


def rloo_step(model, opt, prompts: list[list[int]], columns: dict[str, list], runner, params, *, group_size: int,
              decode, pad_id: int = 0, kl_beta: float = 0.0, clip_eps: float | None = None, reference=None,
              updates: int = 1, grad_clip: float | None = 1.0, autocast_ctx=None, conversational: bool = True,
              backend: Backend | None = None, pass_reward: str | None = None,
              passing_only: list[bool] | None = None) -> tuple[dict, list]:
    """One RLOO step: ``group_size`` samples per prompt, rewards (truncated samples unscorable), the KL to
    ``reference`` folded into each reward when ``kl_beta > 0``, leave-one-out advantages, then ``updates`` gradient
    steps on :func:`rloo_loss` (one per slice of the groups). The calling convention of
    :func:`thinkfast.rl.grpo.grpo_step`; returns (the step's record, reward errors). The record adds ``kl`` (mean
    per-sample KL estimate to the reference, summed over tokens), ``scorable`` (share of samples in a baseline).

    ``passing_only`` (per prompt): in the groups of the prompts it marks, only a sample that passes (not cut off,
    and every reward that scored it gave at least 1) may be pushed up
    (:func:`thinkfast.rl.advantages.passing_only_up`)."""
    if kl_beta > 0 and reference is None:
        raise ValueError("kl_beta > 0 needs the reference model")
    device = next(model.parameters()).device
    backend = backend if backend is not None else LocalBackend(model)
    scored = sample_and_score(backend, prompts, columns, runner, params, group_size=group_size, decode=decode,
                              conversational=conversational)
    rewards = rewards_tensor(scored.total)
    rewards[torch.tensor(scored.truncated, dtype=torch.bool)] = float("nan")  # out of the baseline, no gradient
    groups = torch.tensor(scored.rollout.groups)
    b = scored.rollout.batch(pad_id, device)
    start = b.pop("prompt_width")

    def logprobs_of(m, batch):
        return policy_logprobs(m, batch, start)

    kl = torch.zeros(len(rewards))
    if kl_beta > 0:
        with torch.no_grad():
            rewards, kl = kl_penalised_rewards(rewards, logprobs_of(model, b), logprobs_of(reference, b),
                                               b["completion_mask"], kl_beta)
    scorable = ~torch.isnan(rewards)
    adv = leave_one_out_advantages(rewards, groups)
    if passing_only is not None and any(passing_only):
        adv = torch.where(torch.tensor([passing_only[g] for g in scored.rollout.groups]),
                          passing_only_up(adv, torch.tensor(passes(scored))), adv)

    def loss_fn(logp, old_logp, advantages, mask, ref_logp):
        return rloo_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps)

    losses, stats = policy_update(model, opt, b, groups, adv, loss_fn, logprobs_of=logprobs_of, scorable=scorable,
                                  updates=updates, reference=None, grad_clip=grad_clip, autocast_ctx=autocast_ctx)
    if losses:
        backend.sync(model)
    record = step_record(scored, adv, losses, stats, pass_reward)
    record["kl"] = float(kl[scorable].mean()) if bool(scorable.any()) and kl_beta > 0 else 0.0
    record["scorable"] = float(scorable.float().mean())
    return record, scored.errors
