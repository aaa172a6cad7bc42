"""The parent side of Puzzle: record each layer's input / mid-layer / output activations, run the model from a given layer on, and read the library.

Shapes: ``ids`` [B, T]; activations [B, T, H]; logits [B, T, V].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..artifacts import LIBRARY_FORMAT, read_library
from ..modeling import DeciLMForCausalLM
from ..data import positions_and_mask

__all__ = ["LIBRARY_FORMAT", "LayerIO", "LibraryBlock", "block_module", "kl_and_lm_loss", "layer_io", "library_blocks",
           "logits_from", "read_library"]  # LIBRARY_FORMAT, read_library: from thinkfast.artifacts


@dataclass
class LayerIO:
    """Per-layer parent activations of one batch: ``x[i]`` enters layer i, ``mid[i]`` leaves its
    attention (equals ``x[i]`` when the attention is a no-op), ``y[i]`` leaves the layer."""

    cos: torch.Tensor
    sin: torch.Tensor
    x: list[torch.Tensor]
    mid: list[torch.Tensor]
    y: list[torch.Tensor]
    mask: torch.Tensor | None = None  # the attention mask of the run (None: plain causal)


@torch.no_grad()
def layer_io(model: DeciLMForCausalLM, ids: torch.Tensor, eos_id: int | None = None) -> LayerIO:
    """Run the parent once on ``ids`` [B, T] (causal, no cache) and keep every layer's activations;
    ``eos_id`` given: documents closed by it attend only to themselves (``data.doc_mask``)."""
    inner = model.model
    x = inner.embed_tokens(ids)
    pos, mask = positions_and_mask(ids, eos_id)
    cos, sin = inner.rotary_emb(x, pos)
    xs, mids, ys = [], [], []
    for layer in inner.layers:
        xs.append(x)
        h = x
        if layer.attention_spec.kind != "no_op":
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, mask, None)
        mids.append(h)
        if layer.ffn_spec.kind != "no_op":
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        ys.append(h)
        x = h
    return LayerIO(cos, sin, xs, mids, ys, mask)


def logits_from(model: DeciLMForCausalLM, h: torch.Tensor, start: int, cos, sin, mask=None) -> torch.Tensor:
    """Logits after running parent layers ``start..`` on the residual stream ``h``."""
    for layer in model.model.layers[start:]:
        h = layer(h, cos, sin, mask, None)
    return model.lm_head(model.model.norm(h)).float()


def kl_and_lm_loss(parent_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean per-token KL(parent || model) and LM cross-entropy of ``logits`` on next tokens ``labels`` [B, T]."""
    logp = F.log_softmax(parent_logits.float(), -1)
    logq = F.log_softmax(logits.float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    lm = F.cross_entropy(logq.reshape(-1, logq.shape[-1]), labels.reshape(-1))
    return float(kl), float(lm)


@dataclass
class LibraryBlock:
    """A whole-layer choice from the library: one attention and one FFN variant with their weights
    (parameter names as inside a nemotron-nas layer)."""

    layer: int
    attention: str
    ffn: str
    attention_spec: dict
    ffn_spec: dict
    state: dict  # name -> tensor, attention and FFN parameters of the layer

    @property
    def name(self) -> str:
        return f"{self.attention}+{self.ffn}"


def library_blocks(lib: dict, tensors: dict[str, torch.Tensor], layer: int) -> list[LibraryBlock]:
    """Every (attention, FFN) choice the library offers for ``layer``, parent's own first.

    Decoupled libraries combine every attention variant with every FFN variant; coupled ones list the
    pairs they trained."""
    entries = [v for v in lib["variants"] if v["layer"] == layer]
    if not entries:
        raise KeyError(f"the library has no variants for layer {layer} (its layers: {lib['layers']})")

    def weights(v):
        prefix = f"layers.{layer}.{v['weights']}."
        return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}

    if lib["mode"] == "coupled":
        return [LibraryBlock(layer, v["attention"], v["ffn"], v["attention_spec"], v["ffn_spec"], weights(v))
                for v in entries]
    att = [v for v in entries if v["part"] == "attention"]
    ffn = [v for v in entries if v["part"] == "ffn"]
    return [LibraryBlock(layer, a["name"], f["name"], a["spec"], f["spec"], {**weights(a), **weights(f)})
            for a in att for f in ffn]


def block_module(config, block: LibraryBlock):
    """The library block as one nemotron-nas layer (``forward(x, cos, sin, mask, cache)``)."""
    from ..modeling import DeciLMConfig
    from ..modeling.configuration_decilm import block_config
    from ..modeling.modeling_decilm import DeciLMDecoderLayer

    one = DeciLMConfig(**{**config.to_dict(), "num_hidden_layers": 1,
                          "block_configs": [block_config(block.attention_spec, block.ffn_spec)]})
    layer = DeciLMDecoderLayer(one, 0, cache_idx=0)
    layer.load_state_dict(block.state, strict=True)
    return layer
