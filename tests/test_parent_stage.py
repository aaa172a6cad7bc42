"""Bring your own parent: the `parent` stage links (or copies) a Llama-layout or nemotron-nas folder, and
the whole pipeline runs from it; a re-made parent folder redoes everything after it."""

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.config import ConfigError
from thinkfast.convert import convert_checkpoint
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.pipeline import default_config_path, load_pipeline, run_all, run_stage

SMOKE = default_config_path("smoke")
STAGES = "stages=[parent,library,scores,costs,search,eval]"


def llama_folder(path, seed=0):
    tok = build_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pipe(run, *extra):
    return load_pipeline(SMOKE, [f"run_dir={run}", STAGES, *extra])


def test_a_parent_by_path_runs_the_pipeline_and_its_changes_redo_it(tmp_path):
    src = llama_folder(tmp_path / "my-llama")
    run = tmp_path / "run"
    results = run_all(pipe(run, f"parent.path={src}"))
    assert (run / "parent" / "model").is_symlink() and (run / "parent" / "model").resolve() == src.resolve()
    assert results["parent"]["model_type"] == "llama" and results["parent"]["linked"]
    assert set(results["eval"]["models"]) == {"parent", "search"}
    assert (run / "search" / "model" / "tokenizer.json").is_file()
    ids = {s: json.loads((run / s / "COMPLETE.json").read_text())["output_id"] for s in results}
    llama_folder(src, seed=1)  # the parent is re-trained in place
    run_all(pipe(run, f"parent.path={src}"))
    again = {s: json.loads((run / s / "COMPLETE.json").read_text())["output_id"] for s in results}
    assert all(again[s] != ids[s] for s in ids)


def test_a_nemotron_nas_parent_copied_with_its_prompting(tmp_path):
    convert_checkpoint(llama_folder(tmp_path / "l"), tmp_path / "nas")
    run = tmp_path / "run"
    m, _ = run_stage(pipe(run, f"parent.path={tmp_path / 'nas'}", "parent.copy=true", "parent.prompting=text"),
                     "parent")
    model = run / "parent" / "model"
    assert not model.is_symlink() and m["model_type"] == "nemotron-nas"
    assert json.loads((model / "thinkfast.json").read_text()) == {"prompting": "text", "made_by": "parent"}
    assert not (tmp_path / "nas" / "thinkfast.json").exists()  # the user's folder is never written


def test_parent_mistakes_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'parent' reads a model \(source\).*set parent.path"):
        pipe(tmp_path / "r")
    with pytest.raises(ConfigError, match="parent.path=/nope: /nope does not exist"):
        run_all(pipe(tmp_path / "r", "parent.path=/nope"))
    src = llama_folder(tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no tokenizer"):
        run_stage(pipe(tmp_path / "r", f"parent.path={src}"), "parent")
    gpt = tmp_path / "gpt"
    shutil.copytree(llama_folder(tmp_path / "g"), gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        run_stage(pipe(tmp_path / "r2", f"parent.path={gpt}"), "parent")
