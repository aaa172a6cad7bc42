"""Bring your own parent: the `parent` stage links (or copies) a Llama-layout or nemotron-nas folder, and
the whole pipeline runs from it; a re-made parent folder redoes everything after it."""

import json
import re
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.config import ConfigError
from thinkfast.artifacts import convert_checkpoint
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


def test_a_damaged_parent_is_named_by_the_parent_stage(tmp_path):
    src = llama_folder(tmp_path / "my-llama")
    weights = src / "model.safetensors"
    good = weights.read_bytes()
    run = tmp_path / "run"

    def fails(match):
        with pytest.raises(ValueError, match=match):
            run_stage(pipe(run, f"parent.path={src}"), "parent")
        assert not (run / "parent" / "COMPLETE.json").exists()

    header = 8 + int.from_bytes(good[:8], "little")
    weights.write_bytes(good[:-100])  # cut short, as by an interrupted download
    at = re.escape(str(weights))
    fails(rf"^{at}: truncated: header says {len(good) - header} bytes of tensor data, file has "
          rf"{len(good) - header - 100} \(parent.path: replace the file with a good copy")
    weights.write_bytes(b"<html><body>404 Not Found</body></html>")
    fails(rf"^{at}: not a safetensors file \(it starts with b'<html><body>'\)")
    weights.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    fails(rf"^{at}: a Git LFS pointer, not the weights: fetch them \(git lfs pull\)")
    weights.unlink()
    fails(rf"^{re.escape(str(src))}: no weights \(model.safetensors, ")
    weights.write_bytes(good)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))  # weights of another model
    fails(r"config.json implies 29 weight tensors; the weights files lack 9 of them, e.g. "  # layer 2's 9
          r"model.layers.2.self_attn.q_proj.weight")
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    fails(rf"^{at}: model.layers.0.mlp.gate_proj.weight has shape \[64, 32\], config.json implies \[48, 32\]")
    (src / "config.json").write_text(json.dumps(cfg))
    m, _ = run_stage(pipe(run, f"parent.path={src}"), "parent")  # whole again: it passes
    assert m["linked"]


def test_a_sharded_parent_with_a_missing_or_short_shard(tmp_path):
    src = llama_folder(tmp_path / "sharded")
    model = LlamaForCausalLM.from_pretrained(src)
    (src / "model.safetensors").unlink()
    model.save_pretrained(src, max_shard_size="60KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[-1].startswith("model-0000")
    run = tmp_path / "run"
    m, _ = run_stage(pipe(run, f"parent.path={src}"), "parent")  # a whole sharded parent passes
    assert m["linked"]
    last = src / shards[-1]
    data = last.read_bytes()
    last.unlink()
    index_file = re.escape(str(src / "model.safetensors.index.json"))
    with pytest.raises(ValueError, match=rf"^{index_file}: the index names {shards[-1]}, which is missing "
                                         r"\(parent.path: replace"):
        run_stage(pipe(tmp_path / "run2", f"parent.path={src}"), "parent")
    moved = next(k for k, f in index["weight_map"].items() if f == shards[-1])
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {**index, "weight_map": {**index["weight_map"], moved: shards[0]}}))
    last.write_bytes(data)
    first = re.escape(str(src / shards[0]))
    with pytest.raises(ValueError, match=rf"^{first}: holds no tensor {moved}, which "
                                         r"model.safetensors.index.json puts in it"):
        run_stage(pipe(tmp_path / "run3", f"parent.path={src}"), "parent")


def test_a_parent_damaged_after_the_parent_stage_is_not_blamed_on_a_stage(tmp_path):
    """The next stage names the user's file and folder, not 're-run the pretrain stage' (there is none), even
    when the folder was made by another run's pretrain stage (its thinkfast.json says made_by: pretrain)."""
    from thinkfast.artifacts import ArtifactError, write_model_sidecar
    from thinkfast.artifacts import load_decilm

    src = llama_folder(tmp_path / "from-another-run")
    write_model_sidecar(src, "text", "pretrain")
    run = tmp_path / "run"
    run_stage(pipe(run, f"parent.path={src}"), "parent")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError) as e:
        load_decilm(run / "parent" / "model")  # as the library stage loads its parent
    msg = str(e.value)
    assert msg.startswith(f"{weights.resolve()}: truncated: header says ")
    assert f"the model folder is {src.resolve()} (linked as {run / 'parent' / 'model'}), which no stage of this " \
           "run wrote: replace the damaged file with a good copy" in msg
    assert "pretrain" not in msg and "--force" not in msg


def test_a_parent_with_pytorch_bin_weights(tmp_path):
    src = llama_folder(tmp_path / "bin")
    torch.save(LlamaForCausalLM.from_pretrained(src).state_dict(), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    run_stage(pipe(tmp_path / "run", f"parent.path={src}"), "parent")  # a whole .bin passes
    weights = src / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-200])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))}: not a readable PyTorch checkpoint "
                                         r"\(truncated, or not a weights file"):
        run_stage(pipe(tmp_path / "run2", f"parent.path={src}"), "parent")
