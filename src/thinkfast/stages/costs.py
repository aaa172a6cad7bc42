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
  cache (``thinkfast.modeling.kvcache``, as a serving engine keeps it: no copy of the cache per step);
- ``params`` and ``param_bytes`` (at ``dtype``), ``kv_bytes_per_token`` (2 x KV heads x head_dim x bytes);
- ``fixed``: what every architecture pays (embedding, final norm, LM head), so speedups are of the
  whole model;
- ``parent_model``: the whole parent timed the same way (``prefill_s``, ``decode_s``), and
  ``first_layer_model``: the parent cut to its first layer, its times the parent's over their speedup in
  back-to-back pairs (as the search verifies a child). Blocks timed alone explain 72-77% of a nano decode step
  on a CPU; :func:`thinkfast.puzzle.assemble.build_problem` fits a model's time as F + s x (its blocks' sum)
  through these two whole models (most of the rest grows with the layers), or, without the first-layer model,
  charges the rest to every architecture.

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

``measure: children`` times whole children instead (:func:`thinkfast.puzzle.costs.measure_children`): ``children``
random children of the library (1 to every layer kept, each kept layer one of its blocks) against the parent in
back-to-back pairs, as the search verifies its child, and fits a cost per variant, per kept layer and per model
(SciPy's bounded least squares on the relative error; ``layer`` in ``costs.json``, the fit's residuals and every
child's speedups beside it). A block is then costed as it runs inside a model: on a 2-core CPU, attention with fewer
KV heads cost more than the parent's timed alone and less inside models, and blocks timed alone predicted unpicked
children with a median error of 12% (worst 25%) where the fitted costs gave 1-2% (worst 5%; docs/LOG.md session 14).
About a second and a half per child.

Departures: with ``measure: blocks`` (the default) blocks are timed one at a time, not inside a full
model (so overlap between blocks is not seen; the two whole models above account for the difference); on a
GPU the kernel launches of a tiny block dominate, as they would in deployment without CUDA graphs. ``measure: models`` assumes a model's time is the sum of its blocks' plus a constant.

The measurements are library code (:mod:`thinkfast.puzzle.costs`, settings in its ``TimingSettings``);
this stage picks them, writes ``costs.json`` and says how much of the parent its blocks explain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..artifacts import COSTS_FORMAT, OUTPUTS, check_costs, library_pairs, read_costs, read_library
from ..puzzle.costs import (TimingSettings, explained_share, library_variants, measure_blocks, measure_children,
                             measure_models)
from ..artifacts import load_decilm
from ..puzzle.timing import device_name
from ..rundir import StageDir, atomic_write_json
from ..runtime import setup_device
from . import Input, Inputs, check_device, model_path, resolve_device

MAKES = "costs"


def reads(cfg) -> dict:
    if cfg.file:
        return {"file": Input("costs", field="file")}
    return {"parent": Input("model"), "library": Input("library", field="library")}


@dataclass
class CostsConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    prefill_len: int = 256
    decode_context: int = 256
    dtype: str = "float32"  # the deployment dtype; param_bytes and kv bytes follow it
    warmup: int = 3
    repeats: int = 15
    rounds: int = 5  # passes over all variants; each time is the median over the passes
    # blocks: each variant timed alone; models: whole models with the variant in every layer (in sequence);
    # children: random whole children timed against the parent, a cost per variant and per layer fitted to them
    measure: Literal["blocks", "models", "children"] = "blocks"
    children: int = 48  # measure: children: how many (each timed in `repeats` pairs with the parent)
    seed: int = 0  # measure: children: which ones
    runtime: Literal["thinkfast", "vllm"] = "thinkfast"  # vllm: times whole models in vLLM (measure: models)
    vllm_python: str | None = None  # a Python with vLLM installed; default: this one
    file: str | None = None  # read costs from this file instead of measuring
    library: str | None = None
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        self.timing()  # validates the timing settings
        if self.runtime == "vllm" and self.measure != "models":
            raise ValueError("runtime=vllm times whole models: set measure: models")
        if self.children < 1:
            raise ValueError(f"children={self.children} must be >= 1")

    def timing(self) -> TimingSettings:
        """How this section times, as :mod:`thinkfast.puzzle.costs` takes it."""
        return TimingSettings(batch_sizes=tuple(self.batch_sizes), prefill_len=self.prefill_len,
                              decode_context=self.decode_context, dtype=self.dtype, warmup=self.warmup,
                              repeats=self.repeats, rounds=self.rounds, runtime=self.runtime,
                              vllm_python=self.vllm_python)


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


def run(cfg: CostsConfig, stage: StageDir, inputs: Inputs) -> dict:
    out_path = stage.path / OUTPUTS["costs"]
    if cfg.file:
        data = read_costs(inputs["file"])
        atomic_write_json(out_path, {**data, "source": str(cfg.file)})
        return {"device": data["device"], "source": str(cfg.file)}
    model_dir = model_path(inputs)
    device = setup_device(cfg.device)
    lib = read_library(inputs["library"])
    parent = load_decilm(model_dir, device)
    variants = library_variants(lib)
    timing = cfg.timing()
    total = sum(len(v) for v in variants.values())
    print(f"costs: timing {total} variants at batch sizes {cfg.batch_sizes} on {device_name(device)}, "
          f"{cfg.rounds} passes")
    data = {"format": COSTS_FORMAT, "device": device_name(device), "dtype": cfg.dtype,
            "batch_sizes": list(cfg.batch_sizes), "prefill_len": cfg.prefill_len,
            "decode_context": cfg.decode_context, "measure": cfg.measure, "runtime": cfg.runtime}
    if cfg.measure == "models":
        if sorted(library_pairs(lib)) != list(range(parent.config.num_hidden_layers)):
            raise ValueError("costs.measure=models needs a library of every layer (merge the slices first)")
        data.update(measure_models(parent, lib, variants, timing, device, stage.path))
        return _finish(data, lib, parent, out_path, stage, total)
    if cfg.measure == "children":
        data.update(measure_children(parent, lib, variants, timing, device, cfg.children, cfg.seed))
        return _finish(data, lib, parent, out_path, stage, total)
    data.update(measure_blocks(parent, variants, timing, device))
    return _finish(data, lib, parent, out_path, stage, total)


def _finish(data: dict, lib: dict, parent, out_path: Path, stage: StageDir, total: int) -> dict:
    check_costs(data, "costs (as measured)")
    atomic_write_json(out_path, data)
    metrics = {"device": data["device"], "variants": total,
               **explained_share(data, lib, parent.config.num_hidden_layers)}
    shares = ", ".join(f"{k} {v:.0%}" for k, v in metrics.items() if "explained" in k)
    how = {"blocks": "timed alone", "models": "from whole models", "children": "fitted to whole children"}[data["measure"]]
    rest = ("the search fits the rest through the parent and its first layer, timed whole" if "first_layer_model" in data
            else "the rest is charged to every child")
    if "fit" in data:
        metrics.update({f"fit_median_residual@{k}": v["median_abs_residual"] for k, v in data["fit"].items()})
        rest = "fit to {} children: median |predicted / measured - 1| {}".format(len(data["children"]) + 1, ", ".join(
            f"{k} {v['median_abs_residual']:.1%}" for k, v in data["fit"].items()))
    print(f"costs: the parent's own blocks ({how}) plus the fixed cost explain: {shares} of its measured "
          f"step ({rest})")
    log = stage.logger()
    log.log("done", **metrics)
    log.close()
    return metrics

