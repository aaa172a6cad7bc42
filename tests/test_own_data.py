"""Your own parent and your own data: the shipped real-parent config (configs/llama-3.2-1b.yaml), shrunk by
overrides, on a tiny random Llama with a BPE tokenizer trained here over ../shared/data/tinyshakespeare."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from thinkfast.modeling.engine_rules import check_engine
from thinkfast.modeling import DeciLMConfig
from thinkfast.pipeline import load_pipeline, run_all, status
from thinkfast.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = ROOT / "configs" / "llama-3.2-1b.yaml"
pytestmark = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent")

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def bpe_tokenizer(text_file: Path, vocab: int = 384):
    """A byte-level BPE tokenizer trained here (no download), Llama-3 special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text_file)], trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|end_of_text|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny") / "Llama-tiny"
    tok = bpe_tokenizer(SHAKESPEARE)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def shrunk(run, parent, data_file, *extra):
    return load_pipeline(CONFIG, [
        f"run_dir={run}", f"parent.path={parent}", f"data.files=[{data_file}]", "data.held_out=0.1",
        "library.kv_heads=[1]", "library.ffn_fractions=[0.5]", "library.calibration_rows=4", "library.bld_steps=4",
        "library.batch_size=2", "library.seq_len=64", "library.lr=1e-3", "library.checkpoint_every=2", "library.device=cpu",
        "scores.rows=2", "scores.seq_len=64", "scores.batch_size=2", "scores.device=cpu",
        "costs.dtype=float32", "costs.batch_sizes=[1,4]", "costs.prefill_len=16", "costs.decode_context=16",
        "costs.warmup=1", "costs.repeats=2", "costs.rounds=2", "costs.device=cpu",
        "search.batch_size=4", "search.speedup=null", "search.kv_fraction=0.5", "search.sweep=[]", "search.device=cpu",
        *extra])


def test_the_real_parent_config_runs_on_a_tiny_llama_over_tinyshakespeare(tmp_path, tiny_llama):
    data = tmp_path / "input.txt"
    shutil.copy(SHAKESPEARE, data)  # a copy of our own, changed below (the shared file is read-only)
    run = tmp_path / "run"
    pipe = shrunk(run, tiny_llama, data)
    assert pipe.configs["library"].engine == "vllm" and pipe.data.files == [str(data)]
    results = run_all(pipe)
    assert results["scores"]["blocks"] > 0 and results["library"]["trained_blocks"] > 0
    child = run / "search" / "model"
    config = DeciLMConfig.from_pretrained(child)
    check_engine(config, "vllm", "the child")  # what the search writes, vLLM's loader reads
    assert [b.attention.n_heads_in_group for b in config.block_configs] == [4, 4, 4]  # 1 KV head everywhere
    assert config.rope_parameters["rope_type"] == "llama3"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in child.iterdir()}
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(child).chat_template == CHAT_TEMPLATE  # the parent's own tokenizer
    lib = json.loads((run / "library" / "library" / "library.json").read_text())
    names = {(v["layer"], v["part"], v["name"]) for v in lib["variants"]}
    assert {n for _, part, n in names if part == "ffn"} == {"ffn_512", "ffn_256", "no_op"}  # multiples of 256
    assert (0, "attention", "no_op") not in names and (1, "attention", "no_op") in names  # vLLM: layer 0 attends

    # the text changes: the stages that read it are redone, the parent is not
    with data.open("a") as f:
        f.write("\nFIRST CITIZEN:\nA line no play has.\n")
    pipe = shrunk(run, tiny_llama, data)
    with RunDir(run) as rd:
        assert status(pipe, rd, "parent") == ("complete", [])
        state, reasons = status(pipe, rd, "library")
        assert state == "stale" and reasons == [f"input 'data.input.txt' ({data}) changed since this stage ran"]
