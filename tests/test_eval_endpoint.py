"""The eval harness grades a model behind an OpenAI-compatible server exactly as it grades the local folder."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import serve_in_thread
from test_modeling import hetero_config

from thinkfast.artifacts import write_model_sidecar
from thinkfast.modeling import DeciLMForCausalLM
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.stages.eval import EvalConfig, evaluate_folder


def tiny_chat_model(path):
    """A random nemotron-nas model with the nano tokenizer (toggle chat template), saved as a chat model."""
    tok = build_tokenizer()
    cfg = hetero_config()
    cfg.vocab_size, cfg.max_position_embeddings = len(tok), 1024
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    model = DeciLMForCausalLM(cfg).eval()
    with torch.no_grad():  # big enough weights that the responses differ from prompt to prompt
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_model_sidecar(path, prompting="chat", made_by="test")
    return path


def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_a_served_model_is_graded_like_the_local_folder(tmp_path):
    from thinkfast.serving.server import load_state

    folder = tiny_chat_model(tmp_path / "model")
    common = dict(model=str(folder), per_cell=2, digits=[1], max_new_tokens=24, on_temperature=0.0, save_samples=2,
                  device="cpu")
    local = evaluate_folder(EvalConfig(**common), folder, tmp_path / "local")
    base, stop = serve_in_thread(load_state(folder, max_batch=8, device="cpu"))
    try:
        served = evaluate_folder(EvalConfig(**common, endpoint=base + "/v1", endpoint_concurrency=4), folder,
                                 tmp_path / "served")
    finally:
        stop()
    assert served["model"].endswith(f"at {base}/v1")
    for mode in ("on", "off"):
        a, b = local["modes"][mode], served["modes"][mode]
        assert a["accuracy"] == b["accuracy"] and a["format_ok"] == b["format_ok"]
        assert abs(a["mean_tokens"] - b["mean_tokens"]) <= 0.1 * a["mean_tokens"]  # re-tokenized text
    responses = [s["response"] for s in _samples(tmp_path / "local")]
    assert len(set(responses)) > 2 and responses == [s["response"] for s in _samples(tmp_path / "served")]


def test_endpoint_settings_are_checked():
    with pytest.raises(ValueError, match="http"):
        EvalConfig(model="m", endpoint="localhost:8000")
    with pytest.raises(ValueError, match="eval.model"):
        EvalConfig(endpoint="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="local model"):
        EvalConfig(model="m", endpoint="http://127.0.0.1:1/v1", budgets=[0])


def test_no_server_at_the_endpoint_is_a_clear_error(tmp_path):
    from thinkfast.endpoint import Endpoint

    with pytest.raises(ConnectionError, match="no OpenAI-compatible server"):
        Endpoint("http://127.0.0.1:9/v1", build_tokenizer())
