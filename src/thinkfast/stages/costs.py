"""Stage ``costs``: measured runtime and memory of every block variant on this device.

Paper: Puzzle (arXiv 2411.19146) section 4.4; REFERENCE.md section 1: costs are measured per block on
the target hardware at the deployment batch sizes and sequence lengths (prefill and decode), plus
memory = parameters + KV cache. Every sub-block variant of the library is built at the parent's
shapes and timed alone: median of ``repeats`` calls after ``warmup`` calls, in ``rounds`` passes over all
variants in turn, and the median over the passes (a disturbance of the machine lasting a few
milliseconds then moves one pass, not one variant's cost: a single pass once timed the parent's
attention 2.8x too slow on an idle 2-core CPU, and the search built a "2x" child that ran 1.1x):

- ``prefill_s[b]``: a forward over ``[b, prefill_len]`` tokens;
- ``decode_s[b]``: one new token per sequence with ``decode_context`` cached tokens, in a preallocated
  cache (``thinkfast.kvcache``, as a serving engine keeps it: no copy of the cache per step);
- ``params`` and ``param_bytes`` (at ``dtype``), ``kv_bytes_per_token`` (2 x KV heads x head_dim x bytes);
- ``fixed``: what every architecture pays (embedding, final norm, LM head), so speedups are of the
  whole model;
- ``parent_model``: the whole parent timed the same way (``prefill_s``, ``decode_s``). What its
  blocks plus ``fixed`` do not explain (the layer loop, rotary tables, cache bookkeeping: 10-15% of a
  nano decode step on a CPU) is charged to every architecture by
  :func:`thinkfast.puzzle.assemble.build_problem`, so predicted speedups are not inflated by it.

A variant's cost does not depend on its layer (all layers of a Llama share shapes), so each distinct
variant is measured once. Output ``RUN_DIR/costs/costs.json``::

    {"format": "thinkfast-puzzle-costs/1", "device": "cpu: AMD EPYC (2 threads)", "dtype": "float32",
     "batch_sizes": [1, 8], "prefill_len": 256, "decode_context": 256,
     "attention": {"gqa_kv2": {"params": .., "param_bytes": .., "kv_bytes_per_token": ..,
                               "prefill_s": {"1": .., "8": ..}, "decode_s": {"1": .., "8": ..}}, ...},
     "ffn": {"ffn_344": {...}, ...}, "fixed": {"params": .., "param_bytes": .., "prefill_s": {..}, "decode_s": {..}}}

``file`` reads such a file instead of measuring (costs from the deployment machine, or by hand);
the search records which device its costs came from.

``measure: models`` times whole models instead (``thinkfast.puzzle.probes``): per variant, the parent with
that variant in every layer but the first, against the parent with that part removed from the same layers;
the difference per layer is
the variant's cost, blocks are seen in sequence (warm or cold caches as in serving) and the parent is
explained in full. ``runtime: vllm`` times those models in vLLM (``thinkfast/puzzle/vllm_timer.py``, run
with ``vllm_python`` or this Python when it has vLLM): the costs of the engine that will serve the child.

Departures: with ``measure: blocks`` (the default) blocks are timed one at a time, not inside a full
model (so overlap between blocks is not seen; ``parent_model`` charges the difference to every
child); on a GPU the kernel launches of a tiny block dominate, as they would in deployment without
CUDA graphs. ``measure: models`` assumes a model's time is the sum of its blocks' plus a constant.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..artifacts import COSTS_FORMAT, check_costs, library_pairs, read_costs, read_library
from ..kvcache import StaticKVCache
from ..modeling import DeciLMForCausalLM
from ..puzzle.blocks import Variant, variant_module
from ..puzzle.parent import load_decilm
from ..puzzle.probes import costs_from_probes, probe_configs
from ..puzzle.timing import device_name, median_time, whole_model_times
from ..rundir import StageDir, atomic_write_json
from ..train.loop import setup_device
from . import Input, Inputs, check_device, model_path, resolve_device

MAKES = "costs"


def reads(cfg) -> dict:
    if cfg.file:
        return {"file": Input("costs", field="file")}
    return {"parent": Input("model"), "library": Input("library", field="library")}


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CostsConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    prefill_len: int = 256
    decode_context: int = 256
    dtype: str = "float32"  # the deployment dtype; param_bytes and kv bytes follow it
    warmup: int = 3
    repeats: int = 15
    rounds: int = 5  # passes over all variants; each time is the median over the passes
    # blocks: each variant timed alone; models: whole models with the variant in every layer (in sequence)
    measure: Literal["blocks", "models"] = "blocks"
    runtime: Literal["thinkfast", "vllm"] = "thinkfast"  # vllm: times whole models in vLLM (measure: models)
    vllm_python: str | None = None  # a Python with vLLM installed; default: this one
    file: str | None = None  # read costs from this file instead of measuring
    library: str | None = None
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose from {sorted(_DTYPES)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.prefill_len < 1 or self.decode_context < 0:
            raise ValueError("batch_sizes must be >= 1, prefill_len >= 1, decode_context >= 0")
        if self.repeats < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("repeats and rounds must be >= 1 and warmup >= 0")
        if self.runtime == "vllm" and self.measure != "models":
            raise ValueError("runtime=vllm times whole models: set measure: models")


Config = CostsConfig


def reuse_problems(cfg, marker: dict) -> list[str]:
    """Costs are only valid on the device they were measured on: a completed costs stage whose config
    matches is still redone when this run would measure on another device (``device`` itself is not
    part of a stage's identity, since for other stages it changes only speed)."""
    if cfg.file:
        return []
    before = (marker.get("metrics") or {}).get("device")
    now = device_name(resolve_device(cfg.device))
    return [f"costs were measured on {before!r}; this machine measures on {now!r}"] if before != now else []


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
def measure_variant(config, variant: Variant, cfg: CostsConfig, device: torch.device, rotary) -> dict:
    """Runtime and memory of one sub-block variant (see the module docstring)."""
    dtype = _DTYPES[cfg.dtype]
    module = variant_module(config, variant).to(device=device, dtype=dtype).eval()
    h = config.hidden_size
    params = sum(p.numel() for p in module.parameters())
    spec = module.attention_spec
    kv_heads = spec.num_kv_heads(config.num_attention_heads) if variant.part == "attention" else 0
    out = {"params": params, "param_bytes": params * dtype.itemsize,
           "kv_bytes_per_token": 2 * kv_heads * config.head_dim * dtype.itemsize, "prefill_s": {}, "decode_s": {}}
    for b in cfg.batch_sizes:
        x = torch.randn(b, cfg.prefill_len, h, device=device, dtype=dtype)
        pos = torch.arange(cfg.prefill_len, device=device)[None].expand(b, -1)
        cos, sin = (t.to(dtype) for t in rotary(x, pos))
        out["prefill_s"][str(b)] = median_time(lambda: module(x, cos, sin, None, None), device, cfg.warmup, cfg.repeats)
        x1 = torch.randn(b, 1, h, device=device, dtype=dtype)
        pos1 = torch.full((b, 1), cfg.decode_context, device=device)
        cos1, sin1 = (t.to(dtype) for t in rotary(x1, pos1))
        cache = None
        if kv_heads and cfg.decode_context:  # filled once; each timed step appends one token and is cropped
            kv = torch.randn(b, kv_heads, cfg.decode_context, config.head_dim, device=device, dtype=dtype)
            cache = StaticKVCache(cfg.decode_context + 1)
            cache.update(kv, kv, 0)

        def decode():
            if cache is not None:
                cache.truncate_to(cfg.decode_context)
            return module(x1, cos1, sin1, None, cache)

        out["decode_s"][str(b)] = median_time(decode, device, cfg.warmup, cfg.repeats)
    return out


def _fixed_sizes(parent, dtype: torch.dtype) -> dict:
    """Parameters of the embedding, final norm and LM head (the head once when tied)."""
    embed, head = parent.model.embed_tokens, parent.lm_head
    params = embed.weight.numel() + parent.model.norm.weight.numel()
    if head.weight.data_ptr() != embed.weight.data_ptr():
        params += head.weight.numel()
    return {"params": params, "param_bytes": params * dtype.itemsize}


@torch.no_grad()
def measure_fixed(parent, cfg: CostsConfig, device: torch.device) -> dict:
    """Embedding + final norm + LM head, paid by every architecture."""
    dtype = _DTYPES[cfg.dtype]
    out = {**_fixed_sizes(parent, dtype), "prefill_s": {}, "decode_s": {}}
    embed = parent.model.embed_tokens.to(dtype)
    norm, head = parent.model.norm.to(dtype), parent.lm_head.to(dtype)
    for b in cfg.batch_sizes:
        for key, t in (("prefill_s", cfg.prefill_len), ("decode_s", 1)):
            ids = torch.randint(0, parent.config.vocab_size, (b, t), device=device)
            out[key][str(b)] = median_time(lambda: head(norm(embed(ids))), device, cfg.warmup, cfg.repeats)
    parent.float()
    return out


def measure_whole(parent, cfg: CostsConfig, device: torch.device) -> dict:
    """The whole model (parent or probe): a prefill of ``prefill_len`` tokens and one decode step over
    ``decode_context`` cached tokens, per batch size (``thinkfast.puzzle.timing``)."""
    return whole_model_times(parent, cfg.batch_sizes, cfg.prefill_len, cfg.decode_context, _DTYPES[cfg.dtype], device,
                             cfg.warmup, cfg.repeats)


def _sizes(config, variant: Variant, dtype: torch.dtype) -> dict:
    module = variant_module(config, variant)
    params = sum(p.numel() for p in module.parameters())
    kv_heads = module.attention_spec.num_kv_heads(config.num_attention_heads) if variant.part == "attention" else 0
    return {"params": params, "param_bytes": params * dtype.itemsize,
            "kv_bytes_per_token": 2 * kv_heads * config.head_dim * dtype.itemsize}


def _vllm_python(cfg: CostsConfig) -> str:
    if cfg.vllm_python:
        if not Path(cfg.vllm_python).is_file():
            raise ValueError(f"costs.vllm_python={cfg.vllm_python}: no such file")
        return cfg.vllm_python
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("costs.runtime=vllm, but this Python has no vLLM: install it, or name a Python that has "
                         "it with costs.vllm_python (scripts/setup_vllm.sh makes .venv-vllm/bin/python)")
    return sys.executable


def _vllm_times(configs: dict, cfg: CostsConfig, device: torch.device, work: Path) -> dict:
    """Every probe timed in vLLM, in a process of the vLLM Python (median of ``rounds`` runs)."""
    folders = {}
    for key, config in configs.items():
        folder = work / "probes" / key
        config.architectures = ["DeciLMForCausalLM"]
        config.save_pretrained(folder)
        folders[key] = str(folder)
    spec = {"models": folders, "batch_sizes": list(cfg.batch_sizes), "prefill_len": cfg.prefill_len,
            "decode_context": max(1, cfg.decode_context), "warmup": cfg.warmup, "repeats": cfg.repeats,
            "dtype": cfg.dtype, "eager": device.type == "cpu"}
    (work / "probes" / "spec.json").write_text(json.dumps(spec, indent=1))
    python, script = _vllm_python(cfg), Path(__file__).resolve().parents[1] / "puzzle" / "vllm_timer.py"
    runs = []
    for r in range(cfg.rounds):
        out = work / "probes" / f"times-{r}.json"
        proc = subprocess.run([python, str(script), str(work / "probes" / "spec.json"), str(out)],
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"costs: vLLM ({python}) failed to time the probe models in {work / 'probes'}:\n{tail}")
        runs.append(json.loads(out.read_text()))
    return {key: median_of_passes([r[key] for r in runs]) for key in configs}


@torch.no_grad()
def _thinkfast_times(configs: dict, parent, cfg: CostsConfig, device: torch.device) -> dict:
    """Every probe timed as a whole model in thinkfast's runtime (random weights; ``rounds`` passes)."""
    from tqdm.auto import tqdm

    passes = []
    for _ in tqdm(range(cfg.rounds), desc="costs (models)", unit="pass"):
        one = {}
        for key, config in configs.items():
            if key == "parent":
                one[key] = measure_whole(parent, cfg, device)
                continue
            with torch.device(device):
                model = DeciLMForCausalLM(config).to(_DTYPES[cfg.dtype]).eval()
            one[key] = measure_whole(model, cfg, device)
            del model
        passes.append(one)
    return {key: median_of_passes([p[key] for p in passes]) for key in configs}


def measure_models(parent, lib: dict, variants: dict, cfg: CostsConfig, device: torch.device, work: Path) -> dict:
    """Costs of every variant from whole probe models (``thinkfast.puzzle.probes``), in thinkfast or vLLM."""
    specs = {part: {name: v.spec for name, v in named.items()} for part, named in variants.items()}
    configs, what = probe_configs(parent.config, specs, engine=lib.get("engine", "hf"))
    print(f"costs: timing {len(configs)} whole models ({cfg.runtime}): the parent and, per variant, the parent with "
          "it in every layer")
    if cfg.runtime == "vllm":
        times = _vllm_times(configs, cfg, device, work)
    else:
        times = _thinkfast_times(configs, parent, cfg, device)
    pairs = library_pairs(lib)
    derived = costs_from_probes(times, what, [pairs[i][0] for i in sorted(pairs)])
    dtype = _DTYPES[cfg.dtype]
    out = {part: {name: {**_sizes(parent.config, v, dtype), **derived[part][name]} for name, v in named.items()}
           for part, named in variants.items()}
    out["fixed"] = {**_fixed_sizes(parent, dtype), **derived["fixed"]}  # its times come from the probes
    out["parent_model"] = times["parent"]
    out["probes"] = {key: {"part": p, "variant": n, "layers": k, "model": probe, **times[probe]}
                     for key, (p, n, k, probe) in what.items()}
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
                         for i in pairs)
            out[f"{kind[:-2]}_explained@{b}"] = (blocks + data["fixed"][kind][b]) / whole
    return out


def run(cfg: CostsConfig, stage: StageDir, inputs: Inputs) -> dict:
    out_path = stage.path / "costs.json"
    if cfg.file:
        data = read_costs(inputs["file"])
        atomic_write_json(out_path, {**data, "source": str(cfg.file)})
        return {"device": data["device"], "source": str(cfg.file)}
    model_dir = model_path(inputs)
    device = setup_device(cfg.device)
    lib = read_library(inputs["library"])
    parent = load_decilm(model_dir, device)
    variants: dict[str, dict[str, Variant]] = {"attention": {}, "ffn": {}}
    for v in lib["variants"]:
        pairs = [(v["part"], v["name"], v["spec"])] if v["part"] != "block" else [
            ("attention", v["attention"], v["attention_spec"]), ("ffn", v["ffn"], v["ffn_spec"])]
        for part, name, spec in pairs:
            variants[part].setdefault(name, Variant(part, name, spec))
    total = sum(len(v) for v in variants.values())
    print(f"costs: timing {total} variants at batch sizes {cfg.batch_sizes} on {device_name(device)}, "
          f"{cfg.rounds} passes")
    rotary = parent.model.rotary_emb
    data = {"format": COSTS_FORMAT, "device": device_name(device), "dtype": cfg.dtype,
            "batch_sizes": list(cfg.batch_sizes), "prefill_len": cfg.prefill_len,
            "decode_context": cfg.decode_context, "measure": cfg.measure, "runtime": cfg.runtime}
    if cfg.measure == "models":
        if sorted(library_pairs(lib)) != list(range(parent.config.num_hidden_layers)):
            raise ValueError("costs.measure=models needs a library of every layer (merge the slices first)")
        data.update(measure_models(parent, lib, variants, cfg, device, stage.path))
        return _finish(data, lib, parent, out_path, stage, total)
    from tqdm.auto import tqdm

    passes: list[dict] = []
    for _ in tqdm(range(cfg.rounds), desc="costs", unit="pass"):
        one = {part: {name: measure_variant(parent.config, v, cfg, device, rotary) for name, v in named.items()}
               for part, named in variants.items()}
        one["fixed"] = measure_fixed(parent, cfg, device)
        one["parent_model"] = measure_whole(parent, cfg, device)
        passes.append(one)
    for part, named in variants.items():
        data[part] = {name: median_of_passes([p[part][name] for p in passes]) for name in named}
    data["fixed"] = median_of_passes([p["fixed"] for p in passes])
    data["parent_model"] = median_of_passes([p["parent_model"] for p in passes])
    return _finish(data, lib, parent, out_path, stage, total)


def _finish(data: dict, lib: dict, parent, out_path: Path, stage: StageDir, total: int) -> dict:
    check_costs(data, "costs (as measured)")
    atomic_write_json(out_path, data)
    metrics = {"device": data["device"], "variants": total,
               **explained_share(data, lib, parent.config.num_hidden_layers)}
    shares = ", ".join(f"{k} {v:.0%}" for k, v in metrics.items() if "explained" in k)
    how = "timed alone" if data["measure"] == "blocks" else "from whole models"
    print(f"costs: the parent's own blocks ({how}) plus the fixed cost explain: {shares} of its measured "
          "step (the rest is charged to every child)")
    log = stage.logger()
    log.log("done", **metrics)
    log.close()
    return metrics

