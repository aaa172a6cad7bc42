"""``data.doc_mask``: the documents of a packed row attend only to themselves, in pretraining and in every
stage that reads rows after it (the Puzzle stages, fusion's measurements, distillation)."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.modeling.convert import convert_llama_model
from thinkfast.data import Corpus, DataConfig, DataError, doc_attention
from thinkfast.puzzle.fusion import dependency_matrix
from thinkfast.nano.corpus import packed_rows
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.pipeline import default_config_path, load_pipeline, run_all, status
from thinkfast.puzzle.parent import layer_io, logits_from
from thinkfast.rundir import RunDir
from thinkfast.data import document_ids


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return convert_llama_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2))).eval()


def _documents(rows, eos):
    """(row, token positions) of every document of ``rows``."""
    seq, _ = document_ids(rows, eos)
    for r in range(rows.shape[0]):
        for d in range(int(seq[r].max()) + 1):
            yield r, (seq[r] == d).nonzero().flatten()


def test_layer_activations_and_logits_under_the_mask_equal_each_document_alone(tok, model):
    eos = tok.eos_token_id
    rows = packed_rows(tok, random.Random(0), 2, 300)
    io = layer_io(model, rows, eos)
    logits = logits_from(model, io.x[1], 1, io.cos, io.sin, io.mask)
    docs = list(_documents(rows, eos))
    assert len(docs) > 2
    for r, at in docs:
        alone = layer_io(model, rows[r:r + 1, at])
        assert (alone.y[-1][0] - io.y[-1][r, at]).abs().max() <= 1e-5
        ref = logits_from(model, alone.x[1], 1, alone.cos, alone.sin)
        assert (ref[0] - logits[r, at]).abs().max() <= 1e-4
    assert (layer_io(model, rows).y[-1] - io.y[-1]).abs().max() > 1e-3  # unmasked, later documents see earlier


def test_dependency_matrix_under_the_mask_is_the_token_weighted_mean_over_documents(tok, model):
    eos = tok.eos_token_id
    rows = packed_rows(tok, random.Random(1), 1, 200)
    whole = dependency_matrix(model, [rows], eos_id=eos)
    total = torch.zeros_like(whole)
    for r, at in _documents(rows, eos):
        total += dependency_matrix(model, [rows[r:r + 1, at]]) * len(at)
    assert torch.allclose(whole, total / rows.numel(), atol=1e-5)


def test_corpus_attention(tok):
    ids = torch.tensor([[5, 6, tok.eos_token_id, 7]])
    plain, masked = Corpus(DataConfig(), tok), Corpus(DataConfig(doc_mask=True), tok)
    assert plain.doc_eos is None and doc_attention(ids, plain.doc_eos) == {}
    assert masked.doc_eos == tok.eos_token_id == DataConfig(doc_mask=True).doc_eos(tok)
    attn = doc_attention(ids, masked.doc_eos)
    assert attn["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert attn["attention_mask"][0, 0, 2, 0] and not attn["attention_mask"][0, 0, 3, 0]

    class NoEos:
        eos_token_id = None

    with pytest.raises(DataError, match="doc_mask"):
        Corpus(DataConfig(doc_mask=True), NoEos())
    assert DataConfig().doc_eos(NoEos()) is None


def test_the_pipeline_runs_masked_and_the_switch_redoes_every_stage_that_reads_rows(tmp_path):
    run = tmp_path / "run"
    args = [f"run_dir={run}", "stages=[pretrain,library,scores,costs,search,fuse,distill]", "data.doc_mask=true",
            "fuse.measure=false", "fuse.dependency_rows=2", "fuse.kl_rows=2", "fuse.seq_len=64",
            "distill.train_steps=4", "distill.batch_size=2", "distill.seq_len=64", "distill.eval_every=4",
            "distill.eval_rows=2", "distill.eval_problems=2", "distill.eval_max_new_tokens=6"]
    results = run_all(load_pipeline(default_config_path("smoke"), args))
    assert set(results) >= {"pretrain", "library", "scores", "search", "fuse", "distill"}
    pipe = load_pipeline(default_config_path("smoke"), [*args[:2], "data.doc_mask=false", *args[3:]])
    with RunDir(pipe.run_dir) as rd:
        for name in ("pretrain", "library", "scores", "fuse", "distill"):
            st, reasons = status(pipe, rd, name)
            assert st == "stale", (name, st, reasons)
        assert any("data.doc_mask" in r for r in status(pipe, rd, "pretrain")[1])
