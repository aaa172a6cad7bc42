"""Stage ``scores``: replace-1-block quality of every library block.

Paper: Puzzle (arXiv 2411.19146) section 4.3; REFERENCE.md section 1. A block's score is measured on
held-out data with that one layer swapped into the otherwise unchanged parent:
KL(parent || model) per token (the paper's choice: it beat LM loss and downstream accuracy) and the
LM loss, both written; the search minimises the sum of the chosen blocks' scores (``search.metric``).

Output ``RUN_DIR/scores/scores.json``::

    {"format": "thinkfast-puzzle-scores/1", "metric_names": ["kl", "lm_loss"], "parent_lm_loss": 0.41,
     "tokens": 8192,
     "blocks": [{"layer": 0, "attention": "gqa_kv2", "ffn": "ffn_344", "kl": 0.0, "lm_loss": 0.41}, ...]}

A user can write this file for their own measurements (any extra metric name works with
``search.metric``).

Departure: the parent's activations up to the swapped layer are computed once per layer and reused for
all its blocks (exact; the layers before it are unchanged; :mod:`thinkfast.puzzle.scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..artifacts import OUTPUTS, SCORES_FORMAT, check_scores, load_tensors, read_library
from ..data import Corpus, doc_attention
from ..puzzle.parent import kl_and_lm_loss
from ..artifacts import load_decilm
from ..puzzle.scores import replace_one_block_scores
from ..rundir import StageDir, atomic_write_json
from . import Input, Inputs, check_device, model_path, resolve_device

MAKES = "scores"
DATA = "corpus"  # the data section's held-out part


def reads(cfg) -> dict:
    return {"parent": Input("model"), "library": Input("library", field="library")}


@dataclass
class ScoresConfig:
    """Held-out rows for replace-1-block scoring (the data section's held-out part, which BLD never reads)."""

    rows: int = 16
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    library: str | None = None  # a library folder; default RUN_DIR/library/library
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        if self.rows < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("rows, batch_size must be >= 1 and seq_len >= 2")


Config = ScoresConfig


def run(cfg: ScoresConfig, stage: StageDir, inputs: Inputs) -> dict:
    from transformers import AutoTokenizer

    model_dir = model_path(inputs)
    device = resolve_device(cfg.device)
    lib_path = inputs["library"]
    lib = read_library(lib_path)
    tensors = load_tensors(lib_path / "weights.safetensors", device=str(device))
    parent = load_decilm(model_dir, device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    corpus = Corpus(inputs.data, tokenizer)
    ids = corpus.rows("held_out", f"scores-heldout:{cfg.seed}", cfg.rows, cfg.seq_len + 1).to(device)
    print(f"scores: replace-1-block KL and LM loss on {ids.numel()} held-out tokens")
    blocks = replace_one_block_scores(parent, lib, tensors, ids, cfg.batch_size, corpus.doc_eos)
    with torch.no_grad():
        logits = parent(input_ids=ids[:, :-1], **doc_attention(ids[:, :-1], corpus.doc_eos)).logits
        _, parent_lm = kl_and_lm_loss(logits, logits, ids[:, 1:])
    out = {"format": SCORES_FORMAT, "metric_names": ["kl", "lm_loss"], "parent_lm_loss": parent_lm,
           "tokens": int(ids[:, 1:].numel()), "blocks": blocks}
    check_scores(out, "scores (as measured)", lib)  # a NaN from a diverged block stops here, named
    atomic_write_json(stage.path / OUTPUTS["scores"], out)
    worst = max(blocks, key=lambda b: b["kl"])
    metrics = {"blocks": len(blocks), "parent_lm_loss": parent_lm,
               "max_kl": worst["kl"], "max_kl_block": f"{worst['layer']}:{worst['attention']}+{worst['ffn']}"}
    log = stage.logger()
    log.log("done", **metrics)
    log.close()
    return metrics

