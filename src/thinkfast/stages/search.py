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
``sweep`` solves for each speedup in the list and writes ``pareto.json``, ``pareto.md`` and
``pareto.png`` (when matplotlib is installed).

Verification (``verify``, on by default for a ``speedup`` target): when the costs were measured on this
machine with thinkfast's runtime, the chosen child and its parent are timed here, in back-to-back pairs, and
``measured_speedup`` is reported beside the predicted one. Costs summed from blocks are only a model of
a whole model's time (blocks timed alone miss what they share; blocks from whole probe models miss how
they interact), so with ``calibrate: N`` a missed or far exceeded target is re-solved up to N times with
the predicted target corrected by the measured miss (geometric bisection once it is bracketed), and the
best child whose measured speedup meets the target is kept (``calibration`` in the metrics lists each try).

Departures: the paper re-solves for several batch sizes and keeps the best; here the batch size is a
target key and a sweep is a list of speedups. Calibration and ``structure`` are ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import (ArtifactError, check_costs, copy_tokenizer_files, load_tensors, read_json, read_library,
                         read_model_sidecar, read_scores, write_model_sidecar)
from ..engines import check_engine, untie_for
from ..puzzle.assemble import assemble, build_problem, describe, restrict
from ..puzzle.mip import InfeasibleError, finish_races, solve_mip
from ..puzzle.parent import load_decilm
from ..puzzle.targets import check_finite, explain_infeasible, limits_for, summary
from ..puzzle.timing import device_name, paired_speedup
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
    # which children: any (every block of the library), or layers (each layer removed whole or kept with its
    # FFN and its attention or a GQA variant with fewer KV heads; see thinkfast.puzzle.assemble.restrict)
    structure: Literal["any", "layers"] = "any"
    n_solutions: int = 1
    alpha: float = 0.8  # diversity: later solutions share at most alpha * layers blocks with earlier ones
    sweep: list[float] = field(default_factory=list)  # speedups for the Pareto table
    time_limit_s: float | None = None
    # time the child against its parent here (a speedup target, costs measured on this machine)
    verify: bool = field(default=True, metadata={"before": False})
    calibrate: int = field(default=3, metadata={"before": 0})  # re-solves when the measured speedup misses
    library: str | None = None
    scores: str | None = None  # default RUN_DIR/scores/scores.json
    costs: str | None = None  # default RUN_DIR/costs/costs.json
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        if self.batch_size < 1 or self.memory_context < 1:
            raise ValueError(f"batch_size={self.batch_size} and memory_context={self.memory_context} must be >= 1")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s={self.time_limit_s} must be > 0")
        for name in ("speedup", "min_throughput", "max_latency_s", "max_params", "max_memory_bytes",
                     "max_kv_cache_bytes", "kv_fraction"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}={v} must be > 0")
        if any(s <= 0 for s in self.sweep):
            raise ValueError(f"sweep: speedups must be > 0, got {self.sweep}")
        if self.n_solutions < 1 or not 0 <= self.alpha <= 1:
            raise ValueError("n_solutions must be >= 1 and alpha in [0, 1]")
        if self.calibrate < 0:
            raise ValueError(f"calibrate={self.calibrate} must be >= 0")


Config = SearchConfig


def _pareto(stage: StageDir, cfg: SearchConfig, problem, costs) -> list[dict]:
    rows = []
    for s in cfg.sweep:
        try:
            sol = solve_mip(problem.scores, problem.costs, limits_for(cfg, problem, costs, s),
                            time_limit=cfg.time_limit_s)[0]
            rows.append({"target_speedup": s, **summary(problem, sol, cfg)})
        except InfeasibleError:
            rows.append({"target_speedup": s, "infeasible": explain_infeasible(cfg, problem, costs, s)})
    atomic_write_json(stage.path / "pareto.json", rows)
    lines = [f"| target speedup | {cfg.metric} (sum) | achieved speedup | params | KV/token |", "|---|---|---|---|---|"]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['target_speedup']} | infeasible | | | |")
        else:
            lines.append(f"| {r['target_speedup']} | {r['objective']:.4f} | {r['speedup']:.2f}x | "
                         f"{r['params_fraction']:.0%} | {r['kv_fraction']:.0%} |")
    atomic_write_text(stage.path / "pareto.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return rows
    ok = [r for r in rows if "infeasible" not in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["speedup"] for r in ok], [r["objective"] for r in ok], "o-")
    ax.set_xlabel(f"{cfg.runtime} speedup at batch {cfg.batch_size}")
    ax.set_ylabel(f"summed replace-1-block {cfg.metric}")
    ax.set_title("Puzzle MIP: quality vs speed")
    fig.tight_layout()
    tmp = stage.path / "pareto.png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(stage.path / "pareto.png")
    return rows


_TOLERANCE = 0.03  # a measured speedup within 3% under the target meets it (timing noise)


def verifiable(cfg: SearchConfig, costs: dict, device) -> str | None:
    """Why the child cannot be timed against its parent here, or None when it can."""
    if not cfg.verify or cfg.speedup is None:
        return "verify is off" if not cfg.verify else "no speedup target"
    if costs.get("source"):
        return f"costs come from {costs['source']}"
    if costs.get("runtime", "thinkfast") != "thinkfast":
        return f"costs were measured in {costs['runtime']}"
    here = device_name(device)
    return None if here == costs["device"] else f"costs were measured on {costs['device']!r}, this is {here!r}"


def measured_speedup(parent, child, cfg: SearchConfig, costs: dict, device) -> float:
    """How many times faster the child runs than its parent for the target's runtime and batch size, at the
    costs' lengths and dtype: the median ratio over back-to-back pairs of calls
    (:func:`thinkfast.puzzle.timing.paired_speedup`). Both models go back to the CPU afterwards."""
    import torch

    finish_races()  # a HiGHS run still busy on a core would slow the timings
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[costs["dtype"]]
    out = paired_speedup(parent, child, f"{cfg.runtime}_s", cfg.batch_size, costs["prefill_len"],
                         costs["decode_context"], dtype, device)
    parent.to("cpu")
    child.to("cpu")
    return out


def _calibrated(cfg: SearchConfig, problem, costs: dict, parent, build, first, device) -> tuple:
    """Re-solve with a corrected predicted target until the measured speedup meets ``cfg.speedup``
    without exceeding it by more than 10%, ``cfg.calibrate`` times at most. Returns ``(solutions, child,
    measured, tries)`` of the best child that meets the target (lowest objective), else of the fastest.

    The predicted target is corrected by the measured miss (``predicted * target / measured``) until a
    child that meets and one that misses bracket it (a predicted target of 1 gives the parent, which
    misses any target above 1), then bisected geometrically."""
    import dataclasses
    import math

    target = cfg.speedup
    tries: list[dict] = []
    lo, hi = 1.0, None  # the largest predicted target whose child misses, the smallest whose child meets
    predicted, solutions, measured = target, first, None
    for attempt in range(cfg.calibrate + 1):
        if attempt:
            predicted = math.sqrt(lo * hi) if hi is not None else predicted * target / measured
            try:
                solutions = solve_mip(problem.scores, problem.costs,
                                      limits_for(dataclasses.replace(cfg, speedup=predicted), problem, costs, predicted),
                                      n_solutions=cfg.n_solutions, alpha=cfg.alpha, time_limit=cfg.time_limit_s)
            except InfeasibleError:
                tries.append({"predicted_target": predicted, "infeasible": True})
                break
        same = [t for t in tries if t.get("choice") == solutions[0].choice]
        if same:  # a child measured before: its time is known
            child, measured = same[0]["child"], same[0]["measured_speedup"]
        else:
            child = build(solutions[0])
            measured = measured_speedup(parent, child, cfg, costs, device)
        meets = measured >= target * (1 - _TOLERANCE)
        tries.append({"predicted_target": predicted, "choice": solutions[0].choice, "objective": solutions[0].objective,
                      "measured_speedup": measured, "meets": meets, "solutions": solutions, "child": child})
        print(f"search: predicted target {predicted:.3f}x -> measured {measured:.2f}x "
              f"({'meets' if meets else 'misses'} {target}x)")
        if meets:
            hi = predicted if hi is None else min(hi, predicted)
            if measured <= target * 1.1:
                break
        else:
            lo = max(lo, predicted)
        if hi is not None and hi / lo < 1.01:
            break
    done = [t for t in tries if "child" in t]
    ok = [t for t in done if t["meets"]]
    best = min(ok, key=lambda t: t["objective"]) if ok else max(done, key=lambda t: t["measured_speedup"])
    report = [{k: v for k, v in t.items() if k not in ("solutions", "child", "choice")} for t in tries]
    return best["solutions"], best["child"], best["measured_speedup"], report


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
    try:
        problem = build_problem(lib, scores, costs, cfg.metric)
        check_finite(problem)
        problem = restrict(problem, cfg.structure)
        limits = limits_for(cfg, problem, costs, cfg.speedup)
    except ValueError as e:
        raise type(e)(f"{e} (scores: {inputs['scores']}; costs: {copied or inputs['costs']})") from None
    print(f"search: step 1/3 MIP over {problem.scores.shape[0]} layers x {problem.scores.shape[1]} blocks")
    try:
        solutions = solve_mip(problem.scores, problem.costs, limits, n_solutions=cfg.n_solutions, alpha=cfg.alpha,
                              time_limit=cfg.time_limit_s)
    except InfeasibleError:
        raise ValueError(explain_infeasible(cfg, problem, costs, cfg.speedup)) from None
    print("search: step 2/3 assemble the best solution")
    parent = load_decilm(model_dir, "cpu")
    tensors = load_tensors(lib_path / "weights.safetensors")

    def build(sol):
        return assemble(parent, lib, tensors, [problem.names[i][k] for i, k in enumerate(sol.choice)])

    device = resolve_device(cfg.device)
    why_not = verifiable(cfg, costs, device)
    measured, calibration = None, []
    if why_not is None:
        solutions, child, measured, calibration = _calibrated(cfg, problem, costs, parent, build, solutions, device)
    else:
        child = build(solutions[0])
    summaries = [summary(problem, s, cfg) for s in solutions]
    arch = describe(child.config)
    print("\n".join(arch))
    engine = lib.get("engine", "hf")
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
               # share of the parent's measured runtime that no block explains (charged to every child)
               "runtime_overhead_share": {k: v / problem.totals(problem.parent_choice)[k]
                                          for k, v in problem.overhead.items()}}
    log = stage.logger()
    log.log("done", **metrics, architecture=arch)
    log.close()
    return metrics
