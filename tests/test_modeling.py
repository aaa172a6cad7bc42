"""Equivalence tests for the nemotron-nas model: Llama parity, cache == full recompute, save/load in both
loading modes, released-format configs, no-op identities."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import thinkfast  # noqa: F401  (registers the Auto classes)
from thinkfast.modeling.convert import convert_llama_model, decilm_config_from_llama, ConversionError
from thinkfast.artifacts import convert_checkpoint
from thinkfast.generation import SamplingParams, generate
from thinkfast.modeling import (
    DeciLMConfig,
    DeciLMForCausalLM,
    attention_block,
    block_config,
    ffn_block,
    ffn_mult_to_intermediate_size,
    intermediate_size_to_ffn_mult,
)

V, H = 61, 64


def tiny_llama(tied=False, kv=2, scaling=True, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=V, hidden_size=H, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv, max_position_embeddings=256, tie_word_embeddings=tied, rope_theta=5000.0,
    )
    if scaling:
        kwargs["rope_scaling"] = {
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a missing norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hetero_config(blocks=None):
    blocks = blocks or [
        block_config(attention_block(2), ffn_block(96, H)),
        block_config(attention_block(no_op=True), ffn_block(40, H)),
        block_config(attention_block(linear=True), ffn_block(None, H, linear=True)),
        block_config(attention_block(4), ffn_block(None, H, no_op=True)),
        block_config(attention_block(no_op=True), ffn_block(None, H, no_op=True)),
        block_config(attention_block(1), ffn_block(64, H)),
    ]
    return DeciLMConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=len(blocks), num_attention_heads=4,
        block_configs=blocks, max_position_embeddings=256, eos_token_id=0, bos_token_id=1,
    )


def hetero_model(blocks=None, seed=0):
    torch.manual_seed(seed)
    return DeciLMForCausalLM(hetero_config(blocks)).eval()


@pytest.mark.parametrize("tied,kv,scaling", [(False, 2, True), (True, 4, False), (False, 1, True)])
def test_converted_llama_logits_match(tied, kv, scaling):
    llama = tiny_llama(tied=tied, kv=kv, scaling=scaling)
    ours = convert_llama_model(llama)
    x = torch.randint(0, V, (3, 40))
    with torch.no_grad():
        diff = (llama(x).logits - ours(x).logits).abs().max().item()
    assert diff <= 1e-5
    spec = ours.config.block_specs()
    assert all(a.kind == "gqa" and a.num_kv_heads(4) == kv for a, _ in spec)
    assert all(f.intermediate_size == 112 for _, f in spec)
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def test_converted_llama_padded_batch_and_greedy_generation_match():
    llama = tiny_llama()
    ours = convert_llama_model(llama)
    x = torch.randint(2, V, (2, 12))
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = llama(x, attention_mask=mask, position_ids=pos).logits
        b = ours(x, attention_mask=mask, position_ids=pos).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max().item() <= 1e-5
    # greedy generation: HF generate on Llama == our sampler on the converted model
    prompt = torch.randint(2, V, (1, 9))
    ref = llama.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=20))[0]
    assert got.token_ids == ref[0, 9:].tolist()
    ref2 = ours.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ref, ref2)


def test_convert_checkpoint_folder(tmp_path):
    llama = tiny_llama(tied=True)
    llama.save_pretrained(tmp_path / "llama")
    (tmp_path / "llama" / "tokenizer.json").write_text("{}")
    summary = convert_checkpoint(tmp_path / "llama", tmp_path / "nas")
    assert "tokenizer.json" in summary["copied"]
    cfg = json.loads((tmp_path / "nas" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert cfg["num_key_value_heads"] is None and cfg["intermediate_size"] is None
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 5000.0
    assert (tmp_path / "nas" / "modeling_decilm.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nas").eval()
    x = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        assert (llama(x).logits - loaded(x).logits).abs().max().item() <= 1e-5
    with pytest.raises(ConversionError, match="exists"):
        convert_checkpoint(tmp_path / "llama", tmp_path / "nas")


def test_convert_rejects_bad_config():
    with pytest.raises(ConversionError, match="missing key 'intermediate_size'"):
        decilm_config_from_llama({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                                  "num_hidden_layers": 1, "vocab_size": 5})
    with pytest.raises(ConversionError, match="model_type='gpt2'"):
        decilm_config_from_llama({"model_type": "gpt2"})


def test_kv_cache_decode_equals_full_recompute_with_noop_layers():
    model = hetero_model()
    x = torch.randint(2, V, (2, 15))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :8], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(8, 15):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max().item() <= 1e-5
    assert model.model.num_cache_layers == 3  # only the GQA layers hold cache slots
    assert cache.get_seq_length() == 15


def test_model_without_any_attention_generates():
    blocks = [block_config(attention_block(no_op=True), ffn_block(32, H))] * 2
    model = hetero_model(blocks)
    prompt = torch.randint(2, V, (1, 5))
    ref = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(model, [prompt[0].tolist()], SamplingParams(max_new_tokens=6))[0]
    assert got.token_ids == ref[0, 5:].tolist()
    with torch.no_grad():  # each position depends on its own token only
        a = model(torch.tensor([[3, 4, 5]])).logits[0, -1]
        b = model(torch.tensor([[9, 5]])).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-6)


def test_hf_generate_and_our_sampler_agree_on_hetero_model_batched():
    model = hetero_model(seed=3)
    prompts = [torch.randint(2, V, (n,)).tolist() for n in (4, 11, 7)]
    batched = generate(model, prompts, SamplingParams(max_new_tokens=12, batch_size=3))
    for p, c in zip(prompts, batched):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        assert c.token_ids == ref[0, len(p):].tolist()
        assert c.finish_reason == "length" and len(c.logprobs) == 12


def test_sampler_stops_and_seeds():
    model = hetero_model(seed=1)
    prompts = [[5, 6, 7]] * 4
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, stop_token_ids=(0, 1, 2, 3), seed=7)
    a, b = generate(model, prompts, params), generate(model, prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for c in a:
        assert all(t not in (0, 1, 2, 3) for t in c.token_ids[:-1])
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in (0, 1, 2, 3)
        else:
            assert len(c.token_ids) == 30
    assert all(lp <= 0 for c in a for lp in c.logprobs)


def test_noop_layer_is_identity_and_has_no_weights():
    model = hetero_model()
    layer = model.model.layers[4]
    x = torch.randn(2, 5, H)
    assert torch.equal(layer(x, None, None, None, None), x)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("model.layers.4.") for n in names)
    assert "model.layers.1.input_layernorm.weight" not in names  # no-op attention: no norm
    assert "model.layers.1.post_attention_layernorm.weight" in names
    assert "model.layers.2.self_attn.linear_attn.weight" in names
    assert "model.layers.2.mlp.linear_mlp.weight" in names
    assert "model.layers.3.post_attention_layernorm.weight" not in names
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, H)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (96, H)


def test_linear_attention_is_per_token():
    model = hetero_model()
    layer = model.model.layers[2]
    x = torch.randn(1, 4, H)
    with torch.no_grad():
        y = layer.self_attn(x, None, None, None, None)
        assert torch.allclose(y[0, 2], layer.self_attn.linear_attn.weight @ x[0, 2], atol=1e-6)


def test_save_load_in_process_roundtrip(tmp_path):
    model = hetero_model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_decilm.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
    }
    assert cfg["block_configs"][1]["ffn"] == {"ffn_mult": 0.9375, "intermediate_size": 40, "no_op": False,
                                             "replace_with_linear": False}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DeciLMForCausalLM
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_trust_remote_code_load_without_thinkfast(tmp_path):
    model = hetero_model()
    model.save_pretrained(tmp_path / "m")
    x = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        expected = model(x).logits
    torch.save({"x": x, "logits": expected}, tmp_path / "io.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
assert not any(k == 'thinkfast' or k.startswith('thinkfast.') for k in sys.modules), 'thinkfast was imported'
io = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    got = m(io['x']).logits
assert torch.equal(got, io['logits']), (got - io['logits']).abs().max()
g = m.generate(io['x'], max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
print(type(m).__module__, g.shape[1])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    module, length = res.stdout.strip().splitlines()[-1].split()
    assert module.startswith("transformers_modules") and int(length) == 13


def released_style_config():
    """A config.json shaped like Llama-3.3-Nemotron-Super-49B-v1's, shrunk (hidden 128 -> widths 256/512)."""
    def att(g, no_op=False):
        return {"n_heads_in_group": g, "no_op": no_op, "num_sink_tokens": None, "replace_with_linear": False,
                "sparsify": None, "unshifted_sink": False, "use_prefill_window_in_sink_attention": False,
                "window_length": None}

    def ffn(mult, no_op=False):
        return {"ffn_mult": mult, "no_op": no_op, "replace_with_linear": False, "sparsify": None}

    return {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": [2, 3],
        "hidden_act": "silu", "hidden_size": 128, "initializer_range": 0.02, "intermediate_size": None,
        "max_position_embeddings": 512, "mlp_bias": False, "num_attention_heads": 8, "num_hidden_layers": 3,
        "num_key_value_heads": None, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 128, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 64,
        "block_configs": [
            {"attention": att(4), "ffn": ffn(3.0)},
            {"attention": att(None, no_op=True), "ffn": ffn(6.0)},
            {"attention": att(8), "ffn": ffn(None, no_op=True)},
        ],
    }


def test_released_style_config_loads_and_round_trips(tmp_path):
    raw = released_style_config()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, DeciLMConfig)
    specs = cfg.block_specs()
    assert [a.kind for a, _ in specs] == ["gqa", "no_op", "gqa"]
    assert [a.num_kv_heads(8) for a, _ in specs] == [2, 0, 1]
    assert [f.intermediate_size for _, f in specs] == [256, 512, None]
    model = DeciLMForCausalLM(cfg)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (128, 512)
    out = cfg.to_dict()
    assert out["block_configs"] == raw["block_configs"]  # extra null keys kept, nothing added
    assert out["rope_scaling"] == raw["rope_scaling"] and out["rope_theta"] == 500000.0
    assert out["num_key_value_heads"] is None and out["intermediate_size"] is None


@pytest.mark.parametrize("bad,match", [
    ({"attention": {"n_heads_in_group": 3, "no_op": False}, "ffn": {"ffn_mult": 1.0}}, "positive divisor"),
    ({"attention": {"n_heads_in_group": 2, "window_length": 512}, "ffn": {"ffn_mult": 1.0}}, "window_length"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": -1}}, "ffn_mult"),
    ({"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0, "mystery": 3}}, "unknown key 'mystery'"),
    ({"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"ffn_mult": 1.0}}, "both true"),
])
def test_bad_block_configs_are_named(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        DeciLMConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, block_configs=[bad])
    assert "block_configs[0]" in str(info.value)


def test_ffn_width_rule_and_exact_widths():
    assert [ffn_mult_to_intermediate_size(m, 8192) for m in (5.25, 2.625, 1.3125, 1.0, 0.5)] == [
        28672, 14336, 7168, 5632, 2816]
    for width in range(256, 8192 * 6, 256):  # every multiple of 256 is expressible at hidden 8192
        mult, exact = intermediate_size_to_ffn_mult(width, 8192)
        assert exact and ffn_mult_to_intermediate_size(mult, 8192) == width
    assert ffn_block(28672, 8192) == {"ffn_mult": 5.25, "no_op": False, "replace_with_linear": False}
    assert ffn_block(100, 64)["intermediate_size"] == 100


def test_training_step_changes_every_parameter():
    model = hetero_model()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, V, (2, 10))
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p)]
    assert unchanged == []


def test_cache_argument_accepts_both_transformers_names():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; the model takes either."""
    model = hetero_model()
    x = torch.randint(2, V, (1, 9))
    with torch.no_grad():
        full = model(x).logits[:, -1]
        for name in ("cache", "past_key_values"):
            c = DynamicCache()
            model(x[:, :8], use_cache=True, **{name: c})
            assert c.get_seq_length() == 8
            step = model(x[:, 8:], use_cache=True, **{name: c}).logits[:, -1]
            assert (step - full).abs().max().item() <= 1e-5
