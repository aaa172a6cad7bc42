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

import contextlib
import statistics

import torch

from ..generation import generate
from ..modeling import DeciLMForCausalLM
from ..rollout import grouped_logprobs, rollout, token_logprobs
from ..train import loop as train_loop

__all__ = ["group_advantages", "grpo_loss", "grpo_step"]


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


def grpo_step(model, opt, prompts: list[list[int]], columns: dict[str, list], runner, params, *, group_size: int,
              decode, pad_id: int = 0, updates: int = 1, clip_eps: float = 0.2, kl_beta: float = 0.0,
              reference=None, logprobs: str = "recompute", grad_clip: float | None = 1.0, autocast_ctx=None,
              conversational: bool = True, generate_fn=None, pass_reward: str = "nano_accuracy"
              ) -> tuple[dict, list[str]]:
    """One GRPO step: ``group_size`` completions per prompt, rewards, group advantages, then ``updates``
    gradient steps, one per slice of the groups. ``columns`` holds per-prompt dataset columns (repeated per
    sample for the rewards); ``decode`` turns token ids into text. Returns (the step's record, reward
    errors; ``pass_rate`` in the record is the share of completions that ``pass_reward`` scores 1); a
    non-finite loss raises FloatingPointError before any parameter changes in that update.
    A step in which every group's rewards are equal (no advantage anywhere) and there is no KL term makes
    no update (``updates: 0`` in the record)."""
    device = next(model.parameters()).device
    model.eval()
    roll = rollout(model, prompts, group_size, params, generate_fn=generate_fn or generate)
    texts = [decode(c.token_ids) for c in roll.completions]
    cols = {k: [v[g] for g in roll.groups] for k, v in columns.items()}
    cols["completion_ids"] = [c.token_ids for c in roll.completions]
    truncated = [c.finish_reason != "stop" for c in roll.completions]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    total, parts, errors = runner(completions, truncated, cols)
    adv = group_advantages(torch.tensor(total), torch.tensor(roll.groups))
    b = roll.batch(pad_id, device)
    start = b.pop("prompt_width")

    def logprobs_of(m, batch):  # each prompt computed once per group where the model allows it
        return (grouped_logprobs if isinstance(m, DeciLMForCausalLM) else token_logprobs)(m, batch, start)

    group_ids = torch.tensor(roll.groups, device=device)
    slices = [(group_ids % updates == part).nonzero().squeeze(1) for part in range(updates)]
    # "old" log-probs: the first slice is trained before any update, so its own forward pass gives them
    # (detached); the other slices need them from the model as it is now, before the first update
    old = b["sampler_logprobs"] if logprobs == "sampler" else torch.zeros_like(b["sampler_logprobs"])
    with torch.no_grad():
        if logprobs == "recompute":
            for rows in slices[1:]:
                old[rows] = logprobs_of(model, {k: v[rows] for k, v in b.items()})
        ref = logprobs_of(reference, b) if reference is not None else None
    model.train()
    stats, losses = [], []
    if not bool(adv.abs().max() > 0) and reference is None:
        # every group's rewards are equal: no signal. No update at all (an optimizer step on a zero gradient
        # would still move the weights along Adam's momentum)
        slices = []
    for part, rows in enumerate(slices):
        sub = {k: v[rows] for k, v in b.items()}
        with autocast_ctx() if autocast_ctx is not None else contextlib.nullcontext():
            logp = logprobs_of(model, sub)
            old_rows = logp.detach() if part == 0 and logprobs == "recompute" else old[rows]
            loss, st = grpo_loss(logp, old_rows, adv[rows.cpu()].to(device), sub["completion_mask"],
                                 clip_eps=clip_eps, ref_logp=ref[rows] if ref is not None else None, kl_beta=kl_beta)
        value = float(loss.detach())
        if value != value or value in (float("inf"), float("-inf")):
            raise FloatingPointError(f"the GRPO loss is {value}")
        train_loop.optimizer_step(opt, loss, clip=grad_clip)
        losses.append(value)
        stats.append(st)
    accuracy = parts.get(pass_reward)
    record = {"loss": statistics.fmean(losses) if losses else 0.0, "reward": statistics.fmean(total),
              "pass_rate": (statistics.fmean(a >= 1.0 and not t for a, t in zip(accuracy, truncated))
                            if accuracy is not None else None),
              **{f"reward_{k}": statistics.fmean(v) for k, v in parts.items()},
              "kl": statistics.fmean(s["kl"] for s in stats) if stats else 0.0,
              "clip_fraction": statistics.fmean(s["clip_fraction"] for s in stats) if stats else 0.0,
              "updates": len(stats), "groups_with_signal": int(sum(
                  bool((adv[torch.tensor(roll.groups) == g] != 0).any()) for g in set(roll.groups))),
              "response_tokens": statistics.fmean(len(c.token_ids) for c in roll.completions),
              "truncated": statistics.fmean(truncated),
              "format_ok": statistics.fmean(parts["think_format"]) if "think_format" in parts else None,
              "reward_errors": len(errors), "tokens": sum(len(c.token_ids) for c in roll.completions)}
    return record, errors
