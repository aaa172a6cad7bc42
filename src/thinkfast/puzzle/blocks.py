"""Puzzle's search space: per-layer block variants, their modules and their initialisation from the parent.

Paper: Puzzle (arXiv 2411.19146) section 3 (search space) and 4.1 (initialising child blocks);
REFERENCE.md section 1. A *variant* is one replacement for one sub-block of one parent layer:

- attention: GQA with fewer KV heads (``n_heads_in_group`` = heads / kv heads), one H x H linear
  layer, or no-op;
- FFN: SwiGLU of a smaller width, one H x H linear layer, or no-op.

Each variant's module is a :class:`~thinkfast.modeling.modeling_decilm.DeciLMDecoderLayer` whose other
sub-block is a no-op, so its parameter names (``input_layernorm.weight``, ``self_attn.k_proj.weight``,
``post_attention_layernorm.weight``, ``mlp.down_proj.weight``...) are exactly those of a layer of the
assembled nemotron-nas model, and a layer of the child is the attention module followed by the FFN one.

Initialisation (no training), as in the paper:
- narrower FFN: keep the channels with the largest contribution
  ``C_i = mean_tokens |a_i| * ||W_down[:, i]||_2`` (``a`` = ``silu(gate(x)) * up(x)`` measured on
  calibration data), in their original order;
- fewer KV heads: mean-pool the K and V projections of the parent heads merged into each new head;
- linear attention: ``W_o @ W_v`` (what attention computes when a token attends only to itself);
- linear FFN: ``W_down @ W_up`` (the gate is dropped);
- no-op: no parameters; the residual passes through.

Departures: variants always keep the parent's RMSNorm weights (the paper does not say; they are trained
by BLD along with the rest of the block). Projection biases (Llama has none) are carried into pruned and
pooled variants but not into the linear ones, whose single matrix has no bias in the released format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling.configuration_decilm import DeciLMConfig, attention_block, block_config, ffn_block
from ..modeling.modeling_decilm import DeciLMDecoderLayer

__all__ = [
    "Variant",
    "attention_variants",
    "ffn_variants",
    "init_variant",
    "variant_module",
]

_NO_OP_ATTENTION = attention_block(no_op=True)
_NO_OP_FFN = ffn_block(None, 1, no_op=True)


@dataclass(frozen=True)
class Variant:
    """One sub-block option. ``spec`` is its released-schema ``attention`` or ``ffn`` entry."""

    part: str  # "attention" | "ffn"
    name: str  # "gqa_kv2", "ffn_256", "linear", "no_op"
    spec: dict

    def to_dict(self) -> dict:
        return {"part": self.part, "name": self.name, "spec": dict(self.spec)}

    @classmethod
    def from_dict(cls, d: dict) -> Variant:
        return cls(d["part"], d["name"], dict(d["spec"]))


def _attention_name(spec: dict, heads: int) -> str:
    if spec["no_op"]:
        return "no_op"
    if spec["replace_with_linear"]:
        return "linear"
    return f"gqa_kv{heads // spec['n_heads_in_group']}"


def attention_variants(config: DeciLMConfig, layer: int, kv_heads: list[int], linear: bool = True,
                       no_op: bool = True) -> list[Variant]:
    """The parent's own attention first, then GQA with each of ``kv_heads`` (fewer than the parent's
    and dividing the head count), linear and no-op."""
    heads = config.num_attention_heads
    parent = dict(config.block_configs[layer]["attention"])
    out = [Variant("attention", _attention_name(parent, heads), parent)]
    parent_kv = heads // parent["n_heads_in_group"] if parent["n_heads_in_group"] else 0
    for kv in sorted(set(kv_heads), reverse=True):
        if kv < 1 or heads % kv:
            raise ValueError(f"kv_heads: {kv} does not divide num_attention_heads={heads}")
        if parent_kv and kv < parent_kv and parent_kv % kv == 0:
            spec = attention_block(heads // kv)
            out.append(Variant("attention", _attention_name(spec, heads), spec))
    for flag, spec in ((linear, attention_block(linear=True)), (no_op, attention_block(no_op=True))):
        if flag and spec != parent:
            out.append(Variant("attention", _attention_name(spec, heads), spec))
    return out


def round_width(width: float, multiple: int) -> int:
    """Round a width up to a multiple (the released format uses 256), at least one multiple.

    >>> round_width(28672 * 0.87, 256), round_width(344 * 0.1, 8)
    (25088, 40)
    """
    return max(multiple, int(math.ceil(width / multiple - 1e-9) * multiple))


def ffn_variants(config: DeciLMConfig, layer: int, fractions: list[float], multiple: int, linear: bool = True,
                 no_op: bool = True) -> list[Variant]:
    """The parent's own FFN first, then SwiGLU at each fraction of the parent width (rounded up to
    ``multiple``; duplicates and widths >= the parent's dropped), linear and no-op."""
    h = config.hidden_size
    parent = dict(config.block_configs[layer]["ffn"])
    parent_width = config.block_specs()[layer][1].intermediate_size
    name = lambda spec, w: "no_op" if spec["no_op"] else "linear" if spec["replace_with_linear"] else f"ffn_{w}"  # noqa: E731
    out = [Variant("ffn", name(parent, parent_width), parent)]
    seen = {parent_width}
    if parent_width:
        for f in sorted(set(fractions), reverse=True):
            if not 0 < f <= 1:
                raise ValueError(f"ffn_fractions: {f} is not in (0, 1]")
            w = round_width(parent_width * f, multiple)
            if w < parent_width and w not in seen:
                seen.add(w)
                out.append(Variant("ffn", f"ffn_{w}", ffn_block(w, h)))
    for flag, spec in ((linear, ffn_block(None, h, linear=True)), (no_op, ffn_block(None, h, no_op=True))):
        if flag and spec != parent:
            out.append(Variant("ffn", name(spec, 0), spec))
    return out


def variant_module(config: DeciLMConfig, variant: Variant) -> DeciLMDecoderLayer:
    """A one-layer module holding just this variant (the other sub-block is a no-op).

    ``forward(x, cos, sin, mask, cache)`` returns ``x + block(x)``: x [B, T, H] -> [B, T, H].
    """
    if variant.part == "attention":
        block = block_config(variant.spec, _NO_OP_FFN)
    else:
        block = block_config(_NO_OP_ATTENTION, variant.spec)
    one = DeciLMConfig(**{**config.to_dict(), "num_hidden_layers": 1, "block_configs": [block]})
    return DeciLMDecoderLayer(one, 0, cache_idx=0)


def _attention_state(parent: DeciLMDecoderLayer, variant: Variant, heads: int) -> dict[str, torch.Tensor]:
    spec = variant.spec
    if spec["no_op"]:
        return {}
    if parent.attention_spec.kind != "gqa":
        raise ValueError(f"cannot derive attention variant {variant.name} from a {parent.attention_spec.kind} parent block")
    att = parent.self_attn
    norm = {"input_layernorm.weight": parent.input_layernorm.weight.detach().clone()}
    hd, kv_p = att.head_dim, att.num_kv_heads
    if spec["replace_with_linear"]:
        # every query head h reads value head h // n_rep; softmax over one key is 1
        w_v = att.v_proj.weight.detach().view(kv_p, hd, -1).repeat_interleave(att.n_rep, dim=0).reshape(heads * hd, -1)
        return {**norm, "self_attn.linear_attn.weight": att.o_proj.weight.detach() @ w_v}
    kv_c = heads // spec["n_heads_in_group"]
    group = kv_p // kv_c  # consecutive parent KV heads merged into one: query head q keeps reading its group
    state = {**norm,
             "self_attn.q_proj.weight": att.q_proj.weight.detach().clone(),
             "self_attn.o_proj.weight": att.o_proj.weight.detach().clone()}
    for name in ("k_proj", "v_proj"):
        lin = getattr(att, name)
        state[f"self_attn.{name}.weight"] = lin.weight.detach().view(kv_c, group, hd, -1).mean(1).reshape(kv_c * hd, -1)
        if lin.bias is not None:
            state[f"self_attn.{name}.bias"] = lin.bias.detach().view(kv_c, group, hd).mean(1).reshape(-1)
    for name in ("q_proj", "o_proj"):
        if getattr(att, name).bias is not None:
            state[f"self_attn.{name}.bias"] = getattr(att, name).bias.detach().clone()
    return state


def _ffn_state(parent: DeciLMDecoderLayer, variant: Variant, width: int | None,
               contribution: torch.Tensor | None) -> dict[str, torch.Tensor]:
    spec = variant.spec
    if spec["no_op"]:
        return {}
    if parent.ffn_spec.kind != "swiglu":
        raise ValueError(f"cannot derive FFN variant {variant.name} from a {parent.ffn_spec.kind} parent block")
    mlp = parent.mlp
    norm = {"post_attention_layernorm.weight": parent.post_attention_layernorm.weight.detach().clone()}
    if spec["replace_with_linear"]:
        return {**norm, "mlp.linear_mlp.weight": mlp.down_proj.weight.detach() @ mlp.up_proj.weight.detach()}
    if contribution is None:
        raise ValueError(f"FFN variant {variant.name} needs channel contributions (calibration activations)")
    keep = torch.topk(contribution, width).indices.sort().values  # original channel order
    state = {**norm,
             "mlp.gate_proj.weight": mlp.gate_proj.weight.detach()[keep].clone(),
             "mlp.up_proj.weight": mlp.up_proj.weight.detach()[keep].clone(),
             "mlp.down_proj.weight": mlp.down_proj.weight.detach()[:, keep].clone()}
    for name, bias in (("gate_proj", mlp.gate_proj.bias), ("up_proj", mlp.up_proj.bias)):
        if bias is not None:
            state[f"mlp.{name}.bias"] = bias.detach()[keep].clone()
    if mlp.down_proj.bias is not None:
        state["mlp.down_proj.bias"] = mlp.down_proj.bias.detach().clone()
    return state


def channel_contribution(mean_abs_activation: torch.Tensor, down_proj_weight: torch.Tensor) -> torch.Tensor:
    """``C_i = mean_tokens |a_i| * ||W_down[:, i]||_2``: [I] x [H, I] -> [I]."""
    return mean_abs_activation.float() * down_proj_weight.detach().float().norm(dim=0)


def init_variant(config: DeciLMConfig, parent: DeciLMDecoderLayer, variant: Variant,
                 contribution: torch.Tensor | None = None) -> nn.Module:
    """Build ``variant``'s module, initialised from the parent layer by the paper's rules."""
    module = variant_module(config, variant)
    if variant.part == "attention":
        state = _attention_state(parent, variant, config.num_attention_heads)
    else:
        width = module.ffn_spec.intermediate_size
        state = _ffn_state(parent, variant, width, contribution)
    ref = module.state_dict()
    module.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=True)
    return module.to(next(parent.parameters()).device)
