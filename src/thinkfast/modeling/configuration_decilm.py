# Copyright 2026 the thinkfast authors. Apache-2.0.
"""Configuration of the heterogeneous ``nemotron-nas`` (DeciLM) model.

This file travels inside every checkpoint folder thinkfast writes (``trust_remote_code=True`` loads it
without thinkfast installed), so it imports only ``transformers`` and the standard library.

Format (REFERENCE.md section 2; the released Llama-Nemotron checkpoints): ``config.json`` has the usual
Llama keys, ``num_key_value_heads`` and ``intermediate_size`` are null, and ``block_configs`` has one
entry per layer::

    {"attention": {"n_heads_in_group": 8, "no_op": false, "replace_with_linear": false},
     "ffn": {"ffn_mult": 5.25, "no_op": false, "replace_with_linear": false}}

KV heads of a layer = ``num_attention_heads // n_heads_in_group``. FFN width =
``ceil_to_multiple(int(2 * ffn_mult * hidden_size / 3), 256)``.

Exact widths (thinkfast's one addition to the format): the 256 rounding means small models cannot express
most widths through ``ffn_mult``. thinkfast always writes the ``ffn_mult`` whose released-formula width
equals the real width when one exists, and writes nothing else, so such checkpoints are byte-for-byte the
released schema. Only when no ``ffn_mult`` reproduces the width (widths that are not a multiple of 256,
e.g. every tiny model) does the block's ``ffn`` entry carry one extra key, ``"intermediate_size": W``,
which takes precedence over ``ffn_mult`` when reading. Such a checkpoint cannot be read by loaders that
only know the formula (their shapes would not match), which is unavoidable and only affects toy widths.

Extra keys found in released files (``sparsify``, ``window_length``, ``num_sink_tokens``, ...) are kept on
round trip; they must be null/false, since the features behind them are not implemented here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import PretrainedConfig

# Keys of released block configs whose features this implementation does not have: accepted when null/false.
_INERT_ATTENTION_KEYS = (
    "sparsify", "num_sink_tokens", "use_prefill_window_in_sink_attention", "unshifted_sink",
    "window_length", "llama4", "mamba", "moe",
)
_INERT_FFN_KEYS = ("sparsify", "moe", "gated", "hidden_act")


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The released format's width rule: ``ceil_to_multiple(int(2 * ffn_mult * hidden / 3), 256)``.

    >>> [ffn_mult_to_intermediate_size(m, 8192) for m in (5.25, 2.625, 1.3125, 1.0, 0.5)]
    [28672, 14336, 7168, 5632, 2816]
    """
    width = int(2 * ffn_mult * hidden_size / 3)
    return int(math.ceil(width / 256) * 256)


def intermediate_size_to_ffn_mult(width: int, hidden_size: int) -> tuple[float, bool]:
    """Return ``(ffn_mult, exact)``: the ``ffn_mult`` to write for an FFN of ``width`` channels.

    ``exact`` is True when the released formula maps that ``ffn_mult`` back to ``width``.

    >>> intermediate_size_to_ffn_mult(28672, 8192)
    (5.25, True)
    >>> intermediate_size_to_ffn_mult(384, 128)
    (4.5, False)
    """
    mult = 3.0 * width / (2.0 * hidden_size)
    for digits in (6, 8, 10, 12, 17):
        candidate = round(mult, digits)
        if ffn_mult_to_intermediate_size(candidate, hidden_size) == width:
            return candidate, True
    return round(mult, 6), False


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention: ``kind`` is "gqa", "linear" (one H x H matrix) or "no_op"."""

    kind: str
    n_heads_in_group: int | None = None

    def num_kv_heads(self, num_attention_heads: int) -> int:
        return num_attention_heads // self.n_heads_in_group if self.kind == "gqa" else 0


@dataclass(frozen=True)
class FFNSpec:
    """One layer's FFN: ``kind`` is "swiglu", "linear" (one H x H matrix) or "no_op"."""

    kind: str
    intermediate_size: int | None = None


def attention_block(n_heads_in_group: int | None = None, *, no_op: bool = False, linear: bool = False) -> dict:
    """A released-schema ``attention`` entry."""
    if no_op or linear:
        return {"n_heads_in_group": None, "no_op": bool(no_op), "replace_with_linear": bool(linear)}
    return {"n_heads_in_group": int(n_heads_in_group), "no_op": False, "replace_with_linear": False}


def ffn_block(intermediate_size: int | None, hidden_size: int, *, no_op: bool = False, linear: bool = False) -> dict:
    """A released-schema ``ffn`` entry for an exact width (adds ``intermediate_size`` only when needed)."""
    if no_op or linear:
        return {"ffn_mult": None, "no_op": bool(no_op), "replace_with_linear": bool(linear)}
    mult, exact = intermediate_size_to_ffn_mult(int(intermediate_size), hidden_size)
    entry = {"ffn_mult": mult, "no_op": False, "replace_with_linear": False}
    if not exact:
        entry["intermediate_size"] = int(intermediate_size)
    return entry


# The fields of NVIDIA's AttentionConfig / FFNConfig dataclasses (the Llama-Nemotron remote code).
_BLOCKCONFIG_FIELDS = {"no_op", "replace_with_linear", "sparsify", "n_heads_in_group", "window_length",
                       "num_sink_tokens", "use_prefill_window_in_sink_attention", "unshifted_sink", "ffn_mult"}


class BlockEntry(dict):
    """A ``block_configs`` entry (or its ``attention`` / ``ffn`` part): a dict that also reads as an
    object, ``block.attention.no_op``, as NVIDIA's own config class (BlockConfig dataclasses) does and as
    vLLM, SGLang and TensorRT-LLM read it. It is a plain dict to JSON, so ``config.json`` is unchanged; a
    key that is absent is an ``AttributeError`` (so ``getattr(block.ffn, "moe", None)`` works)."""

    def __getattr__(self, name: str):
        value = self.get(name)
        if name not in self or (value is None and name not in _BLOCKCONFIG_FIELDS):
            # a null key NVIDIA's dataclasses do not have (e.g. ffn.hidden_act) reads as absent, as there:
            # vLLM takes `hasattr(ffn, "hidden_act")` to mean the block sets its own activation
            raise AttributeError(f"block config has no {name!r}")
        return value

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, BlockEntry) else v for k, v in self.items()}


def block_config(attention: dict, ffn: dict) -> dict:
    return BlockEntry(attention=BlockEntry(attention), ffn=BlockEntry(ffn))


class DeciLMConfig(PretrainedConfig):
    r"""Config of a Llama-layout decoder whose every layer has its own attention and FFN variant.

    Args mirror ``LlamaConfig``; ``block_configs`` is a list of ``num_hidden_layers`` dicts in the
    released schema (see the module docstring). With ``block_configs=None`` every layer gets full
    multi-head attention and an FFN of width ``ffn_mult`` (default 2.625, i.e. 1.75 x hidden).
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        block_configs: list[dict] | None = None,
        **kwargs,
    ):
        # Released files carry these as null; a Llama-style value here has no meaning for this model.
        kwargs.pop("num_key_value_heads", None)
        kwargs.pop("intermediate_size", None)
        rope_parameters = kwargs.pop("rope_parameters", None)
        if rope_parameters and rope_scaling is None:  # a config written by transformers 5's conventions
            rope_theta = rope_parameters.get("rope_theta", rope_theta)
            rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
            if rope_scaling.get("rope_type", "default") == "default":
                rope_scaling = None
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.num_key_value_heads = None
        self.intermediate_size = None
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if block_configs is None:
            width = ffn_mult_to_intermediate_size(2.625, hidden_size)
            block_configs = [block_config(attention_block(1), ffn_block(width, hidden_size))] * num_hidden_layers
        if len(block_configs) != num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(block_configs)} entries but num_hidden_layers={num_hidden_layers}"
            )
        self.block_configs = [self._normalise_block(i, b) for i, b in enumerate(block_configs)]
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Some transformers versions rewrite rope keys in the base __init__; ours are authoritative.
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.tie_word_embeddings = tie_word_embeddings

    def _normalise_block(self, i: int, block) -> dict:
        """Validate one ``block_configs`` entry and return it in canonical released form (a new dict)."""
        if hasattr(block, "to_dict"):  # a BlockEntry, or a released BlockConfig dataclass object
            block = block.to_dict()
        elif hasattr(block, "__dataclass_fields__"):
            import dataclasses

            block = dataclasses.asdict(block)
        if not isinstance(block, dict) or "attention" not in block or "ffn" not in block:
            raise ValueError(f"block_configs[{i}] must be a dict with 'attention' and 'ffn' entries, got {block!r}")
        att = dict(block["attention"] or {})
        ffn = dict(block["ffn"] or {})
        where = f"block_configs[{i}]"
        for part, entry, inert, used in (
            ("attention", att, _INERT_ATTENTION_KEYS, {"n_heads_in_group", "no_op", "replace_with_linear"}),
            ("ffn", ffn, _INERT_FFN_KEYS, {"ffn_mult", "no_op", "replace_with_linear", "intermediate_size"}),
        ):
            for key, value in entry.items():
                if key in used or value in (None, False):
                    continue
                if key in inert:
                    raise ValueError(f"{where}.{part}.{key}={value!r}: this feature is not supported")
                raise ValueError(f"{where}.{part} has unknown key {key!r}={value!r}")
        att["no_op"] = bool(att.get("no_op", False))
        att["replace_with_linear"] = bool(att.get("replace_with_linear", False))
        ffn["no_op"] = bool(ffn.get("no_op", False))
        ffn["replace_with_linear"] = bool(ffn.get("replace_with_linear", False))
        if att["no_op"] and att["replace_with_linear"]:
            raise ValueError(f"{where}.attention: no_op and replace_with_linear are both true")
        if ffn["no_op"] and ffn["replace_with_linear"]:
            raise ValueError(f"{where}.ffn: no_op and replace_with_linear are both true")
        if att["no_op"] or att["replace_with_linear"]:
            att.setdefault("n_heads_in_group", None)
        else:
            g = att.get("n_heads_in_group")
            if not isinstance(g, int) or isinstance(g, bool) or g < 1 or self.num_attention_heads % g:
                raise ValueError(
                    f"{where}.attention.n_heads_in_group={g!r} must be a positive divisor of "
                    f"num_attention_heads={self.num_attention_heads}"
                )
        if ffn["no_op"] or ffn["replace_with_linear"]:
            ffn.setdefault("ffn_mult", None)
        else:
            width = ffn.get("intermediate_size")
            if width is not None:
                if not isinstance(width, int) or width < 1:
                    raise ValueError(f"{where}.ffn.intermediate_size={width!r} must be a positive integer")
                if ffn.get("ffn_mult") is None:
                    ffn["ffn_mult"] = intermediate_size_to_ffn_mult(width, self.hidden_size)[0]
            else:
                mult = ffn.get("ffn_mult")
                if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
                    raise ValueError(f"{where}.ffn.ffn_mult={mult!r} must be a positive number")
        return block_config(att, ffn)

    def block_specs(self) -> list[tuple[AttentionSpec, FFNSpec]]:
        """The parsed per-layer architecture: ``[(AttentionSpec, FFNSpec)] * num_hidden_layers``."""
        specs = []
        for block in self.block_configs:
            att, ffn = block["attention"], block["ffn"]
            if att["no_op"]:
                a = AttentionSpec("no_op")
            elif att["replace_with_linear"]:
                a = AttentionSpec("linear")
            else:
                a = AttentionSpec("gqa", att["n_heads_in_group"])
            if ffn["no_op"]:
                f = FFNSpec("no_op")
            elif ffn["replace_with_linear"]:
                f = FFNSpec("linear")
            else:
                width = ffn.get("intermediate_size")
                if width is None:
                    width = ffn_mult_to_intermediate_size(ffn["ffn_mult"], self.hidden_size)
                f = FFNSpec("swiglu", int(width))
            specs.append((a, f))
        return specs

    # transformers 5 turned `rope_scaling` into an alias of `rope_parameters` (and rewrites it); the
    # released format stores `rope_theta` and `rope_scaling` side by side, so keep our own plain attribute.
    @property
    def rope_scaling(self) -> dict | None:
        return self.__dict__.get("_rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value: dict | None) -> None:
        self.__dict__["_rope_scaling"] = dict(value) if value is not None else None

    @property
    def rope_parameters(self) -> dict:
        """transformers 5's view of RoPE (``rope_type``, ``rope_theta`` and the scaling keys), derived from
        the released format's ``rope_theta`` and ``rope_scaling`` so the two can never disagree: engines
        running on transformers 5 (vLLM) read this attribute, and without it build default RoPE for a
        Llama-3-scaled parent. Not written to config.json (the released files have no such key)."""
        scaling = dict(self.rope_scaling or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        return {"rope_type": "default", **scaling, "rope_theta": self.rope_theta}

    @rope_parameters.setter
    def rope_parameters(self, value: dict | None) -> None:
        if not value:
            return
        self.rope_theta = value.get("rope_theta", getattr(self, "rope_theta", 10000.0))
        scaling = {k: v for k, v in value.items() if k != "rope_theta"}
        self.rope_scaling = None if scaling.get("rope_type", scaling.get("type", "default")) == "default" else scaling

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("_rope_scaling", None)
        out.pop("rope_parameters", None)
        out["rope_scaling"] = self.rope_scaling
        out["rope_theta"] = self.rope_theta
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out

    def to_diff_dict(self) -> dict:
        # Write the whole config, like the released files do: loaders of other engines read keys such as
        # `num_key_value_heads: null` or `rope_theta` that a diff against defaults would drop.
        return self.to_dict()
