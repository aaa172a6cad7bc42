"""Attention inside packed rows: each packed sample (SFT) or document (pretraining, distillation, the
Puzzle stages with ``data.doc_mask``) attends only to itself, with positions from 0, so that it gets the
logits it gets alone (the block-diagonal causal mask of Llama 3's pretraining, Megatron's
``reset_attention_mask`` / ``reset_position_ids``)."""

from __future__ import annotations

import torch

__all__ = ["block_causal_mask", "doc_attention", "document_ids", "positions_and_mask"]


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """``seq_ids`` [B, T] -> bool [B, 1, T, T]: token i attends to token j <= i of the same sample. Padding
    (-1) attends to itself only, so no row is fully masked."""
    t = seq_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, :, None] >= 0)
    eye = torch.eye(t, dtype=torch.bool, device=seq_ids.device)
    return ((same & causal) | eye)[:, None]


def document_ids(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of documents each closed by ``eos_id`` (pretraining's packing) -> ``seq_ids`` (the document's
    index within its row; an end-of-text token belongs to the document it closes) and ``position_ids``
    (from 0 in every document), each ``[B, T]``: with :func:`block_causal_mask`, every document of a row
    gets the logits it gets alone."""
    closes = (ids == eos_id).long()
    seq = torch.cumsum(closes, dim=-1) - closes  # the eos itself stays in its document
    t = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    first = torch.ones_like(closes, dtype=torch.bool)
    first[:, 1:] = seq[:, 1:] != seq[:, :-1]
    start = torch.cummax(torch.where(first, t, torch.zeros_like(t)), dim=-1).values
    return seq, t - start


def doc_attention(ids: torch.Tensor, eos_id: int | None) -> dict[str, torch.Tensor]:
    """Keyword arguments for a model's forward on rows ``ids`` [B, T] of documents closed by ``eos_id``:
    ``attention_mask`` (bool [B, 1, T, T]) and ``position_ids``; ``{}`` (plain causal attention over the
    whole row) when ``eos_id`` is None."""
    if eos_id is None:
        return {}
    pos, mask = positions_and_mask(ids, eos_id)
    return {"attention_mask": mask, "position_ids": pos}


def positions_and_mask(ids: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(position_ids, mask)`` for running a model's layers by hand on ``ids`` [B, T]: positions from 0 in
    each document and the block-diagonal mask, or (``eos_id`` None) positions over the row and ``None``
    (plain causal)."""
    if eos_id is None:
        return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1), None
    seq, pos = document_ids(ids, eos_id)
    return pos, block_causal_mask(seq)
