"""Rollouts for RL: groups of sampled completions per prompt, as one record that losses read.

:func:`rollout` samples ``group_size`` completions for each prompt with the rollout engine
(:func:`thinkfast.generation.generate`) and returns a :class:`Rollout`: per completion its prompt, group
id, token ids, finish reason and the sampler's log-probs. :meth:`Rollout.batch` lays them out for a
training forward pass: ``[pad.. prompt | completion ..pad]`` rows with attention and position ids, a
completion mask (the tokens the policy produced) and the sampler's log-probs aligned to the tokens.

Which log-probs the policy ratio uses: the sampler's are those of the model's own distribution
(temperature 1) computed in the engine's cached decode; GRPO (:mod:`thinkfast.rl.grpo`) recomputes
the "old" log-probs with the training model's full forward pass before its first update on a rollout
(``logprobs="recompute"``, the default), so the ratio is exactly 1 on the first update and only
training numerics enter it; ``logprobs="sampler"`` uses the engine's instead (off by about 1e-6 in
float32; the gap grows with low-precision samplers such as vLLM's bf16).

The interface a different engine (the vLLM backend of the scale-out issue) implements is
``generate(model, prompts, params) -> list[Completion]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generation import Completion, SamplingParams, generate

__all__ = ["Rollout", "rollout"]


@dataclass
class Rollout:
    """Completions of prompts in groups: ``prompts[i]`` and ``completions[i]`` belong to group ``groups[i]``."""

    prompts: list[list[int]]
    completions: list[Completion]
    groups: list[int]

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, rows: list[int]) -> Rollout:
        return Rollout([self.prompts[i] for i in rows], [self.completions[i] for i in rows],
                       [self.groups[i] for i in rows])

    def batch(self, pad_id: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``position_ids`` [N, T]; ``completion_mask`` [N, T] (1 on the
        completion's tokens); ``sampler_logprobs`` [N, T] (the engine's log-prob of token t at position t,
        0 elsewhere); ``group`` [N]. T = longest prompt + longest completion; prompts are left-padded,
        completions right-padded, so every prompt ends at the same column."""
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
        return {k: v.to(device) for k, v in out.items()}


def rollout(model, prompts: list[list[int]], group_size: int, params: SamplingParams, *,
            generate_fn=generate) -> Rollout:
    """``group_size`` completions of every prompt (group i = prompt i), sampled by ``generate_fn``."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    flat = [p for p in prompts for _ in range(group_size)]
    groups = [g for g in range(len(prompts)) for _ in range(group_size)]
    return Rollout(flat, generate_fn(model, flat, params), groups)


def token_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-prob of each token given the ones before it, [N, T] (position 0: 0), from one forward pass."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, :-1].float()
    picked = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0))
