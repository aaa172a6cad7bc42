"""A parent from a GGUF file (issue 27): a tiny Llama GGUF written here with the gguf package (no download) loads
through transformers' own GGUF support, becomes a plain Llama folder in the parent stage, and the pipeline runs
from it with logits equal to transformers' GGUF loading."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM  # noqa: E402

from thinkfast.artifacts import load_decilm  # noqa: E402
from thinkfast.config import ConfigError  # noqa: E402
from thinkfast.modeling.convert import ConversionError, gguf_file, llama_from_gguf  # noqa: E402
from thinkfast.pipeline import default_config_path, load_pipeline, run_all, run_stage  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_gguf(path, seed=0, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48, tied=True):
    """A Llama GGUF as llama.cpp's converter lays one out (SmolLM2's shape in miniature): byte-level BPE
    tokenizer ("gpt2") with a chat template, float32 tensors."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet()) + ["Ġt", "he", "Ġ1"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "h e", "Ġ 1"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(seed)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    d = hidden // heads
    w.add_tensor("token_embd.weight", t(len(tokens), hidden))
    w.add_tensor("output_norm.weight", 1 + t(hidden))
    if not tied:
        w.add_tensor("output.weight", t(len(tokens), hidden))
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,))):
            w.add_tensor(f"blk.{i}.{name}.weight", 1 + t(*shape))
        for name, shape in (("attn_q", (heads * d, hidden)), ("attn_k", (kv_heads * d, hidden)),
                            ("attn_v", (kv_heads * d, hidden)), ("attn_output", (hidden, heads * d)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_a_gguf_loads_as_transformers_loads_it(tmp_path, tied):
    file = write_gguf(tmp_path / "tiny.gguf", tied=tied)
    model, tok = llama_from_gguf(file)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ids = tok("the 1 the tea", return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.config.tie_word_embeddings == tied and model.config.num_key_value_heads == 2
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    model.save_pretrained(tmp_path / "saved")  # the GGUF-loaded model itself refuses this


def test_the_parent_stage_converts_a_gguf_and_the_pipeline_runs_from_it(tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    file = write_gguf(folder / "tiny.Q8.gguf")
    run = tmp_path / "run"
    pipe = load_pipeline(default_config_path("smoke"), [f"run_dir={run}", f"parent.path={folder}",
                                                        "stages=[parent,library,scores,costs,search]"])
    results = run_all(pipe)
    assert results["parent"]["gguf"] and results["parent"]["layers"] == 2
    model = run / "parent" / "model"
    assert not model.is_symlink() and (model / "tokenizer.json").is_file() and (model / "config.json").is_file()
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.Q8.gguf")
    ids = torch.tensor([[1, 70, 80, 261, 90]])
    assert torch.allclose(load_decilm(model)(ids).logits, ref(ids).logits, atol=1e-5)
    assert (run / "search" / "model" / "config.json").is_file()
    marker = json.loads((run / "parent" / "COMPLETE.json").read_text())
    write_gguf(file, seed=1)  # another GGUF in its place: the parent and what follows are redone
    again = run_stage(load_pipeline(default_config_path("smoke"), [f"run_dir={run}", f"parent.path={folder}",
                                                                   "stages=[parent]"]), "parent")
    assert again[1] and json.loads((run / "parent" / "COMPLETE.json").read_text())["output_id"] != marker["output_id"]


def test_gguf_mistakes_are_named(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    write_gguf(folder / "a.gguf")
    write_gguf(folder / "b.gguf")
    with pytest.raises(ConversionError, match=r"2 GGUF files \(a.gguf, b.gguf\): name one"):
        gguf_file(folder)
    with pytest.raises(ConfigError, match=r"parent.path=.*2 GGUF files \(a.gguf, b.gguf\): name one"):
        run_all(load_pipeline(default_config_path("smoke"), [f"run_dir={tmp_path / 'run'}", f"parent.path={folder}",
                                                             "stages=[parent,library]"]))
    assert gguf_file(folder / "a.gguf") == folder / "a.gguf" and gguf_file(tmp_path) is None
    with pytest.raises(ConversionError, match="not a .gguf file"):
        llama_from_gguf(tmp_path)
