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

from ..data import doc_attention

__all__ = ["TeacherCache", "cosine_loss", "distill_loss", "forward_kl", "layer_map", "topk_kl"]


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


def layer_map(student_layers: int, teacher_layers: int, recorded: Sequence[Sequence[int]] | None = None,
              identity: Sequence[bool] | None = None) -> list[tuple[int, int]]:
    """``(student layer, teacher layer)`` pairs whose outputs should agree. ``recorded[i]``: the teacher
    layers whose outputs student layer ``i``'s output reproduces (``fuse`` writes them: its own layer, or a
    fused group's last, and the identity layers dropped after it, through which the residual stream passes
    unchanged); each student layer is paired with the last of them, the state the next
    kept layer reads. Otherwise, when the depths match (a Puzzle child), layer ``i`` to layer ``i``, and where
    ``identity`` flags the student's identity layers (both sub-blocks no-op) each other layer to the last
    of the identity layers after it, the identities unpaired; else only the last layers. (The paper's sum
    over every layer of a child that keeps its no-op layers pairs a layer with each identity after it as
    well: measured worse, docs/LOG.md session 19.)"""
    if recorded is not None:
        spans = [list(span) for span in recorded]
        flat = [t for span in spans for t in span]
        if (len(spans) != student_layers or not all(spans) or any(not 0 <= t < teacher_layers for t in flat)
                or flat != sorted(set(flat))):
            raise ValueError(f"layer map {list(recorded)} does not fit {student_layers} student and "
                             f"{teacher_layers} teacher layers (one non-empty, increasing span of teacher "
                             "layers per student layer)")
        return [(i, span[-1]) for i, span in enumerate(spans)]
    if student_layers == teacher_layers:
        if identity is None:
            return [(i, i) for i in range(student_layers)]
        if len(identity) != student_layers:
            raise ValueError(f"identity flags {list(identity)} for {student_layers} layers")
        pairs: list[tuple[int, int]] = []
        for i, ident in enumerate(identity):
            if ident and pairs:
                pairs[-1] = (pairs[-1][0], i)
            elif not ident:
                pairs.append((i, i))
        return pairs
    return [(student_layers - 1, teacher_layers - 1)]


def distill_loss(student_out, teacher_out, labels: torch.Tensor, pairs: Sequence[tuple[int, int]], *,
                 temperature: float = 1.0, kl_weight: float = 1.0, cosine_weight: float = 1.0,
                 lm_weight: float = 0.0, teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the KL, the hidden-state cosine loss and the LM loss, and each part's value.
    ``teacher_out`` may be None when only ``lm_weight`` is set (continued pretraining), or when the KL is
    taken against cached top-k logits (``teacher_topk``: values, indices; no cosine loss then)."""
    parts: dict[str, torch.Tensor] = {}
    if kl_weight and teacher_topk is not None:
        parts["kl"] = topk_kl(*teacher_topk, student_out.logits, temperature)
    elif kl_weight:
        parts["kl"] = forward_kl(teacher_out.logits, student_out.logits, temperature)
    if cosine_weight and pairs:
        parts["cosine"] = cosine_loss(student_out.hidden_states, teacher_out.hidden_states, pairs)
    if lm_weight:
        logits = student_out.logits.float()
        parts["lm"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    weights = {"kl": kl_weight, "cosine": cosine_weight, "lm": lm_weight}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def topk_kl(top_values: torch.Tensor, top_indices: torch.Tensor, student_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """:func:`forward_kl` against a cached teacher: its ``k`` largest logits per token (``top_values``,
    ``top_indices``, ``[..., k]``), renormalised over those ``k`` tokens; the student's log-probabilities come
    from its full softmax. With ``k`` = the vocabulary it equals :func:`forward_kl`."""
    t = F.log_softmax(top_values.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1).gather(-1, top_indices.long())
    return (t.exp() * (t - s)).sum(-1).mean() * temperature**2


class TeacherCache:
    """The teacher's top-``k`` logits for every training step's rows, computed once and kept on disk in
    shards of ``shard_steps`` steps (``cache/shard-00000.safetensors``: ``ids`` int32 ``[steps, B, T]``,
    ``values`` bfloat16 and ``indices`` int32 ``[steps, B, T-1, k]``), so that training needs only the
    student in memory. Each shard is written atomically; an interrupted build resumes at the first missing
    shard."""

    def __init__(self, path, k: int, shard_steps: int = 25):
        from pathlib import Path

        self.path, self.k, self.shard_steps = Path(path), k, shard_steps
        self._loaded: tuple[int, dict] | None = None

    def _file(self, shard: int):
        return self.path / f"shard-{shard:05d}.safetensors"

    @torch.no_grad()
    def build(self, teacher, rows, steps: int, progress: bool = True, eos_id: int | None = None) -> None:
        """``rows(step)`` -> the step's token ids ``[B, T]``; computes the shards that are missing.
        ``eos_id``: documents closed by it attend only to themselves (``data.doc_mask``; :func:`doc_attention`)."""
        import os

        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        self.path.mkdir(parents=True, exist_ok=True)
        shards = range((steps + self.shard_steps - 1) // self.shard_steps)
        todo = [s for s in shards if not self._file(s).is_file()]
        bar = tqdm(total=len(todo) * self.shard_steps, desc="teacher top-k", disable=not progress or not todo,
                   unit="step")
        for s in todo:
            ids, values, indices = [], [], []
            for step in range(s * self.shard_steps, min(steps, (s + 1) * self.shard_steps)):
                x = rows(step)
                inp = x[:, :-1].to(teacher.device)
                top = teacher(inp, **doc_attention(inp, eos_id)).logits.float().topk(self.k, dim=-1)
                ids.append(x.to(torch.int32).cpu())
                values.append(top.values.to(torch.bfloat16).cpu())
                indices.append(top.indices.to(torch.int32).cpu())
                bar.update()
            tmp = self._file(s).with_name(f".{self._file(s).name}.tmp")
            save_file({"ids": torch.stack(ids), "values": torch.stack(values), "indices": torch.stack(indices)},
                      str(tmp))
            os.replace(tmp, self._file(s))
        bar.close()

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids int64 [B, T], values [B, T-1, k], indices int64 [B, T-1, k])`` of ``step``."""
        from safetensors.torch import load_file

        shard, i = divmod(step, self.shard_steps)
        if self._loaded is None or self._loaded[0] != shard:
            self._loaded = (shard, load_file(str(self._file(shard))))
        data = self._loaded[1]
        return data["ids"][i].long(), data["values"][i], data["indices"][i].long()
