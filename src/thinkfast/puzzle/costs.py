"""Measured runtime and memory of block variants: each alone, or from whole probe models.

Puzzle (arXiv 2411.19146) section 4.4: costs are measured per block on the target hardware at the
deployment batch sizes and sequence lengths (prefill and decode), plus memory = parameters + KV cache.
What is measured and how the ``costs`` stage writes it is described there
(:mod:`thinkfast.stages.costs`); here are the measurements, with their settings in :class:`TimingSettings`:

- :func:`measure_blocks`: every variant built at the parent's shapes and timed alone
  (:func:`measure_variant`), the fixed part (:func:`measure_fixed`) and the whole parent
  (:func:`measure_whole`), in ``rounds`` passes over all of them, each time the median over the passes
  (:func:`median_of_passes`);
- :func:`measure_models`: whole probe models (:mod:`thinkfast.puzzle.probes`), timed in thinkfast or in
  vLLM (``vllm_timer.py`` run by another Python), the costs per variant derived from their differences;
- :func:`measure_children`: random children of the library timed whole against the parent (back-to-back
  pairs, as the search verifies its child), a cost per variant, per kept layer and per model fitted to them
  (:func:`fit_child_costs`);
- :func:`explained_share`: how much of the parent's measured time its own blocks explain.

Shapes: prefill ``[b, prefill_len]`` tokens; decode one token per sequence over ``decode_context`` cached
tokens (a preallocated :class:`thinkfast.modeling.kvcache.StaticKVCache`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..artifacts import library_pairs
from ..modeling.engine_rules import library_engine
from ..modeling.kvcache import StaticKVCache
from ..modeling import DeciLMForCausalLM
from ..runtime import DTYPES, torch_dtype
from .blocks import Variant, variant_module
from .probes import costs_from_probes, probe_configs
from .timing import median_time, whole_model_times

__all__ = ["TimingSettings", "child_config", "explained_share", "first_layer_model", "first_layer_times",
           "fit_child_costs", "library_variants", "measure_blocks", "measure_children", "measure_fixed",
           "measure_models", "measure_variant", "measure_whole", "median_of_passes", "random_children"]


@dataclass(frozen=True)
class TimingSettings:
    """How costs are timed: at each of ``batch_sizes``, a prefill of ``prefill_len`` tokens and one decode
    step over ``decode_context`` cached tokens, at ``dtype`` (a name of :data:`thinkfast.runtime.DTYPES`);
    each time the median of ``repeats`` calls after ``warmup`` calls, and the median over ``rounds`` passes.
    ``runtime``: whole models are timed in thinkfast or in vLLM (``vllm_python``: a Python that has it)."""

    batch_sizes: tuple[int, ...] = (1, 16)
    prefill_len: int = 256
    decode_context: int = 256
    dtype: str = "float32"
    warmup: int = 3
    repeats: int = 15
    rounds: int = 5
    runtime: Literal["thinkfast", "vllm"] = "thinkfast"
    vllm_python: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose from {sorted(DTYPES)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.prefill_len < 1 or self.decode_context < 0:
            raise ValueError("batch_sizes must be >= 1, prefill_len >= 1, decode_context >= 0")
        if self.repeats < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("repeats and rounds must be >= 1 and warmup >= 0")


def library_variants(lib: dict) -> dict[str, dict[str, Variant]]:
    """Every distinct sub-block variant of a library, by part and name (a coupled block gives its halves):
    a variant's cost does not depend on its layer (all layers of a Llama share shapes)."""
    variants: dict[str, dict[str, Variant]] = {"attention": {}, "ffn": {}}
    for v in lib["variants"]:
        pairs = [(v["part"], v["name"], v["spec"])] if v["part"] != "block" else [
            ("attention", v["attention"], v["attention_spec"]), ("ffn", v["ffn"], v["ffn_spec"])]
        for part, name, spec in pairs:
            variants[part].setdefault(name, Variant(part, name, spec))
    return variants


def measure_blocks(parent, variants: dict[str, dict[str, Variant]], timing: TimingSettings,
                   device: torch.device) -> dict:
    """Every variant timed alone, the fixed part and the whole parent, in ``rounds`` passes over all of them
    in turn: ``{"attention": {name: entry}, "ffn": {...}, "fixed": entry, "parent_model": times,
    "first_layer_model": times}``, each time
    the median over the passes (a disturbance of the machine lasting a few milliseconds then moves one pass,
    not one variant's cost)."""
    from tqdm.auto import tqdm

    rotary = parent.model.rotary_emb
    passes: list[dict] = []
    for _ in tqdm(range(timing.rounds), desc="costs", unit="pass"):
        one = {part: {name: measure_variant(parent.config, v, timing, device, rotary) for name, v in named.items()}
               for part, named in variants.items()}
        one["fixed"] = measure_fixed(parent, timing, device)
        one["parent_model"] = measure_whole(parent, timing, device)
        if parent.config.num_hidden_layers > 1:
            one["first_layer_model"] = first_layer_times(parent, one["parent_model"], timing, device)
        passes.append(one)
    out = {part: {name: median_of_passes([p[part][name] for p in passes]) for name in named}
           for part, named in variants.items()}
    for key in ("fixed", "parent_model", "first_layer_model"):
        if key in passes[0]:
            out[key] = median_of_passes([p[key] for p in passes])
    return out


def first_layer_times(parent, parent_times: dict, timing: TimingSettings, device: torch.device) -> dict:
    """The first-layer model's times, as the parent's over the speedup of back-to-back pairs of calls
    (:func:`thinkfast.puzzle.timing.paired_speedup`, how the search verifies a child): timed apart, a model of one
    layer keeps its cache warm between its own calls and came out 7-9x faster than the 8-layer nano parent where
    pairs, and the children measured so, said 4.9x (docs/LOG.md session 12)."""
    from .timing import paired_speedup

    model = first_layer_model(parent)
    return {kind: {str(b): parent_times[kind][str(b)] / paired_speedup(
        parent, model, kind, b, timing.prefill_len, timing.decode_context, torch_dtype(timing.dtype), device,
        pairs=16, budget_s=5.0) for b in timing.batch_sizes} for kind in ("prefill_s", "decode_s")}


def first_layer_model(parent):
    """The parent cut to its first layer (same embedding, norm and head; random weights, which do not change a
    CPU's or GPU's timing): with the whole parent, the two points that split a model's time into what every
    model pays and what grows with its blocks (:func:`thinkfast.puzzle.assemble.build_problem`)."""
    from ..modeling.configuration_decilm import block_config

    conf = parent.config.to_dict()
    first = conf["block_configs"][0]
    conf.update(num_hidden_layers=1, block_configs=[block_config(first["attention"], first["ffn"])])
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(0)
        return DeciLMForCausalLM(type(parent.config)(**conf)).eval()


def median_of_passes(passes: list[dict]) -> dict:
    """One cost entry from several passes: times are the median over the passes, the rest (sizes) is
    the first pass's.

    >>> median_of_passes([{"params": 3, "decode_s": {"1": 1.0}}, {"params": 3, "decode_s": {"1": 9.0}},
    ...                   {"params": 3, "decode_s": {"1": 2.0}}])
    {'params': 3, 'decode_s': {'1': 2.0}}
    """
    out = dict(passes[0])
    for key in ("prefill_s", "decode_s"):
        if key in out:
            out[key] = {b: statistics.median(p[key][b] for p in passes) for b in out[key]}
    return out


@torch.no_grad()
def measure_variant(config, variant: Variant, timing: TimingSettings, device: torch.device, rotary) -> dict:
    """Runtime and memory of one sub-block variant (see the module docstring)."""
    dtype = torch_dtype(timing.dtype)
    module = variant_module(config, variant).to(device=device, dtype=dtype).eval()
    h = config.hidden_size
    params = sum(p.numel() for p in module.parameters())
    spec = module.attention_spec
    kv_heads = spec.num_kv_heads(config.num_attention_heads) if variant.part == "attention" else 0
    out = {"params": params, "param_bytes": params * dtype.itemsize,
           "kv_bytes_per_token": 2 * kv_heads * config.head_dim * dtype.itemsize, "prefill_s": {}, "decode_s": {}}
    for b in timing.batch_sizes:
        x = torch.randn(b, timing.prefill_len, h, device=device, dtype=dtype)
        pos = torch.arange(timing.prefill_len, device=device)[None].expand(b, -1)
        cos, sin = (t.to(dtype) for t in rotary(x, pos))
        out["prefill_s"][str(b)] = median_time(lambda: module(x, cos, sin, None, None), device, timing.warmup,
                                               timing.repeats)
        x1 = torch.randn(b, 1, h, device=device, dtype=dtype)
        pos1 = torch.full((b, 1), timing.decode_context, device=device)
        cos1, sin1 = (t.to(dtype) for t in rotary(x1, pos1))
        cache = None
        if kv_heads and timing.decode_context:  # filled once; each timed step appends one token and is cropped
            kv = torch.randn(b, kv_heads, timing.decode_context, config.head_dim, device=device, dtype=dtype)
            cache = StaticKVCache(timing.decode_context + 1)
            cache.update(kv, kv, 0)

        def decode():
            if cache is not None:
                cache.truncate_to(timing.decode_context)
            return module(x1, cos1, sin1, None, cache)

        out["decode_s"][str(b)] = median_time(decode, device, timing.warmup, timing.repeats)
    return out


def _fixed_sizes(parent, dtype: torch.dtype) -> dict:
    """Parameters of the embedding, final norm and LM head (the head once when tied)."""
    embed, head = parent.model.embed_tokens, parent.lm_head
    params = embed.weight.numel() + parent.model.norm.weight.numel()
    if head.weight.data_ptr() != embed.weight.data_ptr():
        params += head.weight.numel()
    return {"params": params, "param_bytes": params * dtype.itemsize}


@torch.no_grad()
def measure_fixed(parent, timing: TimingSettings, device: torch.device) -> dict:
    """Embedding + final norm + LM head, paid by every architecture."""
    dtype = torch_dtype(timing.dtype)
    out = {**_fixed_sizes(parent, dtype), "prefill_s": {}, "decode_s": {}}
    embed = parent.model.embed_tokens.to(dtype)
    norm, head = parent.model.norm.to(dtype), parent.lm_head.to(dtype)
    for b in timing.batch_sizes:
        for key, t in (("prefill_s", timing.prefill_len), ("decode_s", 1)):
            ids = torch.randint(0, parent.config.vocab_size, (b, t), device=device)
            out[key][str(b)] = median_time(lambda: head(norm(embed(ids))), device, timing.warmup, timing.repeats)
    parent.float()
    return out


def measure_whole(parent, timing: TimingSettings, device: torch.device) -> dict:
    """The whole model (parent or probe): a prefill of ``prefill_len`` tokens and one decode step over
    ``decode_context`` cached tokens, per batch size (``thinkfast.puzzle.timing``)."""
    return whole_model_times(parent, timing.batch_sizes, timing.prefill_len, timing.decode_context,
                             torch_dtype(timing.dtype), device, timing.warmup, timing.repeats)


def _sizes(config, variant: Variant, dtype: torch.dtype) -> dict:
    module = variant_module(config, variant)
    params = sum(p.numel() for p in module.parameters())
    kv_heads = module.attention_spec.num_kv_heads(config.num_attention_heads) if variant.part == "attention" else 0
    return {"params": params, "param_bytes": params * dtype.itemsize,
            "kv_bytes_per_token": 2 * kv_heads * config.head_dim * dtype.itemsize}


def _vllm_python(timing: TimingSettings) -> str:
    if timing.vllm_python:
        if not Path(timing.vllm_python).is_file():
            raise ValueError(f"costs.vllm_python={timing.vllm_python}: no such file")
        return timing.vllm_python
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("costs.runtime=vllm, but this Python has no vLLM: install it, or name a Python that has "
                         "it with costs.vllm_python (scripts/setup_vllm.sh makes .venv-vllm/bin/python)")
    return sys.executable


def _vllm_times(configs: dict, timing: TimingSettings, device: torch.device, work: Path) -> dict:
    """Every probe timed in vLLM, in a process of the vLLM Python (median of ``rounds`` runs)."""
    folders = {}
    for key, config in configs.items():
        folder = work / "probes" / key
        config.architectures = ["DeciLMForCausalLM"]
        config.save_pretrained(folder)
        folders[key] = str(folder)
    spec = {"models": folders, "batch_sizes": list(timing.batch_sizes), "prefill_len": timing.prefill_len,
            "decode_context": max(1, timing.decode_context), "warmup": timing.warmup, "repeats": timing.repeats,
            "dtype": timing.dtype, "eager": device.type == "cpu"}
    (work / "probes" / "spec.json").write_text(json.dumps(spec, indent=1))
    python, script = _vllm_python(timing), Path(__file__).resolve().parent / "vllm_timer.py"
    runs = []
    for r in range(timing.rounds):
        out = work / "probes" / f"times-{r}.json"
        proc = subprocess.run([python, str(script), str(work / "probes" / "spec.json"), str(out)],
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"costs: vLLM ({python}) failed to time the probe models in {work / 'probes'}:\n{tail}")
        runs.append(json.loads(out.read_text()))
    return {key: median_of_passes([r[key] for r in runs]) for key in configs}


@torch.no_grad()
def _thinkfast_times(configs: dict, parent, timing: TimingSettings, device: torch.device) -> dict:
    """Every probe timed as a whole model in thinkfast's runtime (random weights; ``rounds`` passes)."""
    from tqdm.auto import tqdm

    passes = []
    for _ in tqdm(range(timing.rounds), desc="costs (models)", unit="pass"):
        one = {}
        for key, config in configs.items():
            if key == "parent":
                one[key] = measure_whole(parent, timing, device)
                continue
            with torch.device(device):
                model = DeciLMForCausalLM(config).to(torch_dtype(timing.dtype)).eval()
            one[key] = measure_whole(model, timing, device)
            del model
        passes.append(one)
    return {key: median_of_passes([p[key] for p in passes]) for key in configs}


def measure_models(parent, lib: dict, variants: dict, timing: TimingSettings, device: torch.device,
                   work: Path) -> dict:
    """Costs of every variant from whole probe models (``thinkfast.puzzle.probes``), in thinkfast or vLLM."""
    specs = {part: {name: v.spec for name, v in named.items()} for part, named in variants.items()}
    configs, what = probe_configs(parent.config, specs, engine=library_engine(lib))
    print(f"costs: timing {len(configs)} whole models ({timing.runtime}): the parent and, per variant, the parent "
          "with it in every layer")
    if timing.runtime == "vllm":
        times = _vllm_times(configs, timing, device, work)
    else:
        times = _thinkfast_times(configs, parent, timing, device)
    pairs = library_pairs(lib)
    derived = costs_from_probes(times, what, [pairs[i][0] for i in sorted(pairs)])
    dtype = torch_dtype(timing.dtype)
    out = {part: {name: {**_sizes(parent.config, v, dtype), **derived[part][name]} for name, v in named.items()}
           for part, named in variants.items()}
    out["fixed"] = {**_fixed_sizes(parent, dtype), **derived["fixed"]}  # its times come from the probes
    out["parent_model"] = times["parent"]
    out["probes"] = {key: {"part": p, "variant": n, "layers": k, "model": probe, **times[probe]}
                     for key, (p, n, k, probe) in what.items()}
    return out


def child_config(parent_config, lib: dict, blocks: list[tuple[str, str]]):
    """The nemotron-nas config of the child whose layer ``i`` is the library block ``blocks[i] = (attention,
    ffn)`` (weights do not change a CPU's or GPU's timing: a model built from it is random-initialised)."""
    from ..modeling import DeciLMConfig
    from ..modeling.configuration_decilm import block_config

    specs: dict = {}
    for v in lib["variants"]:
        halves = [(v["part"], v["name"], v["spec"])] if v["part"] != "block" else [
            ("attention", v["attention"], v["attention_spec"]), ("ffn", v["ffn"], v["ffn_spec"])]
        for part, name, spec in halves:
            specs.setdefault((v["layer"], part, name), spec)
    try:
        out = [block_config(specs[(i, "attention", a)], specs[(i, "ffn", f)]) for i, (a, f) in enumerate(blocks)]
    except KeyError as e:
        raise ValueError(f"the library has no variant {e.args[0]} (layer, part, name)") from None
    return DeciLMConfig(**{**parent_config.to_dict(), "block_configs": out})


REMOVED = ("no_op", "no_op")


def random_children(pairs: dict[int, list[tuple[str, str]]], n: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    """``n`` distinct children of a library's blocks (``pairs``: :func:`thinkfast.artifacts.library_pairs`): the
    number of kept layers drawn uniformly from 1 to all, which layers at random, each kept layer one of its blocks
    at random (a layer is removed when its library offers no-op attention and FFN). Fewer when the library has
    fewer distinct children; more when a variant was drawn in none (one child more with it, the rest removed).

    >>> pairs = {0: [("gqa_kv2", "ffn_8"), ("no_op", "ffn_8"), ("no_op", "no_op")], 1: [("gqa_kv2", "ffn_8"),
    ...          ("gqa_kv1", "ffn_4"), ("no_op", "no_op")]}
    >>> kids = random_children(pairs, 3, seed=1)
    >>> len(kids) >= 3 and all(len(c) == 2 for c in kids) and {b for c in kids for b in c} >= {("gqa_kv1", "ffn_4")}
    True
    >>> kids = random_children({0: [("gqa_kv2", "linear"), ("gqa_kv2", "ffn_8"), ("linear", "ffn_8"),
    ...                             ("no_op", "no_op")]}, 0)
    >>> sorted({c[0][0] for c in kids}), sorted({c[0][1] for c in kids})  # an FFN "linear" is not attention's
    (['gqa_kv2', 'linear'], ['ffn_8', 'linear'])
    """
    import random

    rng = random.Random(seed)
    layers = sorted(pairs)
    out, seen = [], set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        kept = set(rng.sample(layers, rng.randint(1, len(layers))))
        child = []
        for i in layers:
            live = [b for b in pairs[i] if b != REMOVED]
            child.append(rng.choice(live) if i in kept or REMOVED not in pairs[i] else REMOVED)
        if tuple(child) not in seen:
            seen.add(tuple(child))
            out.append(child)
    for part in (0, 1):  # every variant in some child, or its cost could not be fitted
        drawn = {b[part] for c in out for b in c}
        for i in layers:
            for block in pairs[i]:
                if block[part] not in drawn and block != REMOVED:
                    child = [REMOVED if REMOVED in pairs[j] else pairs[j][0] for j in layers]
                    child[layers.index(i)] = block
                    out.append(child)
                    drawn.add(block[part])
    return out


def _features(blocks: list[tuple[str, str]], columns: list[tuple[str, str]]) -> list[float]:
    """A child's counts: of each attention and FFN variant (no-ops are free), of kept layers, and 1 (the model)."""
    x = [0.0] * len(columns)
    index = {c: k for k, c in enumerate(columns)}
    for a, f in blocks:
        if a != "no_op":
            x[index[("attention", a)]] += 1
        if f != "no_op":
            x[index[("ffn", f)]] += 1
        if (a, f) != REMOVED:
            x[index[("layer", "")]] += 1
    x[index[("fixed", "")]] = 1.0
    return x


def fit_child_costs(children: list[list[tuple[str, str]]], times: list[float]) -> dict:
    """A cost per attention and FFN variant (no-op: 0), per kept layer and per model, all >= 0, fitted to whole
    children's ``times`` by least squares on the relative error (SciPy's bounded least squares): a child's
    predicted time is ``fixed + layer x (its kept layers) + the sum of its variants' costs``. Returns ``{"attention":
    {name: c}, "ffn": {name: c}, "layer": c, "fixed": c, "residuals": [predicted / measured - 1 per child]}``.

    >>> kids = [[("a", "f"), ("a", "f")], [("a", "f"), ("no_op", "no_op")], [("a", "no_op"), ("no_op", "f")],
    ...         [("no_op", "f"), ("no_op", "no_op")], [("a", "no_op"), ("no_op", "no_op")]]
    >>> fit = fit_child_costs(kids, [2 * (1 + 3 + 2) + 5, 1 + 3 + 2 + 5, 2 + 3 + 2 + 5, 1 + 2 + 5, 1 + 3 + 5])
    >>> {k: round(v, 6) for k, v in {**fit["attention"], **fit["ffn"], "layer": fit["layer"], "fixed": fit["fixed"]}.items()}
    {'a': 3.0, 'f': 2.0, 'layer': 1.0, 'fixed': 5.0}
    """
    import numpy as np
    from scipy.optimize import lsq_linear

    att = sorted({a for c in children for a, _ in c} - {"no_op"})
    ffn = sorted({f for c in children for _, f in c} - {"no_op"})
    columns = [("attention", a) for a in att] + [("ffn", f) for f in ffn] + [("layer", ""), ("fixed", "")]
    x = np.array([_features(c, columns) for c in children])
    y = np.asarray(times, dtype=float)
    if len(y) != len(x) or not np.all(y > 0):
        raise ValueError("fit_child_costs needs one time > 0 per child")
    coef = lsq_linear(x / y[:, None], np.ones_like(y), bounds=(0, np.inf), method="bvls").x
    c = dict(zip(columns, (float(v) for v in coef)))
    return {"attention": {a: c[("attention", a)] for a in att}, "ffn": {f: c[("ffn", f)] for f in ffn},
            "layer": c[("layer", "")], "fixed": c[("fixed", "")],
            "residuals": [float(v) for v in x @ coef / y - 1]}


@torch.no_grad()
def measure_children(parent, lib: dict, variants: dict[str, dict[str, Variant]], timing: TimingSettings,
                     device: torch.device, children: int, seed: int = 0) -> dict:
    """Costs fitted to whole children (:func:`fit_child_costs`): ``children`` random children of the library
    (:func:`random_children`) and the parent itself, each timed against the parent in back-to-back pairs
    (:func:`thinkfast.puzzle.timing.paired_speedup`: what the search's verification measures; ``repeats`` pairs,
    or at least 3 and half a second) at every batch size, prefill and decode; times are the parent's whole-model
    time over those speedups. A cost then holds a block as it runs inside a model, beside its neighbours (caches,
    the layer loop's work): on a 2-core CPU attention with fewer KV heads cost more than the parent's timed alone
    and less inside models (docs/LOG.md session 14)."""
    from tqdm.auto import tqdm

    from .timing import paired_speedup

    dtype = torch_dtype(timing.dtype)
    pairs = library_pairs(lib)
    if sorted(pairs) != list(range(parent.config.num_hidden_layers)):
        raise ValueError("costs.measure=children needs a library of every layer (merge the slices first)")
    parent_blocks = [pairs[i][0] for i in sorted(pairs)]
    kids = [c for c in random_children(pairs, children, seed) if c != parent_blocks]
    whole = median_of_passes([measure_whole(parent, timing, device) for _ in range(timing.rounds)])
    keys = [(kind, str(b)) for b in timing.batch_sizes for kind in ("prefill_s", "decode_s")]
    speedups: list[dict] = []
    for blocks in tqdm(kids, desc="costs (children)", unit="child"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            child = DeciLMForCausalLM(child_config(parent.config, lib, blocks)).to(device).eval()
        speedups.append({f"{kind}@{b}": paired_speedup(
            parent, child, kind, int(b), timing.prefill_len, timing.decode_context, dtype, device,
            warmup=min(timing.warmup, 1), pairs=timing.repeats, budget_s=0.5, min_pairs=3) for kind, b in keys})
        del child
    rows = [parent_blocks] + kids
    out: dict = {part: {name: {**_sizes(parent.config, v, dtype), "prefill_s": {}, "decode_s": {}}
                        for name, v in named.items()} for part, named in variants.items()}
    out["fixed"] = {**_fixed_sizes(parent, dtype), "prefill_s": {}, "decode_s": {}}
    out["layer"] = {"prefill_s": {}, "decode_s": {}}
    fit_report = {}
    for kind, b in keys:
        key = f"{kind}@{b}"
        t = whole[kind][b]
        fit = fit_child_costs(rows, [t] + [t / s[key] for s in speedups])
        for part in ("attention", "ffn"):
            for name in out[part]:
                out[part][name][kind][b] = fit[part].get(name, 0.0)  # no-op (and a variant no child drew): 0
        out["fixed"][kind][b] = max(fit["fixed"], 1e-9 * t)
        out["layer"][kind][b] = fit["layer"]
        res = [abs(r) for r in fit["residuals"]]
        fit_report[key] = {"median_abs_residual": statistics.median(res), "max_abs_residual": max(res)}
    out["parent_model"] = whole
    out["children"] = [{"blocks": [list(b) for b in blocks], "speedup": s} for blocks, s in zip(kids, speedups)]
    out["fit"] = fit_report
    return out


def explained_share(data: dict, lib: dict, n_layers: int) -> dict[str, float]:
    """Share of the whole parent's measured time that its own blocks (each timed alone) plus the fixed
    embedding / head cost explain, per runtime and batch size (``decode_explained@16``: 0.69 means 31%
    of a decode step is loop, cache and cache-coldness overhead the search charges to every child).
    Empty when the library covers only some layers."""
    pairs = library_pairs(lib)
    if sorted(pairs) != list(range(n_layers)) or "parent_model" not in data:
        return {}
    out = {}
    for kind in ("prefill_s", "decode_s"):
        for b, whole in data["parent_model"][kind].items():
            blocks = sum(data["attention"][pairs[i][0][0]][kind][b] + data["ffn"][pairs[i][0][1]][kind][b]
                         + (data["layer"][kind][b] if "layer" in data and pairs[i][0] != REMOVED else 0.0)
                         for i in pairs)
            out[f"{kind[:-2]}_explained@{b}"] = (blocks + data["fixed"][kind][b]) / whole
    return out
