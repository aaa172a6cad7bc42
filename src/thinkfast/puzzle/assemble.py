"""From library, scores and costs to MIP matrices, and from a chosen block per layer to a checkpoint.

Paper: Puzzle (arXiv 2411.19146) section 4.4-4.5; REFERENCE.md section 1 (MIP and its targets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from ..modeling.convert import load_full_state
from ..modeling import DeciLMConfig, DeciLMForCausalLM
from ..modeling.configuration_decilm import block_config
from .parent import library_blocks

__all__ = ["STRUCTURES", "Problem", "assemble", "build_problem", "describe", "restrict"]


@dataclass
class Problem:
    """The search problem over whole-layer blocks (one attention + one FFN variant each).

    ``names[i][k]`` = ``(attention, ffn)`` of block ``k`` in layer ``i``; matrices are
    ``[layers, max_blocks]`` with ``inf`` where a layer has fewer blocks."""

    names: list[list[tuple[str, str]]]
    scores: np.ndarray
    costs: dict[str, np.ndarray]  # params, param_bytes, kv_bytes_per_token, prefill_s@b, decode_s@b
    fixed: dict[str, float]  # the same keys: what every architecture pays on top
    parent_choice: tuple[int, ...]
    overhead: dict[str, float] = field(default_factory=dict)  # runtime the blocks miss (part of fixed)
    scale: dict[str, float] = field(default_factory=dict)  # runtime keys: blocks in a model / blocks timed alone

    def totals(self, choice) -> dict[str, float]:
        rows = np.arange(len(choice))
        return {k: float(m[rows, list(choice)].sum() + self.fixed.get(k, 0.0)) for k, m in self.costs.items()}


STRUCTURES = ("any", "layers", "layers_ffn")


def _ffn_width(name: str) -> int | None:
    """The hidden width of an FFN variant named ``ffn_<width>`` (the library's names), else None."""
    return int(name[4:]) if name.startswith("ffn_") and name[4:].isdigit() else None


def restrict(problem: Problem, structure: str, min_ffn_fraction: float = 0.5) -> Problem:
    """The problem with only the blocks a child ``structure`` allows (the others' scores set to inf):
    ``any``: every block of the library; ``layers``: each layer removed whole (no-op attention and FFN) or
    kept with its parent FFN and its parent attention or a GQA variant with fewer KV heads (docs/LOG.md
    2026-12-03 session 6: in the nano world such children recover from distillation far better than the
    MIP's mix of partial blocks at the same speed); ``layers_ffn``: as ``layers``, a kept layer's FFN may also
    be a narrower one of at least ``min_ffn_fraction`` of the parent's width: finer steps of speed between
    children of k and k - 1 layers (issue 26)."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}: choose from {list(STRUCTURES)}")
    if structure == "any":
        return problem
    if not 0 < min_ffn_fraction <= 1:
        raise ValueError(f"min_ffn_fraction={min_ffn_fraction} must be in (0, 1]")
    scores = problem.scores.copy()
    for i, names in enumerate(problem.names):
        pa, pf = names[problem.parent_choice[i]]
        parent_width = _ffn_width(pf)
        for k, (a, f) in enumerate(names):
            width = _ffn_width(f)
            ffn_ok = f == pf or (structure == "layers_ffn" and parent_width is not None and width is not None
                                 and min_ffn_fraction * parent_width <= width <= parent_width)
            whole = (a, f) == ("no_op", "no_op") or (ffn_ok and (a == pa or a.startswith("gqa_")))
            if not whole:
                scores[i, k] = np.inf
    return dataclasses.replace(problem, scores=scores)


def _names(lib: dict, layer: int) -> list[tuple[str, str]]:
    entries = [v for v in lib["variants"] if v["layer"] == layer]
    if lib["mode"] == "coupled":
        return [(v["attention"], v["ffn"]) for v in entries]
    att = [v["name"] for v in entries if v["part"] == "attention"]
    ffn = [v["name"] for v in entries if v["part"] == "ffn"]
    return [(a, f) for a in att for f in ffn]


def build_problem(lib: dict, scores: dict, costs: dict, metric: str = "kl") -> Problem:
    """Score and cost matrices for every layer of the parent (all of them must be in the library)."""
    n_layers = lib["parent_config"]["num_hidden_layers"]
    missing = sorted(set(range(n_layers)) - set(lib["layers"]))
    if missing:
        raise ValueError(f"the library lacks layer(s) {missing}; train them or merge the slices first")
    if metric not in scores.get("metric_names", []) and not all(metric in b for b in scores["blocks"]):
        raise ValueError(f"search.metric={metric!r} is not in the scores file (has {scores.get('metric_names')})")
    by_name = {(b["layer"], b["attention"], b["ffn"]): b[metric] for b in scores["blocks"]}
    names = [_names(lib, i) for i in range(n_layers)]
    width = max(len(n) for n in names)
    score = np.full((n_layers, width), np.inf)
    cost_keys = ["params", "param_bytes", "kv_bytes_per_token"]
    for b in costs["batch_sizes"]:
        cost_keys += [f"prefill_s@{b}", f"decode_s@{b}"]
    mats = {k: np.full((n_layers, width), np.inf) for k in cost_keys}

    def value(entry: dict, key: str) -> float:
        if "@" in key:
            kind, b = key.split("@")
            return float(entry[kind][b])
        return float(entry.get(key, 0.0))

    for i, layer_names in enumerate(names):
        for k, (a, f) in enumerate(layer_names):
            if (i, a, f) not in by_name:
                raise ValueError(f"the scores file has no score for layer {i} block {a}+{f}")
            score[i, k] = by_name[(i, a, f)]
            for key in cost_keys:
                try:
                    mats[key][i, k] = value(costs["attention"][a], key) + value(costs["ffn"][f], key)
                    if "layer" in costs and "@" in key and (a, f) != ("no_op", "no_op"):  # fitted costs: a kept layer's own
                        mats[key][i, k] += value(costs["layer"], key)
                except KeyError as e:
                    raise ValueError(f"the costs file has no entry for {e} (layer {i} block {a}+{f})") from None
    fixed = {key: value(costs["fixed"], key) for key in cost_keys if key != "kv_bytes_per_token"}
    parent_choice = tuple(0 for _ in range(n_layers))  # the library lists the parent's own sub-blocks first
    # what the blocks timed alone do not explain of the whole parent's measured time. With the parent cut to its
    # first layer timed too, the two whole models split it: a model's time is F + s * (its blocks' sum), s and F
    # fitted through both points (most of it is per layer: a block in a model runs slower than alone, and the
    # layer loop's own work scales with the layers; docs/LOG.md session 12); else all of it is paid by every child
    overhead, scale = {}, {}
    if "parent_model" in costs and costs.get("measure") != "children":  # fitted to whole children: nothing missed
        rows = np.arange(n_layers)
        for key in cost_keys:
            if "@" not in key:
                continue
            blocks = float(mats[key][rows, list(parent_choice)].sum())
            whole = value(costs["parent_model"], key)
            first = float(mats[key][0, parent_choice[0]])
            if "first_layer_model" in costs and n_layers > 1 and blocks > first:
                s = (whole - value(costs["first_layer_model"], key)) / (blocks - first)
                if 0 < s and whole - s * blocks > 0:
                    scale[key] = s
                    mats[key] = mats[key] * s
                    overhead[key] = whole - s * blocks - fixed[key]
                    fixed[key] = whole - s * blocks
                    continue
            overhead[key] = max(0.0, whole - blocks - fixed[key])
            fixed[key] += overhead[key]
    return Problem(names, score, mats, fixed, parent_choice, overhead, scale)


def assemble(parent: DeciLMForCausalLM, lib: dict, tensors: dict[str, torch.Tensor],
             chosen: list[tuple[str, str]]) -> DeciLMForCausalLM:
    """A nemotron-nas model: the parent's embeddings, final norm and head, and layer ``i`` taken from
    the library block ``chosen[i] = (attention, ffn)``."""
    config = parent.config
    if len(chosen) != config.num_hidden_layers:
        raise ValueError(f"{len(chosen)} choices for {config.num_hidden_layers} layers")
    blocks, state = [], {}
    for i, (a, f) in enumerate(chosen):
        match = [b for b in library_blocks(lib, tensors, i) if (b.attention, b.ffn) == (a, f)]
        if not match:
            raise ValueError(f"layer {i}: the library has no block {a}+{f}")
        b = match[0]
        blocks.append(block_config(b.attention_spec, b.ffn_spec))
        state.update({f"model.layers.{i}.{k}": v for k, v in b.state.items()})
    child_config = DeciLMConfig(**{**config.to_dict(), "block_configs": blocks})
    child = DeciLMForCausalLM(child_config)
    for k, v in parent.state_dict().items():
        if not k.startswith("model.layers."):
            state[k] = v
    load_full_state(child, state)
    child.generation_config = parent.generation_config
    return child.eval()


def describe(config: DeciLMConfig) -> list[str]:
    """The architecture one block per line: ``block 7: attention no_op | ffn 384``."""
    lines = []
    for i, (a, f) in enumerate(config.block_specs()):
        att = f"gqa kv_heads={a.num_kv_heads(config.num_attention_heads)}" if a.kind == "gqa" else a.kind
        ffn = str(f.intermediate_size) if f.kind == "swiglu" else f.kind
        lines.append(f"block {i}: attention {att} | ffn {ffn}")
    return lines
