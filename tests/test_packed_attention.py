"""Packed attention (:class:`PackedLayout`): each packed sequence attends to itself only, computed per sequence
instead of under a dense block-diagonal mask; outputs and gradients equal the dense mask's, for nemotron-nas and
for a transformers Llama switched by ``use_packed_attention``."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.data import block_causal_mask, doc_attention, packed_attention as packed_kwargs
from thinkfast.modeling.convert import convert_llama_model
from thinkfast.modeling.modeling_decilm import PackedLayout, packed_attention
from thinkfast.modeling.packed import use_packed_attention
from thinkfast.nano.corpus import packed_rows
from thinkfast.nano.tokenizer import build_tokenizer


def _seq_ids(lengths_per_row, t):
    """Rows of contiguous sequences of the given lengths, padded with -1 to ``t``."""
    rows = []
    for lengths in lengths_per_row:
        row = [i for i, n in enumerate(lengths) for _ in range(n)]
        rows.append(row + [-1] * (t - len(row)))
    return torch.tensor(rows)


@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("multiple", [1, 8, 32])
def test_outputs_and_gradients_equal_the_dense_mask(hkv, multiple):
    torch.manual_seed(0)
    seq = _seq_ids([[5, 1, 17, 9], [40], [3, 3, 3, 1, 1]], 40)
    b, t, h, d = 3, 40, 4, 8
    q = torch.randn(b, h, t, d, requires_grad=True)
    k = torch.randn(b, hkv, t, d, requires_grad=True)
    v = torch.randn(b, hkv, t, d, requires_grad=True)
    layout = PackedLayout(seq, multiple=multiple)
    out = packed_attention(q, k, v, layout, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1),
                                         attn_mask=block_causal_mask(seq), scale=0.3).transpose(1, 2)
    assert out.shape == (b, t, h, d)
    assert torch.allclose(out, ref, atol=1e-6)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, r in zip(grads, refs):
        assert torch.allclose(g, r, atol=1e-5)


def test_buckets_group_sequences_by_padded_length_and_padding_stays_alone():
    layout = PackedLayout(_seq_ids([[5, 30], [33, 2]], 40), multiple=32)
    # 5 and 2 -> 32; 30 -> 32; 33 -> 64; the 5 + 5 padding tokens of the rows each alone
    assert dict((w, n) for n, w in layout.buckets) == {1: 10, 32: 3, 64: 1}


def test_a_sequence_split_in_two_places_is_refused():
    with pytest.raises(ValueError, match="contiguous"):
        PackedLayout(torch.tensor([[0, 0, 1, 0]]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        PackedLayout(torch.tensor([0, 0, 1]))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _llama(tok, kv=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=kv))


def test_decilm_and_switched_llama_equal_the_dense_mask_on_packed_documents(tok):
    rows = packed_rows(tok, random.Random(0), 2, 300)
    kw = doc_attention(rows, tok.eos_token_id)
    assert isinstance(kw["packed_layout"], PackedLayout)
    dense = {"attention_mask": kw["attention_mask"], "position_ids": kw["position_ids"]}
    llama = _llama(tok)
    ref = llama(rows, **dense).logits
    assert use_packed_attention(llama) is llama and llama.config._attn_implementation == "thinkfast_packed"
    assert (llama(rows, **kw).logits - ref).abs().max() <= 1e-5
    decilm = convert_llama_model(_llama(tok))
    assert use_packed_attention(decilm) is decilm
    out = decilm(rows, **kw).logits
    assert (out - ref).abs().max() <= 1e-5
    # gradients through the packed path equal the dense mask's
    g1 = torch.autograd.grad(out.logsumexp(-1).sum(), decilm.model.layers[0].self_attn.q_proj.weight)[0]
    g2 = torch.autograd.grad(decilm(rows, **dense).logits.logsumexp(-1).sum(),
                             decilm.model.layers[0].self_attn.q_proj.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_packed_samples_with_padding(tok):
    seq = _seq_ids([[7, 12], [20]], 24)
    ids = torch.randint(3, len(tok), seq.shape)
    pos = torch.where(seq >= 0, torch.arange(24)[None] - torch.cummax(
        torch.where(torch.cat([torch.ones(2, 1, dtype=torch.bool), seq[:, 1:] != seq[:, :-1]], 1),
                    torch.arange(24)[None].expand(2, -1), torch.zeros(2, 24, dtype=torch.long)), 1).values, 0)
    model = convert_llama_model(_llama(tok, kv=1))
    out = model(ids, position_ids=pos, **packed_kwargs(seq)).logits
    ref = model(ids, position_ids=pos, attention_mask=block_causal_mask(seq)).logits
    real = seq >= 0
    assert (out[real] - ref[real]).abs().max() <= 1e-5


def test_switched_llama_generates_as_before_and_packed_layout_refuses_a_cache(tok):
    plain = _llama(tok)
    switched = use_packed_attention(_llama(tok))
    prompt = torch.tensor([[5, 9, 11, 4]])
    a = plain.generate(prompt, max_new_tokens=6, do_sample=False)
    b = switched.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    model = convert_llama_model(_llama(tok))
    from transformers import DynamicCache

    cache = DynamicCache()
    model(prompt, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="packed_layout"):
        model(prompt, past_key_values=cache, use_cache=True, packed_layout=PackedLayout(torch.zeros(1, 4, dtype=torch.long)))
