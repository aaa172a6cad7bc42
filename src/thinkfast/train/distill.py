"""Losses of global knowledge distillation (recovery training after Puzzle and FFN Fusion).

Paper: Puzzle (arXiv 2411.19146), global knowledge distillation (REFERENCE.md section 1): after assembly
the child learns from its parent with ``sum_layers (1 - cos(h_child, h_parent)) + KL(p_parent || p_child)``;
adding the LM loss hurt there, so it is off by default (``lm_weight``). The KL is the forward KL over the
vocabulary per token, with a temperature ``tau`` applied to both sides and the usual ``tau**2`` factor
(Hinton et al.) so that gradients keep their scale; ``tau = 1`` is the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["cosine_loss", "distill_loss", "forward_kl", "layer_map"]


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token ``KL(p_teacher || p_student)`` at ``temperature``, times ``temperature**2``.
    Logits ``[..., V]``; computed in float32."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


def cosine_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``sum over (s, t) in pairs`` of the mean over tokens of ``1 - cos(h_student[s], h_teacher[t])``,
    where ``h[k]`` is the residual stream after layer ``k`` (``hidden_states[k + 1]``)."""
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        a, b = student_hidden[s + 1].float(), teacher_hidden[t + 1].float()
        total = total + (1 - F.cosine_similarity(a, b, dim=-1)).mean()
    return total


def layer_map(student_layers: int, teacher_layers: int, recorded: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``(student layer, teacher layer)`` pairs whose outputs should agree: ``recorded[i]`` is the teacher
    layer that student layer ``i`` ends (``fuse`` writes it); otherwise layer ``i`` to layer ``i`` when the
    depths match (a Puzzle child), else only the last layers."""
    if recorded is not None:
        if len(recorded) != student_layers or any(not 0 <= t < teacher_layers for t in recorded):
            raise ValueError(f"layer map {list(recorded)} does not fit {student_layers} student and "
                             f"{teacher_layers} teacher layers")
        return list(enumerate(recorded))
    if student_layers == teacher_layers:
        return [(i, i) for i in range(student_layers)]
    return [(student_layers - 1, teacher_layers - 1)]


def distill_loss(student_out, teacher_out, labels: torch.Tensor, pairs: Sequence[tuple[int, int]], *,
                 temperature: float = 1.0, kl_weight: float = 1.0, cosine_weight: float = 1.0,
                 lm_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the KL, the hidden-state cosine loss and the LM loss, and each part's value.
    ``teacher_out`` may be None when only ``lm_weight`` is set (continued pretraining)."""
    parts: dict[str, torch.Tensor] = {}
    if kl_weight:
        parts["kl"] = forward_kl(teacher_out.logits, student_out.logits, temperature)
    if cosine_weight and pairs:
        parts["cosine"] = cosine_loss(student_out.hidden_states, teacher_out.hidden_states, pairs)
    if lm_weight:
        logits = student_out.logits.float()
        parts["lm"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    weights = {"kl": kl_weight, "cosine": cosine_weight, "lm": lm_weight}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}
