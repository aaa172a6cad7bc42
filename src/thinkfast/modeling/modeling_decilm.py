# Copyright 2026 the thinkfast authors. Apache-2.0.
"""The heterogeneous ``nemotron-nas`` (DeciLM) decoder: a Llama whose layers differ.

This file travels inside every checkpoint folder thinkfast writes, so that ``trust_remote_code=True``
loads the model in a process that has never imported thinkfast. It therefore depends only on torch,
transformers' stable base classes and ``configuration_decilm.py`` beside it.

Each layer ``i`` (REFERENCE.md sections 1-2) is::

    x = x + attention_i(input_layernorm_i(x))         # skipped entirely when attention_i is no-op
    x = x + ffn_i(post_attention_layernorm_i(x))      # skipped entirely when ffn_i is no-op

attention_i: GQA with ``num_attention_heads // n_heads_in_group`` KV heads; or ``linear_attn``, one
H x H matrix (each token attends only to itself); or no-op. ffn_i: SwiGLU of any width; or
``linear_mlp``, one H x H matrix; or no-op. Weight names are Llama's, so a homogeneous model has exactly
the state dict of ``LlamaForCausalLM``.

KV cache: only GQA layers store keys and values. They use consecutive cache slots (``cache_idx``
0, 1, ...), so a standard ``transformers`` ``DynamicCache`` works and ``get_seq_length()`` (slot 0) is
right whatever layer holds the first attention. A model with no attention at all needs no cache: every
token's output then depends on that token alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast,
                                           SequenceClassifierOutputWithPast)

from .configuration_decilm import DeciLMConfig

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
# transformers >= 5.24 renamed ``past_key_values`` to ``cache`` (arguments and output fields; the old
# name still works with a deprecation warning). Both names are accepted; outputs use the current one.
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class DeciLMRMSNorm(nn.Module):
    """RMSNorm computed in float32, as Llama's. x: [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


def rope_inv_freq(config: DeciLMConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2] for rope_scaling None/default, linear or llama3."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3 are)")


class DeciLMRotaryEmbedding(nn.Module):
    """RoPE cos/sin. The frequencies are a plain attribute, not a buffer: transformers builds models on
    the meta device when loading, and a non-persistent buffer would come back uninitialised."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.config = config
        self._inv_freq: torch.Tensor | None = None

    @property
    def inv_freq(self) -> torch.Tensor:
        if self._inv_freq is None:
            self._inv_freq = rope_inv_freq(self.config)
        return self._inv_freq

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> (cos, sin), each [B, T, head_dim] in x's dtype."""
        inv = self.inv_freq.to(x.device)[None, :, None].expand(position_ids.shape[0], -1, 1)
        pos = position_ids[:, None, :].float()
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = (inv @ pos).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, nh, T, d], k [B, nkv, T, d], cos/sin [B, T, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class PackedLayout:
    """Rows of whole sequences packed side by side, each attending causally to itself only: the block-diagonal
    causal mask of packed training (Llama 3's pretraining; Megatron's ``reset_attention_mask``), computed as
    attention over each sequence alone instead of over the whole row under a dense mask.

    ``seq_ids`` [B, T]: a sequence's index within its row, the same over its contiguous tokens; -1 on padding
    (each padding token attends to itself only, as ``thinkfast.data.block_causal_mask`` says). The sequences are gathered into
    buckets of equal padded length (a multiple of ``multiple``; a one-token sequence stays one token) and each
    bucket is one causal ``scaled_dot_product_attention`` call, so the work grows with the sum of the squared
    sequence lengths, not with ``B * T**2`` (on the nano world's rows the attention runs 2.0x faster than under the
    dense mask, a pretraining step 1.34x: ``benchmarks/packed_attention.py``; the outputs are equal,
    ``tests/test_packed_attention.py``). Built once per batch and shared by every layer.
    """

    def __init__(self, seq_ids: torch.Tensor, multiple: int = 32):
        if seq_ids.dim() != 2:
            raise ValueError(f"seq_ids must be [B, T], got {list(seq_ids.shape)}")
        b, t = seq_ids.shape
        device, n = seq_ids.device, b * t
        flat = seq_ids.reshape(-1).long()
        row = torch.arange(b, device=device).repeat_interleave(t)
        start = torch.ones(n, dtype=torch.bool, device=device)
        start[1:] = (flat[1:] != flat[:-1]) | (row[1:] != row[:-1]) | (flat[1:] < 0)
        starts = start.nonzero().squeeze(1)
        lengths = torch.diff(starts, append=torch.tensor([n], device=device))
        real = flat[starts] >= 0
        keys = row[starts][real] * (t + 1) + flat[starts][real]
        if keys.numel() != torch.unique(keys).numel():
            raise ValueError("PackedLayout: a sequence's tokens must be contiguous in their row (an id appears in "
                             "two places)")
        padded = torch.where(lengths == 1, lengths, (lengths + multiple - 1) // multiple * multiple)
        index, self.buckets, inverse, offset = [], [], torch.empty(n, dtype=torch.long, device=device), 0
        for width in torch.unique(padded).tolist():
            chosen = (padded == width).nonzero().squeeze(1)
            s, ln = starts[chosen], lengths[chosen]
            span = torch.arange(width, device=device)
            valid = span[None] < ln[:, None]
            idx = torch.where(valid, s[:, None] + span[None], n)  # n: a zero row after the last token
            index.append(idx.reshape(-1))
            inverse[idx[valid]] = (offset + torch.arange(len(chosen) * width, device=device).view(-1, width))[valid]
            self.buckets.append((len(chosen), width))
            offset += len(chosen) * width
        self.index, self.inverse, self.shape = torch.cat(index), inverse, (b, t)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
                     scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of each packed sequence to itself: q [B, Hq, T, D], k and v [B, Hkv, T, D] (Hq a multiple
    of Hkv) -> [B, T, Hq, D]."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if (b, t) != layout.shape:
        raise ValueError(f"PackedLayout is for [B, T] = {list(layout.shape)}, the attention's is {[b, t]}")
    sizes = [n * w for n, w in layout.buckets]

    def gather(x):  # [B, H, T, D] -> one [n * width, H * D] piece per bucket
        x = x.transpose(1, 2).reshape(b * t, -1)
        return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, layout.index).split(sizes)

    extra = {}
    outs = []
    for (n, w), qb, kb, vb in zip(layout.buckets, gather(q), gather(k), gather(v)):
        qb, kb, vb = (x.view(n, w, -1, d).transpose(1, 2) for x in (qb, kb, vb))
        if hkv != hq:
            if _SDPA_GQA:
                extra["enable_gqa"] = True
            else:
                kb, vb = kb.repeat_interleave(hq // hkv, dim=1), vb.repeat_interleave(hq // hkv, dim=1)
        o = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p, is_causal=w > 1, scale=scale, **extra)
        outs.append(o.transpose(1, 2).reshape(n * w, hq * d))
    return torch.cat(outs).index_select(0, layout.inverse).view(b, t, hq, d)


class DeciLMAttention(nn.Module):
    """Grouped-query attention with its own number of KV heads."""

    def __init__(self, config: DeciLMConfig, n_heads_in_group: int, cache_idx: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads // n_heads_in_group
        self.n_rep = n_heads_in_group
        self.head_dim = config.head_dim
        self.cache_idx = cache_idx
        self.dropout = config.attention_dropout
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)

    def forward(self, x, cos, sin, mask, past_key_values: Cache | None):
        """x [B, T, H]; mask: None (plain causal, no cache), bool [B, 1, T, S] (True = attend) or a
        :class:`PackedLayout` (packed sequences, nothing cached before them)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.cache_idx)
        if isinstance(mask, PackedLayout):  # packed sequences, each attending to itself (no cache before them)
            out = packed_attention(q, k, v, mask, self.head_dim**-0.5, self.dropout if self.training else 0.0)
            return self.o_proj(out.reshape(b, t, -1))
        extra = {}
        if self.n_rep > 1:
            if _SDPA_GQA:  # torch >= 2.5: no copy of the cache per step
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(self.n_rep, dim=1)
                v = v.repeat_interleave(self.n_rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and t > 1,
            scale=self.head_dim**-0.5,
            **extra,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one H x H matrix: each token attends only to itself (``W_o @ W_v``)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past_key_values):
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). x [..., H] -> [..., H]."""

    def __init__(self, config: DeciLMConfig, intermediate_size: int):
        super().__init__()
        h, bias = config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    """FFN replaced by one H x H matrix (``W_down @ W_up``)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    """One heterogeneous layer. No-op sub-blocks have neither module nor norm (released weight names)."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_idx: int | None):
        super().__init__()
        att, ffn = config.block_specs()[layer_idx]
        self.layer_idx = layer_idx
        self.attention_spec, self.ffn_spec = att, ffn
        if att.kind != "no_op":
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            if att.kind == "gqa":
                self.self_attn = DeciLMAttention(config, att.n_heads_in_group, cache_idx)
            else:
                self.self_attn = DeciLMLinearAttention(config)
        if ffn.kind != "no_op":
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            if ffn.kind == "swiglu":
                self.mlp = DeciLMMLP(config, ffn.intermediate_size)
            else:
                self.mlp = DeciLMLinearMLP(config)

    def forward(self, x, cos, sin, mask, past_key_values):
        if self.attention_spec.kind != "no_op":
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key_values)
        if self.ffn_spec.kind != "no_op":
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Bool mask [B or 1, 1, q_len, past_len + q_len] (True = attend), or None for plain causal.

    attention_mask: [B, past_len + q_len] with 1 for real tokens, 0 for padding, or None; or a 4D mask
    [B, 1, q_len, past_len + q_len], used as it is.
    Every query may always attend to its own position, so rows of padding never go fully masked
    (their outputs are meaningless but finite).
    """
    if attention_mask is not None and attention_mask.dim() == 4:  # given whole (e.g. packed samples' blocks)
        if attention_mask.shape[-2:] != (q_len, past_len + q_len):
            raise ValueError(f"a 4D attention_mask must be [B, 1, {q_len}, {past_len + q_len}], "
                             f"got {list(attention_mask.shape)}")
        # bool: True = attend; float: additive (0 = attend), as transformers passes 4D masks
        return (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0).to(device)
    kv_len = past_len + q_len
    if attention_mask is None or bool(attention_mask.all()):
        if past_len == 0:
            return None
        if q_len == 1:
            return None  # one new token attends to everything cached
    q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        pad = attention_mask[:, None, None, -kv_len:].to(device=device, dtype=torch.bool)
        mask = (mask & pad) | (k_pos == q_pos)[None, None]
    return mask


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_cache_class = True
    _supports_static_cache = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, DeciLMRMSNorm):
            module.weight.data.fill_(1.0)


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers, next_slot = [], 0
        for i, (att, _) in enumerate(config.block_specs()):
            layers.append(DeciLMDecoderLayer(config, i, next_slot if att.kind == "gqa" else None))
            next_slot += att.kind == "gqa"
        self.layers = nn.ModuleList(layers)
        self.num_cache_layers = next_slot
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        packed_layout: PackedLayout | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T] -> last_hidden_state [B, T, H].

        ``hidden_states`` (when requested) has num_hidden_layers + 1 entries: the embeddings, then the
        output of each layer, the last one *before* the final norm (unlike Llama's, whose last entry is
        normed; the final normed state is ``last_hidden_state``).

        ``packed_layout`` (:class:`PackedLayout`, nothing cached before this call): rows of packed sequences, each
        attending to itself only; it replaces ``attention_mask`` (which may then hold the same rule as a dense
        mask, for models without this argument).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if past_key_values is None:
            past_key_values = cache
        if past_key_values is not None and not (hasattr(past_key_values, "update")
                                                and hasattr(past_key_values, "get_seq_length")):
            raise TypeError("past_key_values must be a cache object (e.g. transformers' DynamicCache), not a tuple")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        b, t, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t, device=inputs_embeds.device)[None].expand(b, -1)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        if packed_layout is not None:
            if past_len:
                raise ValueError("packed_layout attends within the given tokens: it takes no cached keys before them")
            mask = packed_layout
        else:
            mask = build_attention_mask(attention_mask, t, past_len, inputs_embeds.device)
        layer_cache = past_key_values if use_cache else None

        x = inputs_embeds
        all_hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, layer_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, layer_cache)
            if output_hidden_states:
                all_hidden.append(x)
        x = self.norm(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            **{_CACHE_FIELD: past_key_values if use_cache else None},
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    # forward(cache=...) takes any object with update(keys, values, layer) and get_seq_length(): a prompt's keys and
    # values can be shared by many rows (thinkfast.rl.rollout.grouped_logprobs)
    accepts_any_cache = True
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        packed_layout: PackedLayout | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T', V] (T' = T, or the last ``logits_to_keep`` positions).

        ``labels`` [B, T] gives the mean next-token cross entropy over labels != -100.
        """
        logits_to_keep = kwargs.pop("num_logits_to_keep", logits_to_keep)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            packed_layout=packed_layout,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        )


def last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last position whose mask is 1 in each row of ``attention_mask`` [B, T] (left or right
    padding alike; a row without any 1 gives T - 1)."""
    t = attention_mask.shape[-1]
    return (t - 1 - attention_mask.flip(-1).to(torch.int64).argmax(-1)).long()


class DeciLMForSequenceClassification(DeciLMPreTrainedModel):
    """A scalar (``num_labels``) head on the nemotron-nas decoder, laid out as transformers'
    ``LlamaForSequenceClassification``: ``model`` (the decoder) and ``score`` (Linear(hidden, num_labels,
    bias=False)), so a causal LM's folder loads into it (``lm_head`` dropped, ``score`` initialised) and a reward
    model saved from it loads with ``AutoModelForSequenceClassification`` (with ``trust_remote_code=True`` where
    thinkfast is not installed).

    Where the score is read: given a 2D ``attention_mask``, at the last position whose mask is 1 (left or right
    padding alike), and the position ids count the real tokens only (so a left-padded row computes what the
    unpadded one does). Without a mask, transformers' rule: the rightmost token that is not ``pad_token_id``.
    That rule misreads a sequence that ends in its pad token (pad = eos, as in many tokenizers: the token
    before the final eos is scored, and older transformers read at the *first* pad, scoring the prompt,
    transformers#35352); thinkfast therefore always passes the attention mask.
    """

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DeciLMModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """input_ids [B, T] (or inputs_embeds [B, T, H]) -> logits [B, num_labels], read at each row's last
        real token (see the class docstring). ``labels`` [B]: mean squared error for one label, else cross
        entropy (transformers' single-label rules)."""
        mask2d = attention_mask is not None and attention_mask.dim() == 2
        past = past_key_values if past_key_values is not None else cache
        if position_ids is None and mask2d and past is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache if use_cache is not None else False,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        b, t = hidden.shape[:2]
        if mask2d:
            last = last_attended(attention_mask[:, -t:]).to(hidden.device)
        elif self.config.pad_token_id is None or input_ids is None:
            if b != 1 and self.config.pad_token_id is None:
                raise ValueError("cannot find the last token of a batch without attention_mask or pad_token_id")
            last = torch.full((b,), t - 1, dtype=torch.long, device=hidden.device)
        else:  # transformers' rule: the rightmost token that is not the pad token
            not_pad = (input_ids != self.config.pad_token_id).to(hidden.device, torch.int64)
            last = (torch.arange(t, device=hidden.device) * not_pad).argmax(-1)
        logits = self.score(hidden[torch.arange(b, device=hidden.device), last])
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
            else:
                loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        )
