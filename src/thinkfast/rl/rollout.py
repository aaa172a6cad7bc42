"""Rollouts for RL: groups of sampled completions per prompt, as one record that losses read.

:func:`rollout` samples ``group_size`` completions for each prompt with the rollout engine
(:func:`thinkfast.generation.generate`) and returns a :class:`Rollout`: per completion its prompt, group
id, token ids, finish reason and the sampler's log-probs. :meth:`Rollout.batch` lays them out for a
training forward pass: ``[pad.. prompt | completion ..pad]`` rows with attention and position ids, a
completion mask (the tokens the policy produced) and the sampler's log-probs aligned to the tokens.

Which log-probs the policy ratio uses: the sampler's are those of the model's own distribution
(temperature 1) computed in the engine's cached decode; GRPO (:func:`thinkfast.rl.grpo.grpo_step`)
recomputes the "old" log-probs with the training model's forward pass instead (``logprobs="recompute"``,
the default: the first update's own forward, detached, and one no-grad pass for the other slices before
any update), so only training numerics enter the ratio; ``logprobs="sampler"`` uses the engine's (off by
about 1e-6 in float32; the gap grows with low-precision samplers such as vLLM's bf16).

Memory: the log-probs are taken from the final hidden states through the LM head a slice of rows at a time, and
each slice's logits are recomputed in the backward pass (:func:`picked_logprobs`, ``torch.utils.checkpoint``), so
the batch's full-vocabulary logits (rows x tokens x vocabulary, float32) never exist at once: at a 49k vocabulary
they were most of GRPO's and RLOO's peak on a 135M model (docs/LOG.md session 15).

Completions come from a generation backend (:class:`thinkfast.generation.Backend`): the local rollout engine
(:class:`~thinkfast.generation.LocalBackend`) here, a vLLM engine at scale, with nothing else changing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..generation import Backend, Completion, SamplingParams
from ..modeling.head import has_split_head

__all__ = ["LOGITS_BUDGET", "Rollout", "grouped_logprobs", "picked_logprobs", "policy_logprobs", "rollout",
           "token_logprobs"]

# the most full-vocabulary logits (elements) one slice of :func:`picked_logprobs` holds: 2**25 float32 = 128 MiB
LOGITS_BUDGET = 2 ** 25


@dataclass
class Rollout:
    """Completions of prompts in groups: ``prompts[i]`` and ``completions[i]`` belong to group ``groups[i]``."""

    prompts: list[list[int]]
    completions: list[Completion]
    groups: list[int]

    def __len__(self) -> int:
        return len(self.completions)

    def batch(self, pad_id: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``position_ids`` [N, T]; ``completion_mask`` [N, T] (1 on the
        completion's tokens); ``sampler_logprobs`` [N, T] (the engine's log-prob of token t at position t,
        0 elsewhere); ``group`` [N]; ``prompt_width`` (an int: the column where completions start).
        T = longest prompt + longest completion; prompts are left-padded, completions right-padded, so every
        prompt ends at the same column."""
        n = len(self)
        p_width = max(len(p) for p in self.prompts)
        c_width = max((len(c.token_ids) for c in self.completions), default=0)
        shape = (n, p_width + c_width)
        ids = torch.full(shape, pad_id, dtype=torch.long)
        att = torch.zeros(shape, dtype=torch.long)
        cmask = torch.zeros(shape, dtype=torch.float32)
        logp = torch.zeros(shape, dtype=torch.float32)
        for i, (p, c) in enumerate(zip(self.prompts, self.completions)):
            k = len(c.token_ids)
            ids[i, p_width - len(p):p_width] = torch.tensor(p, dtype=torch.long)
            att[i, p_width - len(p):p_width + k] = 1
            if k:
                ids[i, p_width:p_width + k] = torch.tensor(c.token_ids, dtype=torch.long)
                cmask[i, p_width:p_width + k] = 1.0
                logp[i, p_width:p_width + k] = torch.tensor(c.logprobs, dtype=torch.float32)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        out = {"input_ids": ids, "attention_mask": att, "position_ids": pos, "completion_mask": cmask,
               "sampler_logprobs": logp, "group": torch.tensor(self.groups, dtype=torch.long)}
        out = {k: v.to(device) for k, v in out.items()}
        out["prompt_width"] = p_width
        return out


def rollout(backend: Backend, prompts: list[list[int]], group_size: int, params: SamplingParams, *,
            progress: bool = False) -> Rollout:
    """``group_size`` completions of every prompt (group i = prompt i), sampled by ``backend``."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    flat = [p for p in prompts for _ in range(group_size)]
    groups = [g for g in range(len(prompts)) for _ in range(group_size)]
    return Rollout(flat, backend.generate(flat, params, progress=progress), groups)


class _GradCache:
    """A KV cache that keeps autograd (``torch.cat``), for a training forward over a shared prefix."""

    def __init__(self, keys=None, values=None):
        self.keys, self.values = list(keys or []), list(values or [])

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx == len(self.keys):
            self.keys.append(key_states)
            self.values.append(value_states)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_states], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0

    def expand(self, index: torch.Tensor) -> _GradCache:
        return _GradCache([k[index] for k in self.keys], [v[index] for v in self.values])


def grouped_logprobs(model, batch: dict[str, torch.Tensor], start: int, budget: int | None = None) -> torch.Tensor:
    """:func:`token_logprobs` of a rollout batch whose rows share their prompt within each group: each
    prompt (the ``start`` columns before the completions) is computed once per group and its keys and
    values are shared by the group's rows, so a group of G samples costs one prompt, not G. Equal to the
    full forward (gradients included; tested). Needs a model that accepts any cache object (nemotron-nas).
    The completions' LM head runs in slices (:func:`picked_logprobs`, ``budget``)."""
    ids, att, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    groups = batch["group"]
    uniq, row_group = torch.unique(groups, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long, device=ids.device).scatter_(
        0, row_group.flip(0), torch.arange(len(groups) - 1, -1, -1, device=ids.device))
    cache = _GradCache()
    prefix = model(input_ids=ids[first, :start], attention_mask=att[first, :start], position_ids=pos[first, :start],
                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    first_lp = prefix.log_softmax(-1)[row_group].gather(-1, ids[:, start:start + 1]).squeeze(-1)
    if has_split_head(model):
        hidden = model.model(input_ids=ids[:, start:], attention_mask=att, position_ids=pos[:, start:],
                             cache=cache.expand(row_group), use_cache=True).last_hidden_state[:, :-1]
        rest_lp = picked_logprobs(model, hidden, ids[:, start + 1:], budget)
    else:
        rest = model(input_ids=ids[:, start:], attention_mask=att, position_ids=pos[:, start:],
                     cache=cache.expand(row_group), use_cache=True).logits[:, :-1].float()
        rest_lp = rest.log_softmax(-1).gather(-1, ids[:, start + 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(torch.cat([first_lp[:, None], rest_lp], dim=1), (start, 0))


def _head_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight).float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def picked_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, budget: int | None = None) -> torch.Tensor:
    """``hidden`` [N, T, H] final hidden states, ``targets`` [N, T] -> log p(target) [N, T] under ``model``'s LM
    head (``get_output_embeddings()``, no bias), float32. Rows go through the head in slices of at most ``budget``
    (default :data:`LOGITS_BUDGET`) logits; with more than one slice each is recomputed in the backward pass
    instead of kept, so peak memory holds one slice's logits. Equal to the one-shot computation (tested)."""
    head = model.get_output_embeddings()
    n, t = targets.shape
    vocab = head.weight.shape[0]
    rows = max(1, (budget or LOGITS_BUDGET) // max(1, t * vocab))
    if rows >= n:
        return _head_logprobs(hidden, targets, head.weight)
    parts = []
    for i in range(0, n, rows):
        h, y = hidden[i:i + rows], targets[i:i + rows]
        parts.append(checkpoint(_head_logprobs, h, y, head.weight, use_reentrant=False)
                     if torch.is_grad_enabled() else _head_logprobs(h, y, head.weight))
    return torch.cat(parts)


def token_logprobs(model, batch: dict[str, torch.Tensor], start: int = 1, budget: int | None = None) -> torch.Tensor:
    """Log-prob of each token given the ones before it, [N, T], from one forward pass; columns before
    ``start`` (e.g. a rollout's prompts, ``batch["prompt_width"]``) are 0 and cost no LM-head work. The LM head
    runs in slices (:func:`picked_logprobs`) where the model allows it."""
    t = batch["input_ids"].shape[1]
    start = max(1, int(start))
    targets = batch["input_ids"][:, start:]
    if has_split_head(model):
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"]).last_hidden_state[:, start - 1:-1]
        picked = picked_logprobs(model, hidden, targets, budget)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=t - start + 1).logits[:, :-1].float()
        picked = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return torch.nn.functional.pad(picked, (start, 0))


def policy_logprobs(model, batch: dict[str, torch.Tensor], start: int, budget: int | None = None) -> torch.Tensor:
    """The log-probs of a rollout batch under ``model`` for the policy loss: :func:`grouped_logprobs` (each
    prompt once per group) when the model's forward takes any cache object (``accepts_any_cache``: nemotron-nas),
    else :func:`token_logprobs` (one plain forward). Both equal the full forward (tested)."""
    if getattr(model, "accepts_any_cache", False):
        return grouped_logprobs(model, batch, start, budget)
    return token_logprobs(model, batch, start, budget)
