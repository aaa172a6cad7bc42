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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from ..data import Corpus
from ..puzzle.blocks import Variant, attention_variants, channel_contribution, ffn_variants, init_variant
from ..artifacts import LIBRARY_FORMAT, load_tensors, read_library
from ..puzzle.parent import layer_io, load_decilm
from ..rundir import StageDir, atomic_dir
from ..train.loop import TrainLoop, adamw, optimizer_step, setup_device, warmup_cosine
from ..engines import check_engine, check_engine_name, supports_linear, width_multiple
from . import Input, Inputs, check_device, model_path, positive

MAKES = "library"
DATA = "corpus"  # calibration and BLD read the data section's train part, held-out losses its held-out part


def reads(cfg) -> dict:
    if cfg.merge_from:
        return {"sources": Input("library", field="merge_from", many=True)}
    return {"parent": Input("model")}


@dataclass
class LibraryConfig:
    """Search space and BLD. Defaults fit the nano parent (8 query / 4 KV heads, FFN 344)."""

    # search space (REFERENCE.md section 1)
    kv_heads: list[int] = field(default_factory=lambda: [2, 1])  # GQA variants with fewer KV heads
    attention_linear: bool = True
    attention_no_op: bool = True
    ffn_fractions: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.25, 0.1])
    ffn_multiple: int = 8  # widths round up to this (256 in the released format at real scale)
    ffn_linear: bool = True
    ffn_no_op: bool = True
    mode: Literal["decoupled", "coupled"] = "decoupled"
    # the engine that will serve the child: only variants it loads (thinkfast.engines); the parent must
    # be one it loads too. "hf" (transformers) loads everything, including the nano world's toy widths.
    engine: str = field(default="vllm", metadata={"before": "hf"})
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
    checkpoint_every: int = 50
    log_every: int = 10
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        check_engine_name(self.engine)
        positive(self, "checkpoint_every", "log_every")
        if any(k < 1 for k in self.kv_heads) or any(not 0 < f < 1 for f in self.ffn_fractions):
            raise ValueError(f"kv_heads must be >= 1 and ffn_fractions in (0, 1); got {self.kv_heads}, "
                             f"{self.ffn_fractions}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.bld_steps < 0 or self.batch_size < 1 or self.seq_len < 2 or self.calibration_rows < 1:
            raise ValueError("bld_steps must be >= 0, batch_size / calibration_rows >= 1, seq_len >= 2")
        if self.ffn_multiple < 1:
            raise ValueError(f"ffn_multiple={self.ffn_multiple} must be >= 1")
        if self.layer_start < 0 or (self.layer_end is not None and self.layer_end <= self.layer_start):
            raise ValueError(f"layer range [{self.layer_start}, {self.layer_end}) is empty")


Config = LibraryConfig


@torch.no_grad()
def _mean_abs_ffn_activation(parent, ids: torch.Tensor, batch: int, eos_id: int | None) -> dict[int, torch.Tensor]:
    """Per layer with a SwiGLU FFN: mean over tokens of ``|silu(gate(x)) * up(x)|`` [I]."""
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for s in range(0, ids.shape[0], batch):
        io = layer_io(parent, ids[s:s + batch], eos_id)
        for i, layer in enumerate(parent.model.layers):
            if layer.ffn_spec.kind == "swiglu":
                h = layer.post_attention_layernorm(io.mid[i])
                a = torch.nn.functional.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h)
                sums[i] = sums.get(i, 0) + a.abs().sum(dim=(0, 1))
        count += ids[s:s + batch].numel()
    return {i: v / count for i, v in sums.items()}


class _Block:
    """One trainable library entry and how it maps a layer's parent activations to a prediction."""

    def __init__(self, layer: int, part: str, name: str, modules: list, entry: dict, trainable: bool):
        self.layer, self.part, self.name = layer, part, name
        self.modules = modules  # attention / ffn: [variant]; block: [attention variant, ffn variant]
        self.entry = entry
        self.trainable = trainable

    @property
    def key(self) -> str:
        return f"{self.part}.{self.name}"

    def params(self):
        return [p for m in self.modules for p in m.parameters() if p.requires_grad]

    def predict(self, io, parent_layer) -> torch.Tensor:
        """The layer output with this block in place, from the parent's input (or mid) activation."""
        i = self.layer
        if self.part == "ffn":
            return self.modules[0](io.mid[i], io.cos, io.sin, io.mask, None)
        h = self.modules[0](io.x[i], io.cos, io.sin, io.mask, None)
        if self.part == "block":
            return self.modules[1](h, io.cos, io.sin, io.mask, None)
        if parent_layer.ffn_spec.kind != "no_op":  # decoupled attention: the frozen parent FFN follows
            h = h + parent_layer.mlp(parent_layer.post_attention_layernorm(h))
        return h

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for m in self.modules:
            out.update({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()})
        return out


def _lr(cfg: LibraryConfig, step: int) -> float:
    """Linear warm-up over the first 10% of steps (Adam's first steps are lr-sized whatever the gradient,
    which would throw an exactly initialised block off), then cosine decay to zero."""
    warm = max(1, cfg.bld_steps // 10)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return warmup_cosine(step, lr=cfg.lr, total=cfg.bld_steps, warmup=warm)


def _nmse(pred: torch.Tensor, io, i: int) -> torch.Tensor:
    target = io.y[i] - io.x[i]
    return ((pred - io.x[i]) - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def _has_params(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def build_blocks(cfg: LibraryConfig, parent, layers: list[int], contributions: dict[int, torch.Tensor]) -> list[_Block]:
    """Initialise every library entry of ``layers`` (the parent's own sub-blocks are exact copies and
    are not trained)."""
    config = parent.config
    blocks = []
    for i in layers:
        layer = parent.model.layers[i]
        linear = supports_linear(cfg.engine)
        kv_heads = [] if cfg.engine == "sglang" else cfg.kv_heads  # sglang needs one KV-head count throughout
        # vLLM / SGLang fail on an FFN before the first attention: layer 0 keeps an attention for them
        no_op = cfg.attention_no_op and not (i == 0 and cfg.engine in ("vllm", "sglang"))
        att = attention_variants(config, i, kv_heads, cfg.attention_linear and linear, no_op)
        ffn = ffn_variants(config, i, cfg.ffn_fractions, math.lcm(cfg.ffn_multiple, width_multiple(cfg.engine)),
                           cfg.ffn_linear and linear, cfg.ffn_no_op)

        def make(v: Variant, first: bool):
            m = init_variant(config, layer, v, contributions.get(i))
            for p in m.parameters():
                p.requires_grad_(not first)
            return m

        if cfg.mode == "decoupled":
            for part, variants in (("attention", att), ("ffn", ffn)):
                for k, v in enumerate(variants):
                    m = make(v, k == 0)
                    blocks.append(_Block(i, part, v.name, [m], {"layer": i, "part": part, "name": v.name,
                                                                "spec": v.spec}, k > 0 and _has_params(m)))
        else:
            for ka, a in enumerate(att):
                for kf, f in enumerate(ffn):
                    parent_pair = ka == 0 and kf == 0
                    entry = {"layer": i, "part": "block", "name": f"{a.name}+{f.name}", "attention": a.name,
                             "ffn": f.name, "attention_spec": a.spec, "ffn_spec": f.spec}
                    ms = [make(a, ka == 0), make(f, kf == 0)]  # the parent's own half stays frozen
                    blocks.append(_Block(i, "block", entry["name"], ms, entry,
                                         not parent_pair and any(_has_params(m) for m in ms)))
    return blocks


@torch.no_grad()
def _losses(blocks: list[_Block], parent, ids: torch.Tensor, eos_id: int | None) -> dict[str, float]:
    io = layer_io(parent, ids, eos_id)
    return {f"{b.layer}.{b.key}": float(_nmse(b.predict(io, parent.model.layers[b.layer]), io, b.layer))
            for b in blocks}


def _save_library(path: Path, cfg: LibraryConfig, parent, blocks: list[_Block], layers: list[int],
                  init: dict, final: dict) -> None:
    variants, tensors = [], {}
    for b in blocks:
        key = f"{b.layer}.{b.key}"
        state = b.state()
        tensors.update({f"layers.{key}.{k}": v for k, v in state.items()})
        variants.append({**b.entry, "params": sum(v.numel() for v in state.values()), "weights": b.key,
                         "init_loss": init.get(key), "final_loss": final.get(key), "trained": b.trainable})
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "weights.safetensors"))
        (tmp / "library.json").write_text(json.dumps({
            "format": LIBRARY_FORMAT, "mode": cfg.mode, "engine": cfg.engine, "layers": layers,
            "parent_config": parent.config.to_dict(), "variants": variants}, indent=1, default=str))


def merge_libraries(sources: list[Path], dst: Path, engine: str | None = None) -> dict:
    """Join libraries trained on disjoint layer slices of the same parent into one."""
    libs = [read_library(s) for s in sources]
    modes = {lib["mode"] for lib in libs}
    if len(modes) != 1:
        raise ValueError(f"merge_from: libraries mix modes {sorted(modes)}")
    engines = {lib.get("engine", "hf") for lib in libs}
    if len(engines) != 1:
        raise ValueError(f"merge_from: libraries were made for different engines {sorted(engines)}")
    if engine is not None and engines != {engine}:
        raise ValueError(f"merge_from: the libraries were made for {engines.pop()}, but library.engine={engine}; "
                         "make the slices with the same engine")
    layers: list[int] = []
    for src, lib in zip(sources, libs):
        overlap = set(layers) & set(lib["layers"])
        if overlap:
            raise ValueError(f"merge_from: {src} repeats layer(s) {sorted(overlap)}")
        if lib["parent_config"] != libs[0]["parent_config"]:
            raise ValueError(f"merge_from: {src} was built from a different parent than {sources[0]}")
        layers += lib["layers"]
    tensors = {}
    for src in sources:
        tensors.update(load_tensors(src / "weights.safetensors"))
    with atomic_dir(dst) as tmp:
        save_file(tensors, str(tmp / "weights.safetensors"))
        (tmp / "library.json").write_text(json.dumps({
            "format": LIBRARY_FORMAT, "mode": libs[0]["mode"], "engine": engines.pop(), "layers": sorted(layers),
            "parent_config": libs[0]["parent_config"],
            "variants": [v for lib in libs for v in lib["variants"]]}, indent=1))
    return {"layers": sorted(layers), "variants": sum(len(lib["variants"]) for lib in libs)}


def run(cfg: LibraryConfig, stage: StageDir, inputs: Inputs) -> dict:
    """Build and train the block library of the parent model; write ``library/``."""
    from transformers import AutoTokenizer

    out = stage.path / "library"
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
    print(f"library: step 1/3 calibration ({cfg.calibration_rows} rows) for channel contributions")
    calib = corpus.rows("train", f"library-calibration:{cfg.seed}", cfg.calibration_rows, cfg.seq_len).to(device)
    mean_abs = _mean_abs_ffn_activation(parent, calib, cfg.batch_size, corpus.doc_eos)
    contributions = {i: channel_contribution(a, parent.model.layers[i].mlp.down_proj.weight)
                     for i, a in mean_abs.items()}
    blocks = build_blocks(cfg, parent, layers, contributions)
    trainable = [b for b in blocks if b.trainable]
    params = [p for b in trainable for p in b.params()]
    print(f"library: step 2/3 BLD ({cfg.mode}) of {len(trainable)} blocks over layers {layers[0]}..{layers[-1]}, "
          f"{cfg.bld_steps} steps")
    held_out = corpus.rows("held_out", f"library-heldout:{cfg.seed}", cfg.batch_size, cfg.seq_len).to(device)
    init = _losses(blocks, parent, held_out, corpus.doc_eos)
    opt = adamw(params, lr=cfg.lr) if params else None

    def load(state):
        for b in trainable:
            for m, sd in zip(b.modules, state["blocks"][f"{b.layer}.{b.key}"]):
                m.load_state_dict(sd)

    loop = TrainLoop(stage, "bld", cfg.bld_steps, opt, schedule=lambda step: _lr(cfg, step), log=log,
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, device=device, load=load,
                     save=lambda: {"blocks": {f"{b.layer}.{b.key}": [m.state_dict() for m in b.modules]
                                              for b in trainable}})
    for step in loop:
        ids = corpus.rows("train", f"library-bld:{cfg.seed}:{step}", cfg.batch_size, cfg.seq_len).to(device)
        io = layer_io(parent, ids, corpus.doc_eos)  # one parent pass feeds every block
        losses = [_nmse(b.predict(io, parent.model.layers[b.layer]), io, b.layer) for b in trainable]
        total = torch.stack(losses).sum()
        optimizer_step(opt, total)
        mean = total.item() / len(losses)
        loop.end_step(step, loss=mean, postfix="mean_nmse", mean_nmse=mean)
    loop.close()
    print("library: step 3/3 held-out losses and save")
    final = _losses(blocks, parent, held_out, corpus.doc_eos)
    _save_library(out, cfg, parent, blocks, layers, init, final)
    improved = sum(final[k] < init[k] - 1e-9 for k in init if init[k] > 0)
    metrics = {"layers": layers, "blocks": len(blocks), "trained_blocks": len(trainable),
               "bld_seconds": round(loop.seconds, 1), "improved": improved,
               "mean_init_nmse": sum(init.values()) / len(init), "mean_final_nmse": sum(final.values()) / len(final)}
    log.log("done", **metrics, init=init, final=final)
    log.close()
    return metrics
