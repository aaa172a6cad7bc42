"""GRPO: group-normalised advantages and the token-level clipped objective with an optional k3 KL, as one
use of the policy-gradient core (:mod:`thinkfast.rl.policy`).

Llama-Nemotron section 5 / REFERENCE.md section 5 (DeepSeekMath's GRPO): for the G completions of a
prompt with rewards r, the advantage of completion i is ``(r_i - mean(r)) / (std(r) + eps)`` (``std``:
the sample standard deviation, as TRL; :func:`thinkfast.rl.advantages.group_normalised_advantages`, which
leaves unscorable samples out of the mean and std); every token of the completion carries it. Per token,
``ratio = exp(logp - old_logp)`` and the objective is ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``
minus ``beta * k3``, ``k3 = exp(ref - logp) - (ref - logp) - 1`` (Schulman's unbiased, positive KL
estimate to the reference model). Token-level: the loss is averaged over every completion token of the
batch (long and short completions weigh by their tokens, as the paper's and DAPO's token-level loss),
not per sequence first.
"""

from __future__ import annotations

import torch

from ..generation import Backend, LocalBackend
from .rollout import policy_logprobs
from .advantages import group_normalised_advantages, passing_only_up, rewards_tensor
from .policy import policy_update, sample_and_score, step_record

__all__ = ["grpo_loss", "grpo_step"]


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


def grpo_step(model, opt, prompts: list[list[int]], columns: dict[str, list], runner, params, *, group_size: int,
              decode, pad_id: int = 0, updates: int = 1, clip_eps: float = 0.2, kl_beta: float = 0.0,
              reference=None, logprobs: str = "recompute", grad_clip: float | None = 1.0, autocast_ctx=None,
              conversational: bool = True, backend: Backend | None = None, pass_reward: str = "nano_accuracy",
              reinforce: str = "all") -> tuple[dict, list[str]]:
    """One GRPO step: ``group_size`` completions per prompt, rewards, group-normalised advantages, then
    ``updates`` gradient steps on :func:`grpo_loss`, one per slice of the groups
    (:func:`thinkfast.rl.policy.sample_and_score`, :func:`~thinkfast.rl.policy.policy_update`). ``columns``
    holds per-prompt dataset columns (repeated per sample for the rewards); ``decode`` turns token ids into
    text. Returns (the step's record, reward errors; ``pass_rate`` in the record is the share of completions
    that ``pass_reward`` scores 1); a non-finite loss raises FloatingPointError before any parameter changes in
    that update. A step in which every group's rewards are equal (no advantage anywhere) and there is no KL
    term makes no update (``updates: 0`` in the record); samples no reward could score are left out of their
    group's baseline and of the loss. ``backend`` samples the completions (default: the local rollout engine on
    ``model``) and is synced to ``model`` after an update. ``reinforce="passing"``: a positive advantage only
    for samples that pass (``pass_reward`` 1, not cut off; :func:`thinkfast.rl.advantages.passing_only_up`)."""
    if reinforce not in ("all", "passing"):
        raise ValueError(f"reinforce={reinforce!r}: all or passing")
    device = next(model.parameters()).device
    backend = backend if backend is not None else LocalBackend(model)
    scored = sample_and_score(backend, prompts, columns, runner, params, group_size=group_size, decode=decode,
                              conversational=conversational)
    rewards = rewards_tensor(scored.total)
    groups = torch.tensor(scored.rollout.groups)
    adv = group_normalised_advantages(rewards, groups)
    if reinforce == "passing":
        if pass_reward not in scored.parts:
            raise ValueError(f"reinforce='passing' reads pass_reward {pass_reward!r}, which is not one of the rewards "
                             f"{sorted(scored.parts)}")
        passes = scored.parts[pass_reward]
        adv = passing_only_up(adv, torch.tensor([p is not None and p >= 1.0 and not t
                                                 for p, t in zip(passes, scored.truncated)]))
    b = scored.rollout.batch(pad_id, device)
    start = b.pop("prompt_width")

    def logprobs_of(m, batch):  # each prompt computed once per group where the model allows it
        return policy_logprobs(m, batch, start)

    def loss_fn(logp, old_logp, advantages, mask, ref_logp):
        return grpo_loss(logp, old_logp, advantages, mask, clip_eps=clip_eps, ref_logp=ref_logp, kl_beta=kl_beta)

    losses, stats = policy_update(model, opt, b, groups, adv, loss_fn, logprobs_of=logprobs_of,
                                  scorable=~torch.isnan(rewards), updates=updates, reference=reference,
                                  logprobs=logprobs, grad_clip=grad_clip, autocast_ctx=autocast_ctx)
    if losses:
        backend.sync(model)  # the next rollout samples from the updated weights
    return step_record(scored, adv, losses, stats, pass_reward), scored.errors
