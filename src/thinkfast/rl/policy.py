"""The policy-gradient core that GRPO (and RLOO next) are thin uses of: sample and score groups, then update
the policy on advantages the caller computed, with the loss the caller names.

* :func:`sample_and_score`: ``group_size`` completions per prompt (:func:`thinkfast.rl.rollout.rollout`),
  decoded and scored by a :class:`thinkfast.rl.rewards.RewardRunner` (``None``: a sample no reward could
  score) -> :class:`ScoredRollout`.
* :func:`policy_update`: ``updates`` gradient steps, one per slice of the groups, on
  ``loss_fn(logp, old_logp, advantages, mask, ref_logp) -> (loss, stats)`` (e.g.
  :func:`thinkfast.rl.grpo.grpo_loss`); the "old" log-probs are recomputed by the training model before the
  first update (``logprobs="recompute"``) or taken from the sampler (``"sampler"``). Unscorable samples are
  left out of the loss (their tokens neither push nor count in the token-level mean); a step without signal
  (every advantage 0, no reference model) makes no update; a non-finite loss raises FloatingPointError
  before any parameter changes in that update.
* :func:`step_record`: what a step logs (rewards, pass rate, KL, clip fraction, lengths, errors).

Shapes: N samples (prompts x group_size), T tokens per row of the batch (:meth:`thinkfast.rl.rollout.Rollout.batch`).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..generation import Backend
from .rollout import Rollout, rollout
from ..train import loop as train_loop

__all__ = ["ScoredRollout", "policy_update", "sample_and_score", "step_record"]


@dataclass
class ScoredRollout:
    """A rollout with its decoded texts and rewards: ``total`` [N] (``None``: unscorable), each reward's
    values, whether each sample was cut off, and the rewards that failed."""

    rollout: Rollout
    texts: list[str]
    truncated: list[bool]
    total: list[float | None]
    parts: dict[str, list[float | None]]
    errors: list


def sample_and_score(backend: Backend, prompts: list[list[int]], columns: dict[str, list], runner, params, *,
                     group_size: int, decode: Callable, conversational: bool = True) -> ScoredRollout:
    """Sample ``group_size`` completions of each prompt with ``backend`` and score them. ``columns`` holds
    per-prompt dataset columns (repeated per sample for the rewards, with ``completion_ids``); ``decode``
    turns token ids into text; ``conversational``: rewards get TRL's chat format, else plain text."""
    roll = rollout(backend, prompts, group_size, params)
    texts = [decode(c.token_ids) for c in roll.completions]
    cols = {k: [v[g] for g in roll.groups] for k, v in columns.items()}
    cols["completion_ids"] = [c.token_ids for c in roll.completions]
    truncated = [c.finish_reason != "stop" for c in roll.completions]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    total, parts, errors = runner(completions, truncated, cols)
    return ScoredRollout(roll, texts, truncated, total, parts, errors)


def policy_update(model, opt, batch: dict[str, torch.Tensor], groups: torch.Tensor, advantages: torch.Tensor,
                  loss_fn: Callable, *, logprobs_of: Callable, scorable: torch.Tensor | None = None,
                  updates: int = 1, reference=None, logprobs: str = "recompute", grad_clip: float | None = 1.0,
                  autocast_ctx=None) -> tuple[list[float], list[dict]]:
    """``updates`` optimizer steps on ``loss_fn``, the i-th on the groups with ``group % updates == i``.

    ``batch``: the rollout's batch on the model's device without ``prompt_width`` (``input_ids``,
    ``completion_mask``, ``sampler_logprobs`` [N, T], ...); ``groups`` [N] group ids; ``advantages`` [N] (CPU);
    ``scorable`` [N] bool (None: all), unscorable samples are left out of the loss; ``logprobs_of(model,
    sub_batch) -> [n, T]`` the per-token log-probs; ``reference``: the frozen model for ``ref_logp`` (None: no
    KL term). Returns (each update's loss, each update's stats)."""
    device = batch["input_ids"].device
    group_ids = groups.to(device)
    slices = [(group_ids % updates == part).nonzero().squeeze(1) for part in range(updates)]
    # "old" log-probs: the first slice is trained before any update, so its own forward pass gives them
    # (detached); the other slices need them from the model as it is now, before the first update
    old = batch["sampler_logprobs"] if logprobs == "sampler" else torch.zeros_like(batch["sampler_logprobs"])
    with torch.no_grad():
        if logprobs == "recompute":
            for rows in slices[1:]:
                old[rows] = logprobs_of(model, {k: v[rows] for k, v in batch.items()})
        ref = logprobs_of(reference, batch) if reference is not None else None
    model.train()
    parts = list(enumerate(slices))
    if scorable is not None and not bool(scorable.all()):
        keep = scorable.to(device)
        parts = [(part, rows[keep[rows]]) for part, rows in parts]
        parts = [(part, rows) for part, rows in parts if rows.numel()]
    if not bool(advantages.abs().max() > 0) and reference is None:
        # every group's rewards are equal: no signal. No update at all (an optimizer step on a zero gradient
        # would still move the weights along Adam's momentum)
        parts = []
    losses, stats = [], []
    for part, rows in parts:
        sub = {k: v[rows] for k, v in batch.items()}
        with autocast_ctx() if autocast_ctx is not None else contextlib.nullcontext():
            logp = logprobs_of(model, sub)
            old_rows = logp.detach() if part == 0 and logprobs == "recompute" else old[rows]
            loss, st = loss_fn(logp, old_rows, advantages[rows.cpu()].to(device), sub["completion_mask"],
                               ref[rows] if ref is not None else None)
        value = float(loss.detach())
        if value != value or value in (float("inf"), float("-inf")):
            raise FloatingPointError(f"the loss is {value}")
        train_loop.optimizer_step(opt, loss, clip=grad_clip)
        losses.append(value)
        stats.append(st)
    return losses, stats


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def step_record(scored: ScoredRollout, advantages: torch.Tensor, losses: list[float], stats: list[dict],
                pass_reward: str | None) -> dict:
    """A step's record: mean loss and reward (over scorable samples), ``pass_rate`` (share of completions that
    ``pass_reward`` scores 1 and were not cut off), each reward's mean (over the samples it scored), KL, clip
    fraction, updates made, groups with any non-zero advantage, response length, truncated share, think-format
    compliance, reward errors and tokens."""
    roll, truncated, parts = scored.rollout, scored.truncated, scored.parts
    accuracy = parts.get(pass_reward)
    groups = torch.tensor(roll.groups)
    return {"loss": statistics.fmean(losses) if losses else 0.0, "reward": _mean(scored.total),
            "pass_rate": (statistics.fmean(a is not None and a >= 1.0 and not t for a, t in zip(accuracy, truncated))
                          if accuracy is not None else None),
            **{f"reward_{k}": _mean(v) for k, v in parts.items()},
            "kl": statistics.fmean(s["kl"] for s in stats) if stats else 0.0,
            "clip_fraction": statistics.fmean(s["clip_fraction"] for s in stats) if stats else 0.0,
            "updates": len(stats), "groups_with_signal": int(sum(
                bool((advantages[groups == g] != 0).any()) for g in set(roll.groups))),
            "response_tokens": statistics.fmean(len(c.token_ids) for c in roll.completions),
            "truncated": statistics.fmean(truncated),
            "format_ok": _mean(parts["think_format"]) if "think_format" in parts else None,
            "reward_errors": len(scored.errors), "tokens": sum(len(c.token_ids) for c in roll.completions)}
