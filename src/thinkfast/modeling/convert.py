"""Llama-layout model -> ``nemotron-nas`` (DeciLM) model, in memory (a whole folder:
:func:`thinkfast.artifacts.convert_checkpoint`).

A homogeneous Llama is the special case of the heterogeneous model in which every layer has GQA with
``num_attention_heads // num_key_value_heads`` heads per group and an FFN of ``intermediate_size``
channels. The weight names are identical (REFERENCE.md section 2), so conversion rewrites the config
and re-saves the same tensors; logits are unchanged up to float rounding (tested at 1e-5 in float32).

Both config conventions are read: transformers 4 (``rope_theta`` + ``rope_scaling``) and transformers 5
(``rope_parameters`` with ``rope_theta`` inside).
"""

from __future__ import annotations

from pathlib import Path


from . import DeciLMConfig, DeciLMForCausalLM, attention_block, block_config, ffn_block

class ConversionError(ValueError):
    pass


def decilm_config_from_llama(llama: dict, where: str = "config.json") -> DeciLMConfig:
    """Build the DeciLM config of a homogeneous Llama from its ``config.json`` dict."""
    if llama.get("model_type") not in ("llama", None):
        raise ConversionError(f"{where}: model_type={llama.get('model_type')!r}, expected 'llama'")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in llama:
            raise ConversionError(f"{where}: missing key {key!r}")
    heads = llama["num_attention_heads"]
    kv = llama.get("num_key_value_heads") or heads
    if heads % kv:
        raise ConversionError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if llama.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act={llama['hidden_act']!r}; only 'silu' is supported")
    if llama.get("pretraining_tp", 1) != 1:
        raise ConversionError(f"{where}: pretraining_tp != 1 is not supported")
    rope_theta = llama.get("rope_theta", 10000.0)
    rope_scaling = llama.get("rope_scaling")
    params = llama.get("rope_parameters")
    if params:  # transformers 5 convention
        rope_theta = params.get("rope_theta", rope_theta)
        rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
        rope_scaling = None
    hidden = llama["hidden_size"]
    blocks = [
        block_config(attention_block(heads // kv), ffn_block(llama["intermediate_size"], hidden))
        for _ in range(llama["num_hidden_layers"])
    ]
    keep = {
        k: llama[k]
        for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "max_position_embeddings", "initializer_range", "rms_norm_eps", "pad_token_id", "bos_token_id",
            "eos_token_id", "tie_word_embeddings", "attention_bias", "attention_dropout", "mlp_bias",
        )
        if k in llama
    }
    return DeciLMConfig(rope_theta=rope_theta, rope_scaling=rope_scaling, block_configs=blocks, **keep)


def load_full_state(model: DeciLMForCausalLM, state: dict) -> None:
    """Load every weight of ``model`` from ``state`` (a tied ``lm_head`` may be absent); name mismatches
    raise :class:`ConversionError`."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ConversionError(f"weight names do not match: missing={missing[:5]} unexpected={unexpected[:5]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()


def convert_llama_model(model) -> DeciLMForCausalLM:
    """In-memory conversion of a ``LlamaForCausalLM`` (same dtype and device, weights copied)."""
    cfg = decilm_config_from_llama(model.config.to_dict())
    dtype = next(model.parameters()).dtype
    out = DeciLMForCausalLM(cfg).to(dtype)
    load_full_state(out, {k: v for k, v in model.state_dict().items() if "rotary_emb" not in k})
    out.generation_config = model.generation_config
    return out.to(next(model.parameters()).device).eval()


def gguf_file(path) -> Path | None:
    """The GGUF file ``path`` names: itself when it ends in ``.gguf``, or the one ``.gguf`` in a folder that has
    no ``config.json``; None otherwise. A folder with several is an error naming them."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    found = sorted(p.glob("*.gguf"))
    if len(found) > 1:
        raise ConversionError(f"{p} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}): name one")
    return found[0] if found else None


def llama_from_gguf(path, dtype=None):
    """``(LlamaForCausalLM, tokenizer)`` from a GGUF file, through transformers' own GGUF support (weights
    dequantised, to float32 unless ``dtype``; the tokenizer and its chat template from the file's metadata; needs
    the ``gguf`` package). The model is rebuilt as a plain ``LlamaForCausalLM`` with the same weights, which
    ``save_pretrained`` writes (transformers refuses to save the GGUF-loaded one). A GGUF of another architecture
    is an error."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    file = gguf_file(path)
    if file is None:
        raise ConversionError(f"{path}: not a .gguf file, nor a folder holding one")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConversionError(f"{file}: reading GGUF needs the gguf package: pip install 'thinkfast[gguf]'") from None
    dtype = dtype or torch.float32
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    if loaded.config.model_type != "llama":
        raise ConversionError(f"{file}: a {loaded.config.model_type!r} model; thinkfast takes Llama-architecture "
                              "parents")
    conf = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = LlamaForCausalLM(LlamaConfig(**conf)).to(dtype)
    state = loaded.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]:
        raise ConversionError(f"{file}: weights do not match a Llama of its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer
