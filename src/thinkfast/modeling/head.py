"""Where a causal LM's logits come from, for the training code that applies the LM head itself (to the
positions it needs, or a slice of rows at a time) instead of taking ``.logits`` of every position."""

from __future__ import annotations

import torch


def has_split_head(model) -> bool:
    """Whether ``model`` is a causal LM whose final hidden states come from ``model.model`` and whose logits are
    ``get_output_embeddings()`` of them, unscaled and without bias (nemotron-nas, Llama): then the head may be
    applied to any subset of the hidden states."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return (isinstance(getattr(model, "model", None), torch.nn.Module) and isinstance(head, torch.nn.Linear)
            and head.bias is None and getattr(model.config, "final_logit_softcapping", None) is None
            and getattr(model.config, "logit_scale", None) is None)
