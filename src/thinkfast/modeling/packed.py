"""Packed-sequence attention for transformers' own models (Llama and the like), as nemotron-nas has it natively.

:class:`~thinkfast.modeling.modeling_decilm.PackedLayout` runs each packed sequence's attention alone instead of a
whole row under a block-diagonal dense mask. nemotron-nas models take it as ``packed_layout``; a transformers model
takes it after :func:`use_packed_attention`, which switches the model to the ``thinkfast_packed`` attention of
transformers' attention interface: with ``packed_layout`` among the forward's keyword arguments (and no cache
before the tokens) it attends per sequence; otherwise it is transformers' ``sdpa`` attention unchanged, so
generation and unpacked batches behave as before. A model that was not switched ignores ``packed_layout`` and
uses the dense mask that :func:`thinkfast.data.packed_attention` passes beside it: the same result, slower.
"""

from __future__ import annotations

from .modeling_decilm import DeciLMPreTrainedModel, PackedLayout, packed_attention

NAME = "thinkfast_packed"
_registered = False


def _register() -> bool:
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers without the attention interface: the dense mask serves
        return False

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed_layout=None,
                  **kwargs):
        if not isinstance(packed_layout, PackedLayout) or query.shape[2] != key.shape[2]:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return packed_attention(query, key, value, packed_layout, scale=scaling, dropout_p=dropout), None

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True
    return True


def use_packed_attention(model):
    """Switch a transformers model that attends with ``sdpa`` to ``thinkfast_packed`` (``packed_layout`` honoured);
    nemotron-nas models, and models on any other attention, are returned unchanged. Not saved with the model:
    ``save_pretrained`` writes no attention implementation."""
    if isinstance(model, DeciLMPreTrainedModel):
        return model
    if getattr(model.config, "_attn_implementation", None) == "sdpa" and _register():
        model.set_attn_implementation(NAME)
    return model
