"""What serving engines read from a nemotron-nas config: block configs by attribute (as vLLM, SGLang and
TensorRT-LLM do; NVIDIA's own config class turns them into dataclasses) and RoPE through transformers 5's
``rope_parameters``, in thinkfast and in the remote code that travels inside every checkpoint folder,
with config.json unchanged."""

import copy
import json
import os
import pickle
import subprocess
import sys

import torch

import thinkfast  # noqa: F401
from thinkfast.modeling import DeciLMConfig, DeciLMForCausalLM, attention_block, block_config, ffn_block

H = 64
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
# Block attributes the engines' nemotron-nas loaders read (vLLM nemotron_nas.py and its arch-config
# convertor, SGLang nemotron_nas.py, TensorRT-LLM modeling_nemotron_nas.py / convert.py)
ATTENTION_READS = ("no_op", "replace_with_linear", "n_heads_in_group")
FFN_READS = ("no_op", "replace_with_linear", "ffn_mult")


def config(**kw):
    blocks = [
        block_config(attention_block(2), ffn_block(96, H)),
        block_config(attention_block(no_op=True), ffn_block(40, H)),
        block_config(attention_block(linear=True), ffn_block(None, H, linear=True)),
        block_config(attention_block(4), ffn_block(None, H, no_op=True)),
    ]
    return DeciLMConfig(vocab_size=61, hidden_size=H, num_hidden_layers=len(blocks), num_attention_heads=4,
                        block_configs=blocks, max_position_embeddings=256, **kw)


def check_attributes(cfg):
    for block in cfg.block_configs:
        for name in ATTENTION_READS:
            assert getattr(block.attention, name) == block["attention"][name]
        for name in FFN_READS:
            assert getattr(block.ffn, name) == block["ffn"][name]
        assert getattr(block.attention, "sparsify", "absent") == "absent"  # getattr with a default works
        assert not hasattr(block.ffn, "moe")
    assert cfg.block_configs[1].attention.no_op and cfg.block_configs[2].ffn.replace_with_linear
    assert cfg.block_configs[0].attention.n_heads_in_group == 2


def test_blocks_read_by_attribute_and_survive_copy_and_pickle():
    cfg = config()
    check_attributes(cfg)
    check_attributes(copy.deepcopy(cfg))
    check_attributes(pickle.loads(pickle.dumps(cfg)))  # engines hand configs to worker processes
    # config.json is the plain released schema: nothing added by the attribute access
    out = json.loads(cfg.to_json_string())
    assert out["block_configs"][0] == {"attention": {"n_heads_in_group": 2, "no_op": False,
                                                     "replace_with_linear": False},
                                       "ffn": {"ffn_mult": 2.25, "no_op": False, "replace_with_linear": False,
                                               "intermediate_size": 96}}
    assert all(type(b) is dict for b in cfg.to_dict()["block_configs"])
    assert "rope_parameters" not in out


def test_null_keys_nvidia_does_not_have_read_as_absent():
    blocks = [{"attention": {"n_heads_in_group": 2, "no_op": False, "window_length": None},
               "ffn": {"ffn_mult": 2.0, "no_op": False, "hidden_act": None}}]
    cfg = DeciLMConfig(vocab_size=61, hidden_size=H, num_hidden_layers=1, num_attention_heads=4, block_configs=blocks)
    b = cfg.block_configs[0]
    assert not hasattr(b.ffn, "hidden_act")  # vLLM would otherwise build an MLP with activation None
    assert hasattr(b.attention, "window_length") and b.attention.window_length is None  # a field NVIDIA has
    assert cfg.to_dict()["block_configs"][0]["ffn"]["hidden_act"] is None  # still written back


def test_rope_parameters_agree_with_the_released_keys():
    cfg = config(rope_theta=500000.0, rope_scaling=LLAMA3)
    assert cfg.rope_parameters == {**LLAMA3, "rope_theta": 500000.0}
    assert config().rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    # a config written by transformers 5's conventions reads back into the released keys
    back = config(rope_parameters={**LLAMA3, "rope_theta": 250000.0})
    assert back.rope_scaling == LLAMA3 and back.rope_theta == 250000.0
    legacy = config(rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_parameters["rope_type"] == "linear"


def test_remote_code_config_reads_blocks_by_attribute_and_rope_parameters(tmp_path):
    torch.manual_seed(0)
    DeciLMForCausalLM(config(rope_theta=500000.0, rope_scaling=LLAMA3)).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "rope_parameters" not in saved and saved["rope_scaling"] == LLAMA3
    script = f"""
import pickle, sys
from transformers import AutoConfig
cfg = AutoConfig.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True)
assert not any(k == 'thinkfast' or k.startswith('thinkfast.') for k in sys.modules), 'thinkfast was imported'
cfg = pickle.loads(pickle.dumps(cfg))
out = []
for b in cfg.block_configs:
    out.append([[getattr(b.attention, n) for n in {ATTENTION_READS!r}],
                [getattr(b.ffn, n) for n in {FFN_READS!r}], getattr(b.attention, 'window_length', 'absent')])
print(repr((out, cfg.rope_parameters)))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    blocks, rope = eval(res.stdout.strip().splitlines()[-1])
    cfg = config()
    assert blocks == [[[b["attention"][n] for n in ATTENTION_READS], [b["ffn"][n] for n in FFN_READS], "absent"]
                      for b in cfg.block_configs]
    assert rope == {**LLAMA3, "rope_theta": 500000.0}
