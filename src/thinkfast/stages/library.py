"""Stage ``library``: Puzzle's block library, trained by blockwise local distillation (BLD).

Paper: Puzzle (arXiv 2411.19146) sections 3-4.2; Llama-Nemotron (arXiv 2505.00949) section 2.1;
REFERENCE.md section 1. For every parent layer, every variant of ``thinkfast.puzzle.blocks`` is
initialised by the paper's rules (channel contributions measured on calibration rows) and then
trained to reproduce its parent layer from the parent's own input at that layer:

    loss = ||y_child - y_parent||^2 / ||y_parent||^2     (normalised MSE)

where ``y`` is the layer's update to the residual stream (layer output minus layer input).
- ``decoupled`` (default): an attention variant runs with the parent's FFN after it (frozen; gradients
  flow through it), an FFN variant runs on the parent's mid-layer activation: (m + n) blocks per layer.
- ``coupled``: every (attention, FFN) pair trains as one block: m * n blocks per layer.
In coupled pairs the parent's own half stays frozen.
All variants of all layers train from one parent forward pass per batch (one optimizer over the
independent losses; Adam's per-parameter steps make that the same as one optimizer per block).

Output ``RUN_DIR/library/library/``: ``library.json`` (documented below, plain JSON a user can
extend) and ``weights.safetensors`` with keys ``layers.{i}.{attention|ffn|block}.{name}.{param}``,
``param`` being the name inside a nemotron-nas layer (``self_attn.k_proj.weight``...).

``library.json``::

    {"format": "thinkfast-puzzle-library/1", "mode": "decoupled", "layers": [0, 1, ...],
     "parent_config": {... the parent's nemotron-nas config ...},
     "variants": [{"layer": 0, "part": "attention", "name": "gqa_kv1", "spec": {...released entry...},
                   "params": 8320, "init_loss": 0.21, "final_loss": 0.05, "weights": "attention.gqa_kv1"}, ...]}

In coupled mode the entries have ``part: "block"``, ``attention`` and ``ffn`` names and both specs.

Departures: the target is the layer's *update* (the residual stream itself would dominate a
normalised MSE); the paper's BLD ran on 0.5-1B tokens of a pretraining mix, the nano world uses a few
hundred thousand tokens of its own corpus (the data section's train part; ``thinkfast.data``).
``layer_start``/``layer_end`` train a slice of the layers
(one process or machine per slice) and ``merge_from`` joins slices into one library.

BLD itself is library code (:func:`thinkfast.puzzle.bld.block_library`, with its ``SearchSpace`` and
``BLDSettings``); this stage loads the parent and the corpus, picks the layers and reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import OUTPUTS
from ..data import Corpus
from ..modeling.engine_rules import DEFAULT_ENGINE, UNRECORDED_LIBRARY_ENGINE, check_engine
from ..puzzle.bld import BLDSettings, SearchSpace, block_library, merge_libraries
from ..artifacts import load_decilm
from ..rundir import StageDir
from ..runtime import setup_device
from ..train.settings import CadenceFields
from . import Input, Inputs, check_device, model_path

MAKES = "library"
DATA = "corpus"  # calibration and BLD read the data section's train part, held-out losses its held-out part


def reads(cfg) -> dict:
    if cfg.merge_from:
        return {"sources": Input("library", field="merge_from", many=True)}
    return {"parent": Input("model")}


@dataclass
class LibraryConfig(CadenceFields):
    """Search space and BLD. Defaults fit the nano parent (8 query / 4 KV heads, FFN 344). The cadence fields
    (``checkpoint_every``, ``log_every``) are :mod:`thinkfast.train.settings`'s."""

    # search space (REFERENCE.md section 1)
    kv_heads: list[int] = field(default_factory=lambda: [2, 1])  # GQA variants with fewer KV heads
    attention_linear: bool = True
    attention_no_op: bool = True
    ffn_fractions: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.25, 0.1])
    ffn_multiple: int = 8  # widths round up to this (256 in the released format at real scale)
    ffn_linear: bool = True
    ffn_no_op: bool = True
    mode: Literal["decoupled", "coupled"] = "decoupled"
    # the engine that will serve the child: only variants it loads (thinkfast.modeling.engine_rules); the parent must
    # be one it loads too. "hf" (transformers) loads everything, including the nano world's toy widths.
    engine: str = field(default=DEFAULT_ENGINE, metadata={"before": UNRECORDED_LIBRARY_ENGINE})
    # data: the pipeline's data section (thinkfast.data)
    calibration_rows: int = 32  # rows for channel contributions
    # BLD
    bld_steps: int = 150
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    seed: int = 0
    layer_start: int = 0
    layer_end: int | None = None  # exclusive; None = last layer
    merge_from: list[str] = field(default_factory=list)  # library folders to merge instead of training
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        self.space()  # validates the search space
        super().__post_init__()  # cadence fields
        self.bld()  # validates BLD's settings
        if self.layer_start < 0 or (self.layer_end is not None and self.layer_end <= self.layer_start):
            raise ValueError(f"layer range [{self.layer_start}, {self.layer_end}) is empty")

    def space(self) -> SearchSpace:
        """The search space of this section, as :mod:`thinkfast.puzzle.bld` takes it."""
        return SearchSpace(kv_heads=tuple(self.kv_heads), attention_linear=self.attention_linear,
                           attention_no_op=self.attention_no_op, ffn_fractions=tuple(self.ffn_fractions),
                           ffn_multiple=self.ffn_multiple, ffn_linear=self.ffn_linear, ffn_no_op=self.ffn_no_op,
                           mode=self.mode, engine=self.engine)

    def bld(self) -> BLDSettings:
        """BLD's training settings of this section."""
        return BLDSettings(steps=self.bld_steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           seed=self.seed, calibration_rows=self.calibration_rows, log_every=self.log_every,
                           checkpoint_every=self.checkpoint_every)


Config = LibraryConfig


def run(cfg: LibraryConfig, stage: StageDir, inputs: Inputs) -> dict:
    """Build and train the block library of the parent model; write ``library/``."""
    from transformers import AutoTokenizer

    out = stage.path / OUTPUTS["library"]
    if cfg.merge_from:
        merged = merge_libraries(list(inputs["sources"].values()), out, cfg.engine)
        return {"merged_from": list(cfg.merge_from), **merged}
    model_dir = model_path(inputs)
    device = setup_device(cfg.device)
    parent = load_decilm(model_dir, device)
    check_engine(parent.config, cfg.engine, f"the parent {model_dir}", untied_on_export=True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    corpus = Corpus(inputs.data, tokenizer)  # every data row is checked here, before any training
    n_layers = parent.config.num_hidden_layers
    end = n_layers if cfg.layer_end is None else cfg.layer_end
    if end > n_layers:
        raise ValueError(f"library.layer_end={cfg.layer_end} but the parent has {n_layers} layers")
    layers = list(range(cfg.layer_start, end))
    log = stage.logger()
    result = block_library(parent, corpus, layers, cfg.space(), cfg.bld(), out, stage=stage, device=device, log=log)
    init, final = result.init, result.final
    improved = sum(final[k] < init[k] - 1e-9 for k in init if init[k] > 0)
    metrics = {"layers": layers, "blocks": len(result.blocks), "trained_blocks": result.trained,
               "bld_seconds": round(result.seconds, 1), "improved": improved,
               "mean_init_nmse": sum(init.values()) / len(init), "mean_final_nmse": sum(final.values()) / len(final)}
    log.log("done", **metrics, init=init, final=final)
    log.close()
    return metrics
