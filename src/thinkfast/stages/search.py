"""Stage ``search``: Puzzle's MIP over the block library, and assembly of the chosen child.

Paper: Puzzle (arXiv 2411.19146) sections 4.4-4.5; Llama-Nemotron (arXiv 2505.00949) section 2.1;
REFERENCE.md section 1. Reads the ``library``, ``scores`` and ``costs`` stages' files (so
``thinkfast search key=value`` re-runs only the search on cached measurements), turns the targets
below into linear limits, solves with :func:`thinkfast.puzzle.mip.solve_mip` (exact enumeration raced by HiGHS; proven optimal),
re-checks every solution, and assembles the best one into ``model/`` (nemotron-nas).

Targets (any combination; each becomes one ``sum cost <= limit`` row):
- ``speedup``: whole-model ``runtime`` (``decode`` or ``prefill``) at ``batch_size`` at least this many
  times faster than the parent (``sum block runtime <= (parent total) / speedup - fixed``);
- ``min_throughput``: tokens/s at ``batch_size`` (decode: ``batch / step time``; prefill:
  ``batch * prefill_len / time``);
- ``max_latency_s``: that runtime itself;
- ``max_params``; ``max_memory_bytes``: parameter bytes plus the KV cache of ``batch_size`` sequences
  of ``memory_context`` tokens; ``max_kv_cache_bytes``: that KV cache alone; ``kv_fraction``: KV-cache
  bytes per token at most this share of the parent's.
``structure: layers`` limits the children to whole layers removed or kept with their FFN (attention may
lose KV heads): in the nano world those recover from distillation far better (docs/LOG.md 2026-12-03).
``structure: layers_ffn`` also lets a kept layer's FFN narrow to ``min_ffn_fraction`` of its width: steps of
speed between the children of k and k - 1 whole layers, which an 8-layer parent lacks (issue 26).
``sweep`` solves for each speedup in the list and writes ``pareto.json``, ``pareto.md`` and
``pareto.png`` (when matplotlib is installed).

Verification (``verify``, on by default for a ``speedup`` target): when the costs were measured on this
machine with thinkfast's runtime, the chosen child and its parent are timed here, in back-to-back pairs, and
``measured_speedup`` is reported beside the predicted one. Costs summed from blocks are only a model of
a whole model's time (blocks timed alone miss what they share; blocks from whole probe models miss how
they interact), so with ``calibrate: N`` a missed or far exceeded target is re-solved up to N times with
the predicted target corrected by the measured miss (geometric bisection once it is bracketed), and the
best child whose measured speedup meets the target (at least the target itself, or ``tolerance`` under it) is
kept (``calibration`` in the metrics lists each try).

Departures: the paper re-solves for several batch sizes and keeps the best; here the batch size is a
target key and a sweep is a list of speedups. Calibration and ``structure`` are ours.

The algorithms are library code: the targets and their limits in :mod:`thinkfast.puzzle.targets`, the sweep,
the timing and the calibration in :mod:`thinkfast.puzzle.search`, assembly in :mod:`thinkfast.puzzle.assemble`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import (ArtifactError, check_costs, copy_tokenizer_files, load_tensors, read_json, read_library,
                         read_model_sidecar, read_scores, write_model_sidecar)
from ..modeling.engine_rules import check_engine, library_engine, untie_for
from ..puzzle.assemble import assemble, build_problem, describe, restrict
from ..puzzle.mip import InfeasibleError, solve_mip
from ..artifacts import load_decilm
from ..puzzle.search import calibrate, measured_speedup, pareto_sweep, verifiable, write_pareto
from ..puzzle.targets import Targets, check_finite, explain_infeasible, limits_for, summary
from ..rundir import StageDir, atomic_dir, atomic_write_json, atomic_write_text
from . import Input, Inputs, check_device, model_path, resolve_device

MAKES = "model"


def reads(cfg) -> dict:
    return {"parent": Input("model"), "library": Input("library", field="library"),
            "scores": Input("scores", field="scores"), "costs": Input("costs", field="costs")}


@dataclass
class SearchConfig:
    metric: str = "kl"  # a metric of scores.json: "kl" (the paper's) or "lm_loss"
    runtime: Literal["decode", "prefill"] = "decode"
    batch_size: int = 16  # one of costs.batch_sizes
    speedup: float | None = 2.0
    min_throughput: float | None = None
    max_latency_s: float | None = None
    max_params: float | None = None
    max_memory_bytes: float | None = None
    memory_context: int = 2048
    max_kv_cache_bytes: float | None = None  # KV cache of batch_size x memory_context tokens
    kv_fraction: float | None = None
    # which children: any (every block of the library), layers (each layer removed whole or kept with its
    # FFN and its attention or a GQA variant with fewer KV heads; see thinkfast.puzzle.assemble.restrict), or
    # layers_ffn (as layers, a kept layer's FFN also narrowed to at least min_ffn_fraction of its width)
    structure: Literal["any", "layers", "layers_ffn"] = "any"
    min_ffn_fraction: float = 0.5
    n_solutions: int = 1
    alpha: float = 0.8  # diversity: later solutions share at most alpha * layers blocks with earlier ones
    sweep: list[float] = field(default_factory=list)  # speedups for the Pareto table
    time_limit_s: float | None = None
    # time the child against its parent here (a speedup target, costs measured on this machine)
    verify: bool = field(default=True, metadata={"before": False})
    calibrate: int = field(default=3, metadata={"before": 0})  # re-solves when the measured speedup misses
    # how far under the target a measured speedup may land and still meet it (0: at least the target; before
    # session 18 a child 3% under counted)
    tolerance: float = field(default=0.0, metadata={"before": 0.03})
    library: str | None = None
    scores: str | None = None  # default RUN_DIR/scores/scores.json
    costs: str | None = None  # default RUN_DIR/costs/costs.json
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        self.targets()  # validates them
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s={self.time_limit_s} must be > 0")
        if any(s <= 0 for s in self.sweep):
            raise ValueError(f"sweep: speedups must be > 0, got {self.sweep}")
        if self.n_solutions < 1 or not 0 <= self.alpha <= 1:
            raise ValueError("n_solutions must be >= 1 and alpha in [0, 1]")
        if not 0 < self.min_ffn_fraction <= 1:
            raise ValueError(f"min_ffn_fraction={self.min_ffn_fraction} must be in (0, 1]")
        if self.calibrate < 0:
            raise ValueError(f"calibrate={self.calibrate} must be >= 0")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance={self.tolerance} must be in [0, 1)")

    def targets(self) -> Targets:
        """The targets of this section, as :mod:`thinkfast.puzzle.targets` takes them."""
        return Targets(runtime=self.runtime, batch_size=self.batch_size, speedup=self.speedup,
                       min_throughput=self.min_throughput, max_latency_s=self.max_latency_s, max_params=self.max_params,
                       max_memory_bytes=self.max_memory_bytes, memory_context=self.memory_context,
                       max_kv_cache_bytes=self.max_kv_cache_bytes, kv_fraction=self.kv_fraction)


Config = SearchConfig


def _pareto(stage: StageDir, cfg: SearchConfig, problem, costs) -> list[dict]:
    targets = cfg.targets()
    rows = pareto_sweep(problem, costs, targets, cfg.sweep, time_limit=cfg.time_limit_s)
    write_pareto(stage.path, rows, cfg.metric, targets)
    return rows


def run(cfg: SearchConfig, stage: StageDir, inputs: Inputs) -> dict:
    model_dir = model_path(inputs)
    lib_path = inputs["library"]
    lib = read_library(lib_path)
    scores = read_scores(inputs["scores"], lib)
    raw = read_json(inputs["costs"], "run the costs stage first, or set search.costs")
    copied = raw.get("source") if isinstance(raw, dict) else None
    try:
        costs = check_costs(raw, str(inputs["costs"]), lib)
    except ArtifactError as e:  # name the user's file, not the costs stage's copy of it
        raise ArtifactError(f"{e} (the costs stage copied that file from {copied})" if copied else str(e)) from None
    targets = cfg.targets()
    try:
        problem = build_problem(lib, scores, costs, cfg.metric)
        check_finite(problem)
        problem = restrict(problem, cfg.structure, cfg.min_ffn_fraction)
        limits = limits_for(targets, problem, costs)
    except ValueError as e:
        raise type(e)(f"{e} (scores: {inputs['scores']}; costs: {copied or inputs['costs']})") from None
    print(f"search: step 1/3 MIP over {problem.scores.shape[0]} layers x {problem.scores.shape[1]} blocks")
    try:
        solutions = solve_mip(problem.scores, problem.costs, limits, n_solutions=cfg.n_solutions, alpha=cfg.alpha,
                              time_limit=cfg.time_limit_s)
    except InfeasibleError:
        raise ValueError(explain_infeasible(targets, problem, costs)) from None
    print("search: step 2/3 assemble the best solution")
    parent = load_decilm(model_dir, "cpu")
    tensors = load_tensors(lib_path / "weights.safetensors")

    def build(sol):
        return assemble(parent, lib, tensors, [problem.names[i][k] for i, k in enumerate(sol.choice)])

    device = resolve_device(cfg.device)
    why_not = verifiable(cfg.verify, cfg.speedup, costs, device)
    measured, calibration = None, []
    if why_not is None:
        solutions, child, measured, calibration = calibrate(
            problem, costs, targets, solutions, build, lambda c: measured_speedup(parent, c, targets, costs, device),
            tries=cfg.calibrate, n_solutions=cfg.n_solutions, alpha=cfg.alpha, time_limit=cfg.time_limit_s,
            tolerance=cfg.tolerance)
    else:
        child = build(solutions[0])
    summaries = [summary(problem, s, targets) for s in solutions]
    arch = describe(child.config)
    print("\n".join(arch))
    engine = library_engine(lib)
    untie_for(child, engine)  # TensorRT-LLM's converter needs lm_head.weight in the checkpoint
    check_engine(child.config, engine, "the search's child")  # before anything is written
    sidecar = read_model_sidecar(model_dir)
    with atomic_dir(stage.model_dir) as tmp:
        child.save_pretrained(tmp)
        copy_tokenizer_files(model_dir, tmp)
        # the child is prompted as its parent was; later stages (fuse) keep it loadable by this engine
        write_model_sidecar(tmp, prompting=sidecar.get("prompting"), made_by="search", engine=engine)
    atomic_write_text(stage.path / "architecture.txt", "\n".join(arch) + "\n")
    atomic_write_json(stage.path / "search.json", {"limits": limits, "costs_device": costs["device"],
                                                   "metric": cfg.metric, "solutions": summaries,
                                                   "measured_speedup": measured, "calibration": calibration})
    pareto = []
    if cfg.sweep:
        print(f"search: step 3/3 Pareto sweep over speedups {cfg.sweep}")
        pareto = _pareto(stage, cfg, problem, costs)
    metrics = {**{k: v for k, v in summaries[0].items() if k != "choice"}, "solutions": len(solutions),
               "measured_speedup": measured, "not_measured_because": why_not, "calibration": calibration,
               "costs_device": costs["device"], "pareto_points": len(pareto),
               # share of the parent's measured runtime that every child pays beyond the embedding and head, and
               # (costs with the first-layer model) how much slower blocks run inside a model than alone
               "runtime_overhead_share": {k: v / problem.totals(problem.parent_choice)[k]
                                          for k, v in problem.overhead.items()},
               "block_scale": problem.scale}
    log = stage.logger()
    log.log("done", **metrics, architecture=arch)
    log.close()
    return metrics
