"""The preallocated KV cache: decoding through it equals full recomputation and the DynamicCache path,
on a model with per-layer KV-head counts and layers without attention."""

import pytest
import torch
from transformers import DynamicCache

from thinkfast.modeling.kvcache import StaticKVCache
from thinkfast.modeling import DeciLMConfig, DeciLMForCausalLM, attention_block, block_config, ffn_block

H, V = 64, 61


def model():
    blocks = [block_config(attention_block(2), ffn_block(96, H)),
              block_config(attention_block(no_op=True), ffn_block(40, H)),
              block_config(attention_block(4), ffn_block(None, H, no_op=True)),
              block_config(attention_block(1), ffn_block(64, H))]
    torch.manual_seed(0)
    return DeciLMForCausalLM(DeciLMConfig(vocab_size=V, hidden_size=H, num_hidden_layers=4, num_attention_heads=4,
                                          block_configs=blocks, max_position_embeddings=128)).eval()


@torch.no_grad()
def test_static_cache_decode_equals_full_recompute_and_dynamic_cache():
    m = model()
    ids = torch.randint(0, V, (3, 20))
    full = m(ids).logits
    for cache in (StaticKVCache(32), DynamicCache()):
        out = [m(ids[:, :12], past_key_values=cache, use_cache=True).logits]
        for t in range(12, 20):
            out.append(m(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=0, atol=2e-5)
        assert cache.get_seq_length() == 20
    static = StaticKVCache(32)
    m(ids, past_key_values=static, use_cache=True)
    assert len(static) == 3 and [k.shape[1] for k in static.keys] == [2, 1, 4]  # KV heads per attention layer


@torch.no_grad()
def test_crop_reuses_the_buffers_and_overflow_is_an_error():
    m = model()
    ids = torch.randint(0, V, (2, 10))
    cache = StaticKVCache(11)
    m(ids, past_key_values=cache, use_cache=True)
    buffers = [k.data_ptr() for k in cache.keys]
    a = m(ids[:, :1], past_key_values=cache, use_cache=True).logits
    cache.truncate_to(10)
    b = m(ids[:, :1], past_key_values=cache, use_cache=True).logits
    assert torch.equal(a, b) and [k.data_ptr() for k in cache.keys] == buffers
    with pytest.raises(ValueError, match="do not fit in max_len=11"):
        m(ids[:, :2], past_key_values=cache, use_cache=True)
