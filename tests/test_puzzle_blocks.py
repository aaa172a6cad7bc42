"""Puzzle block variants: the paper's initialisation rules as equivalence tests."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.modeling.convert import convert_llama_model
from thinkfast.modeling import attention_block, ffn_block
from thinkfast.puzzle.blocks import (
    Variant,
    attention_variants,
    channel_contribution,
    ffn_variants,
    init_variant,
    round_width,
)

H, HEADS = 32, 4


def parent(kv=4, seed=0):
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=H, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=HEADS, num_key_value_heads=kv,
                                         max_position_embeddings=64)).eval()
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return convert_llama_model(llama).float()


def rope(model, t):
    x = torch.zeros(1, t, H)
    return model.model.rotary_emb(x, torch.arange(t)[None])


def sub_block(layer, part):
    """Parent sub-block as a function x -> x + block(x)."""
    if part == "attention":
        return lambda x, cos, sin: x + layer.self_attn(layer.input_layernorm(x), cos, sin, None, None)
    return lambda x, cos, sin: x + layer.mlp(layer.post_attention_layernorm(x))


def test_variant_lists():
    m = parent(kv=4)
    att = [v.name for v in attention_variants(m.config, 0, kv_heads=[2, 1, 4])]
    assert att == ["gqa_kv4", "gqa_kv2", "gqa_kv1", "linear", "no_op"]
    ffn = ffn_variants(m.config, 0, fractions=[1.0, 0.5, 0.25, 0.1], multiple=8)
    assert [v.name for v in ffn] == ["ffn_80", "ffn_40", "ffn_24", "ffn_8", "linear", "no_op"]
    assert all(Variant.from_dict(v.to_dict()) == v for v in ffn)
    with pytest.raises(ValueError, match="does not divide"):
        attention_variants(m.config, 0, kv_heads=[3])
    assert round_width(80 * 0.87, 256) == 256


def test_parent_variants_reproduce_parent_layer():
    m = parent(kv=2)
    layer = m.model.layers[0]
    x = torch.randn(2, 7, H)
    cos, sin = rope(m, 7)
    a0 = attention_variants(m.config, 0, [1])[0]
    f0 = ffn_variants(m.config, 0, [0.5], 8)[0]
    contrib = torch.rand(80)
    att = init_variant(m.config, layer, a0)
    ffn = init_variant(m.config, layer, f0, contrib)  # full width keeps every channel
    y = ffn(att(x, cos, sin, None, None), cos, sin, None, None)
    torch.testing.assert_close(y, layer(x, cos, sin, None, None), rtol=0, atol=1e-6)


def test_linear_attention_equals_wo_wv_on_single_token():
    m = parent(kv=2)
    layer = m.model.layers[1]
    x = torch.randn(3, 1, H)
    cos, sin = rope(m, 1)
    lin = init_variant(m.config, layer, Variant("attention", "linear", attention_block(linear=True)))
    torch.testing.assert_close(lin(x, cos, sin, None, None), sub_block(layer, "attention")(x, cos, sin),
                               rtol=1e-5, atol=1e-5)


def test_mean_pooled_kv_heads():
    m = parent(kv=4)
    layer = m.model.layers[0]
    att = layer.self_attn
    v = Variant("attention", "gqa_kv2", attention_block(2))
    child = init_variant(m.config, layer, v)
    hd = att.head_dim
    k = att.k_proj.weight.detach().view(4, hd, H)
    torch.testing.assert_close(child.self_attn.k_proj.weight.view(2, hd, H)[1], (k[2] + k[3]) / 2)
    # when the merged heads are equal, pooling loses nothing: the child equals the parent
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            w = getattr(att, name).weight.view(4, hd, H)
            w[1].copy_(w[0])
            w[3].copy_(w[2])
    child = init_variant(m.config, layer, v)
    x = torch.randn(2, 6, H)
    cos, sin = rope(m, 6)
    torch.testing.assert_close(child(x, cos, sin, None, None), sub_block(layer, "attention")(x, cos, sin),
                               rtol=1e-5, atol=1e-5)


def test_ffn_pruning_keeps_top_contributors_and_linear_ffn():
    m = parent()
    layer = m.model.layers[0]
    mlp = layer.mlp
    mean_abs = torch.rand(80)
    contrib = channel_contribution(mean_abs, mlp.down_proj.weight)
    torch.testing.assert_close(contrib, mean_abs * mlp.down_proj.weight.norm(dim=0))
    child = init_variant(m.config, layer, Variant("ffn", "ffn_16", ffn_block(16, H)), contrib)
    keep = torch.topk(contrib, 16).indices.sort().values
    torch.testing.assert_close(child.mlp.up_proj.weight, mlp.up_proj.weight[keep])
    torch.testing.assert_close(child.mlp.down_proj.weight, mlp.down_proj.weight[:, keep])
    # pruned FFN == parent FFN with the dropped channels zeroed
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        a = torch.nn.functional.silu(mlp.gate_proj(layer.post_attention_layernorm(x))) * mlp.up_proj(
            layer.post_attention_layernorm(x))
        mask = torch.zeros(80)
        mask[keep] = 1
        ref = x + mlp.down_proj(a * mask)
    torch.testing.assert_close(child(x, None, None, None, None), ref, rtol=1e-5, atol=1e-5)
    lin = init_variant(m.config, layer, Variant("ffn", "linear", ffn_block(None, H, linear=True)))
    torch.testing.assert_close(lin.mlp.linear_mlp.weight, mlp.down_proj.weight @ mlp.up_proj.weight)
    with pytest.raises(ValueError, match="channel contributions"):
        init_variant(m.config, layer, Variant("ffn", "ffn_16", ffn_block(16, H)))


def test_no_op_variants_are_identity():
    m = parent()
    layer = m.model.layers[0]
    x = torch.randn(2, 4, H)
    for v in (Variant("attention", "no_op", attention_block(no_op=True)),
              Variant("ffn", "no_op", ffn_block(None, H, no_op=True))):
        mod = init_variant(m.config, layer, v)
        assert sum(p.numel() for p in mod.parameters()) == 0
        assert torch.equal(mod(x, None, None, None, None), x)
