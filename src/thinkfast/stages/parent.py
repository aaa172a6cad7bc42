"""Stage ``parent``: bring your own parent model, by path.

Paper: Llama-Nemotron starts from an existing Llama-3 parent (arXiv 2505.00949 section 2); this stage
takes one: a Hugging Face Llama-layout folder or a nemotron-nas one. It replaces ``pretrain`` (which
makes the nano world's parent) at the head of a pipeline::

    stages: [parent, library, scores, costs, search, eval]
    parent: {path: /models/Llama-3.2-1B-Instruct}

``RUN_DIR/parent/model`` links to that folder (``copy: true`` copies it instead), so a multi-gigabyte
parent is not duplicated. The folder's content hash is part of the stage's identity: re-train or
replace the parent and every stage after it is redone. The Llama layout is converted when a stage
loads it (``thinkfast.artifacts.load_decilm``), not on disk.

``path`` may also name a GGUF file (or a folder holding one, as a llama.cpp download does): it is loaded through
transformers' GGUF support (the ``gguf`` extra), dequantised to float32, and written once into
``RUN_DIR/parent/model`` as a Llama folder with the file's tokenizer and chat template
(:func:`thinkfast.modeling.convert.llama_from_gguf`); the file's hash is the stage's identity.

The folder is checked here, cheaply (headers and sizes, no tensor read): every weights file that loading would
read (the shards ``model.safetensors.index.json`` names, else every ``*.safetensors``; else the
``pytorch_model*.bin`` files) must be whole, and the tensors must be those ``config.json`` describes. A
damaged file is an error naming it and what is wrong (``truncated: header says N bytes of tensor data, file
has M``), here rather than in the next stage, which could only blame a stage.

The text the later stages read comes from the pipeline's ``data`` section (``thinkfast.data``): with a
parent of your own, give your own files there (``configs/llama-3.1-8b.yaml``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Literal

from ..artifacts import SIDECAR, check_weights, check_weights_match_config, read_model_sidecar, write_model_sidecar
from ..rundir import StageDir, atomic_dir
from . import Input, Inputs

MAKES = "model"
_TYPES = ("llama", "nemotron-nas")
_TOKENIZERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def reads(cfg) -> dict:
    return {"source": Input("model", field="path")}


@dataclass
class ParentConfig:
    path: str | None = None  # the parent's folder (config.json, weights, tokenizer), or a .gguf (or a folder with one)
    copy: bool = False  # copy the folder into the run directory instead of linking to it
    # how eval prompts it: text cues or the chat template; auto keeps the folder's thinkfast.json, else
    # chat when the tokenizer has a chat template
    prompting: Literal["auto", "text", "chat"] = "auto"


Config = ParentConfig


def _from_gguf(cfg: ParentConfig, stage: StageDir, file) -> dict:
    """A GGUF parent, converted once into the stage's folder (float32 safetensors, tokenizer, chat template)."""
    from ..modeling.convert import llama_from_gguf

    model, tokenizer = llama_from_gguf(file)
    with atomic_dir(stage.model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cfg.prompting != "auto":
            write_model_sidecar(tmp, prompting=cfg.prompting, made_by="parent")
    layers = model.config.num_hidden_layers
    with stage.logger() as log:
        log.log("done", source=str(file), model_type="llama", layers=layers, linked=False, gguf=True)
    return {"source": str(file), "model_type": "llama", "layers": layers, "linked": False, "gguf": True}


def run(cfg: ParentConfig, stage: StageDir, inputs: Inputs) -> dict:
    from ..modeling.convert import gguf_file

    src = inputs["source"]
    file = gguf_file(src)
    if file is not None:
        return _from_gguf(cfg, stage, file)
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") not in _TYPES:
        raise ValueError(f"parent.path: {src} holds a {config.get('model_type')!r} model; thinkfast takes "
                         f"{' or '.join(_TYPES)} parents")
    if not any((src / name).is_file() for name in _TOKENIZERS):
        raise ValueError(f"parent.path: {src} has no tokenizer ({', '.join(_TOKENIZERS)}); every later stage "
                         "reads it, and every child carries it")
    remedy = "parent.path: replace the file with a good copy, e.g. download or save the model again"
    tensors = check_weights(src, remedy)
    if tensors is not None:
        check_weights_match_config(src, tensors, remedy)
    sidecar = read_model_sidecar(src)
    if cfg.copy or (cfg.prompting != "auto" and sidecar.get("prompting") != cfg.prompting):
        with atomic_dir(stage.model_dir) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            if cfg.prompting != "auto":
                (tmp / SIDECAR).unlink(missing_ok=True)
                write_model_sidecar(tmp, prompting=cfg.prompting, made_by="parent")
        linked = False
    else:
        stage.path.mkdir(parents=True, exist_ok=True)
        if stage.model_dir.is_symlink():  # from an interrupted attempt
            stage.model_dir.unlink()
        os.symlink(src, stage.model_dir, target_is_directory=True)
        linked = True
    layers = config.get("num_hidden_layers")
    with stage.logger() as log:
        log.log("done", source=str(src), model_type=config["model_type"], layers=layers, linked=linked,
                tensors=len(tensors) if tensors is not None else None)
    return {"source": str(src), "model_type": config["model_type"], "layers": layers, "linked": linked}
