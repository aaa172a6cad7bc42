"""Blockwise local distillation (BLD): Puzzle's block library, every variant of every layer trained to
reproduce its parent layer from the parent's own input at that layer.

Puzzle (arXiv 2411.19146) sections 3-4.2; Llama-Nemotron (arXiv 2505.00949) section 2.1. Every variant of
:mod:`thinkfast.puzzle.blocks` offered by the :class:`SearchSpace` is initialised by the paper's rules
(channel contributions measured on calibration rows) and trained on

    loss = ||y_child - y_parent||^2 / ||y_parent||^2     (normalised MSE)

where ``y`` is the layer's update to the residual stream (layer output minus layer input).
- ``decoupled``: an attention variant runs with the parent's FFN after it (frozen; gradients flow through
  it), an FFN variant runs on the parent's mid-layer activation: (m + n) blocks per layer.
- ``coupled``: every (attention, FFN) pair trains as one block: m * n blocks per layer; the parent's own
  half stays frozen.
All variants of all layers train from one parent forward pass per batch (one optimizer over the
independent losses; Adam's per-parameter steps make that the same as one optimizer per block).

:func:`block_library` is BLD as one call (calibration, initialisation, training, held-out losses, the
library folder written); :func:`merge_libraries` joins libraries trained on disjoint layer slices. The
folder's format is described in :mod:`thinkfast.stages.library`.

Shapes: ``ids`` [B, T]; activations [B, T, H]; FFN activations [B, T, I].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from ..artifacts import LIBRARY_FORMAT, load_tensors, read_library
from ..modeling.engine_rules import DEFAULT_ENGINE, check_engine_name, library_engine, supports_linear, width_multiple
from ..rundir import atomic_dir
from ..train.loop import TrainLoop, adamw, optimizer_step, warmup_cosine
from .blocks import Variant, attention_variants, channel_contribution, ffn_variants, init_variant
from .parent import layer_io

__all__ = ["BLDBlock", "BLDResult", "BLDSettings", "SearchSpace", "bld_lr", "block_library", "build_blocks",
           "channel_contributions", "merge_libraries", "save_library"]


@dataclass(frozen=True)
class SearchSpace:
    """The variants a library offers per layer (Puzzle section 3): GQA with each of ``kv_heads`` KV heads,
    linear and no-op attention; FFNs at each of ``ffn_fractions`` of the parent's width (rounded up to
    ``ffn_multiple`` and to what ``engine`` can express), linear and no-op FFNs; trained per part
    (``decoupled``) or per pair (``coupled``). ``engine``: only variants it loads (:mod:`thinkfast.modeling.engine_rules`)."""

    kv_heads: tuple[int, ...] = (2, 1)
    attention_linear: bool = True
    attention_no_op: bool = True
    ffn_fractions: tuple[float, ...] = (0.75, 0.5, 0.25, 0.1)
    ffn_multiple: int = 8
    ffn_linear: bool = True
    ffn_no_op: bool = True
    mode: Literal["decoupled", "coupled"] = "decoupled"
    engine: str = DEFAULT_ENGINE

    def __post_init__(self):
        check_engine_name(self.engine)
        if any(k < 1 for k in self.kv_heads) or any(not 0 < f < 1 for f in self.ffn_fractions):
            raise ValueError(f"kv_heads must be >= 1 and ffn_fractions in (0, 1); got {list(self.kv_heads)}, "
                             f"{list(self.ffn_fractions)}")
        if self.ffn_multiple < 1:
            raise ValueError(f"ffn_multiple={self.ffn_multiple} must be >= 1")


@dataclass(frozen=True)
class BLDSettings:
    """BLD's training: ``steps`` of ``batch_size`` rows of ``seq_len`` tokens at peak ``lr`` (:func:`bld_lr`);
    channel contributions from ``calibration_rows`` rows; rows drawn by keys with ``seed``; log and
    checkpoint cadence."""

    steps: int = 150
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    seed: int = 0
    calibration_rows: int = 32
    log_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2 or self.calibration_rows < 1:
            raise ValueError("bld_steps must be >= 0, batch_size / calibration_rows >= 1, seq_len >= 2")


@dataclass
class BLDResult:
    """What :func:`block_library` did: every block (``trained``: how many were trained), each block's
    held-out normalised MSE before (``init``) and after (``final``) BLD by ``"layer.part.name"``, and the
    training's wall time."""

    blocks: list[BLDBlock]
    trained: int
    init: dict[str, float]
    final: dict[str, float]
    seconds: float


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


def channel_contributions(parent, ids: torch.Tensor, batch: int, eos_id: int | None) -> dict[int, torch.Tensor]:
    """Per layer with a SwiGLU FFN: each channel's contribution [I] to the FFN's output on rows ``ids``
    (:func:`thinkfast.puzzle.blocks.channel_contribution` of the mean absolute activation)."""
    mean_abs = _mean_abs_ffn_activation(parent, ids, batch, eos_id)
    return {i: channel_contribution(a, parent.model.layers[i].mlp.down_proj.weight) for i, a in mean_abs.items()}


class BLDBlock:
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


def bld_lr(step: int, *, lr: float, steps: int) -> float:
    """Linear warm-up over the first 10% of steps (Adam's first steps are lr-sized whatever the gradient,
    which would throw an exactly initialised block off), then cosine decay to zero."""
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return warmup_cosine(step, lr=lr, total=steps, warmup=warm)


def _nmse(pred: torch.Tensor, io, i: int) -> torch.Tensor:
    target = io.y[i] - io.x[i]
    return ((pred - io.x[i]) - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def _has_params(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def build_blocks(space: SearchSpace, parent, layers: list[int],
                 contributions: dict[int, torch.Tensor]) -> list[BLDBlock]:
    """Initialise every library entry of ``layers`` by the paper's rules (``contributions``: per layer, the
    FFN channels' contributions [I] that pick which channels a narrower FFN keeps); the parent's own
    sub-blocks are exact copies and are not trained."""
    config = parent.config
    blocks = []
    for i in layers:
        layer = parent.model.layers[i]
        linear = supports_linear(space.engine)
        kv_heads = [] if space.engine == "sglang" else space.kv_heads  # sglang needs one KV-head count throughout
        # vLLM / SGLang fail on an FFN before the first attention: layer 0 keeps an attention for them
        no_op = space.attention_no_op and not (i == 0 and space.engine in ("vllm", "sglang"))
        att = attention_variants(config, i, kv_heads, space.attention_linear and linear, no_op)
        ffn = ffn_variants(config, i, space.ffn_fractions, math.lcm(space.ffn_multiple, width_multiple(space.engine)),
                           space.ffn_linear and linear, space.ffn_no_op)

        def make(v: Variant, first: bool):
            m = init_variant(config, layer, v, contributions.get(i))
            for p in m.parameters():
                p.requires_grad_(not first)
            return m

        if space.mode == "decoupled":
            for part, variants in (("attention", att), ("ffn", ffn)):
                for k, v in enumerate(variants):
                    m = make(v, k == 0)
                    blocks.append(BLDBlock(i, part, v.name, [m], {"layer": i, "part": part, "name": v.name,
                                                                "spec": v.spec}, k > 0 and _has_params(m)))
        else:
            for ka, a in enumerate(att):
                for kf, f in enumerate(ffn):
                    parent_pair = ka == 0 and kf == 0
                    entry = {"layer": i, "part": "block", "name": f"{a.name}+{f.name}", "attention": a.name,
                             "ffn": f.name, "attention_spec": a.spec, "ffn_spec": f.spec}
                    ms = [make(a, ka == 0), make(f, kf == 0)]  # the parent's own half stays frozen
                    blocks.append(BLDBlock(i, "block", entry["name"], ms, entry,
                                         not parent_pair and any(_has_params(m) for m in ms)))
    return blocks


@torch.no_grad()
def _losses(blocks: list[BLDBlock], parent, ids: torch.Tensor, eos_id: int | None) -> dict[str, float]:
    io = layer_io(parent, ids, eos_id)
    return {f"{b.layer}.{b.key}": float(_nmse(b.predict(io, parent.model.layers[b.layer]), io, b.layer))
            for b in blocks}


def save_library(path: Path, space: SearchSpace, parent, blocks: list[BLDBlock], layers: list[int],
                 init: dict, final: dict) -> None:
    """Write the library folder ``path``: ``weights.safetensors`` and ``library.json`` (with each block's
    held-out losses before and after BLD, ``init`` and ``final``)."""
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
            "format": LIBRARY_FORMAT, "mode": space.mode, "engine": space.engine, "layers": layers,
            "parent_config": parent.config.to_dict(), "variants": variants}, indent=1, default=str))


def merge_libraries(sources: list[Path], dst: Path, engine: str | None = None) -> dict:
    """Join libraries trained on disjoint layer slices of the same parent into one."""
    libs = [read_library(s) for s in sources]
    modes = {lib["mode"] for lib in libs}
    if len(modes) != 1:
        raise ValueError(f"merge_from: libraries mix modes {sorted(modes)}")
    engines = {library_engine(lib) for lib in libs}
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


def block_library(parent, corpus, layers: list[int], space: SearchSpace, settings: BLDSettings, out: Path, *,
                  stage, device: torch.device, log=None) -> BLDResult:
    """BLD of ``layers`` of ``parent`` on ``corpus`` (:class:`thinkfast.data.Corpus`: calibration and training
    rows from its train part, held-out losses from its held-out part); writes the library folder ``out``.
    ``stage`` (:class:`thinkfast.rundir.StageDir`) holds the resumable checkpoint and, without ``log``, the log."""
    print(f"library: step 1/3 calibration ({settings.calibration_rows} rows) for channel contributions")
    calib = corpus.rows("train", f"library-calibration:{settings.seed}", settings.calibration_rows,
                        settings.seq_len).to(device)
    contributions = channel_contributions(parent, calib, settings.batch_size, corpus.doc_eos)
    blocks = build_blocks(space, parent, layers, contributions)
    trainable = [b for b in blocks if b.trainable]
    params = [p for b in trainable for p in b.params()]
    print(f"library: step 2/3 BLD ({space.mode}) of {len(trainable)} blocks over layers {layers[0]}..{layers[-1]}, "
          f"{settings.steps} steps")
    held_out = corpus.rows("held_out", f"library-heldout:{settings.seed}", settings.batch_size,
                           settings.seq_len).to(device)
    init = _losses(blocks, parent, held_out, corpus.doc_eos)
    opt = adamw(params, lr=settings.lr) if params else None

    def load(state):
        for b in trainable:
            for m, sd in zip(b.modules, state["blocks"][f"{b.layer}.{b.key}"]):
                m.load_state_dict(sd)

    loop = TrainLoop(stage, "bld", settings.steps, opt,
                     schedule=lambda step: bld_lr(step, lr=settings.lr, steps=settings.steps), log=log,
                     log_every=settings.log_every, checkpoint_every=settings.checkpoint_every, device=device,
                     load=load, save=lambda: {"blocks": {f"{b.layer}.{b.key}": [m.state_dict() for m in b.modules]
                                                         for b in trainable}})
    for step in loop:
        ids = corpus.rows("train", f"library-bld:{settings.seed}:{step}", settings.batch_size,
                          settings.seq_len).to(device)
        io = layer_io(parent, ids, corpus.doc_eos)  # one parent pass feeds every block
        losses = [_nmse(b.predict(io, parent.model.layers[b.layer]), io, b.layer) for b in trainable]
        total = torch.stack(losses).sum()
        optimizer_step(opt, total)
        mean = total.item() / len(losses)
        loop.end_step(step, loss=mean, postfix="mean_nmse", mean_nmse=mean)
    loop.close()
    print("library: step 3/3 held-out losses and save")
    final = _losses(blocks, parent, held_out, corpus.doc_eos)
    save_library(out, space, parent, blocks, layers, init, final)
    return BLDResult(blocks, len(trainable), init, final, loop.seconds)
