"""Around the MIP: the Pareto sweep over speedups, and a chosen child timed against its parent with the
predicted target calibrated until the measured speedup meets the real one.

Puzzle (arXiv 2411.19146) section 4.4 re-solves the MIP for several targets; the calibration is ours.
Costs summed from blocks are only a model of a whole model's time (blocks timed alone miss what they
share; blocks from whole probe models miss how they interact), so :func:`calibrate` re-solves with the
predicted target corrected by the measured miss (geometric bisection once it is bracketed) and keeps
the best child whose measured speedup meets the target.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ..rundir import atomic_write_json, atomic_write_text
from ..runtime import torch_dtype
from .mip import InfeasibleError, finish_races, solve_mip
from .targets import Targets, explain_infeasible, limits_for, summary
from .timing import device_name, paired_speedup

__all__ = ["TOLERANCE", "calibrate", "measured_speedup", "pareto_sweep", "verifiable", "write_pareto"]

TOLERANCE = 0.0  # how far under the target a measured speedup may land and still meet it (the default)


def pareto_sweep(problem, costs: dict, targets: Targets, speedups: Sequence[float],
                 time_limit: float | None = None) -> list[dict]:
    """One row per speedup in ``speedups`` (the other targets held): the best child's summary
    (:func:`~thinkfast.puzzle.targets.summary`) with ``target_speedup``, or ``infeasible`` and why."""
    rows = []
    for s in speedups:
        at = dataclasses.replace(targets, speedup=s)
        try:
            sol = solve_mip(problem.scores, problem.costs, limits_for(at, problem, costs), time_limit=time_limit)[0]
            rows.append({"target_speedup": s, **summary(problem, sol, at)})
        except InfeasibleError:
            rows.append({"target_speedup": s, "infeasible": explain_infeasible(at, problem, costs)})
    return rows


def write_pareto(folder: Path, rows: list[dict], metric: str, targets: Targets) -> None:
    """``pareto.json`` (the rows), ``pareto.md`` (a table) and ``pareto.png`` (when matplotlib is installed)
    in ``folder``."""
    atomic_write_json(folder / "pareto.json", rows)
    lines = [f"| target speedup | {metric} (sum) | achieved speedup | params | KV/token |", "|---|---|---|---|---|"]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['target_speedup']} | infeasible | | | |")
        else:
            lines.append(f"| {r['target_speedup']} | {r['objective']:.4f} | {r['speedup']:.2f}x | "
                         f"{r['params_fraction']:.0%} | {r['kv_fraction']:.0%} |")
    atomic_write_text(folder / "pareto.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if "infeasible" not in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["speedup"] for r in ok], [r["objective"] for r in ok], "o-")
    ax.set_xlabel(f"{targets.runtime} speedup at batch {targets.batch_size}")
    ax.set_ylabel(f"summed replace-1-block {metric}")
    ax.set_title("Puzzle MIP: quality vs speed")
    fig.tight_layout()
    tmp = folder / "pareto.png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(folder / "pareto.png")


def verifiable(verify: bool, speedup: float | None, costs: dict, device) -> str | None:
    """Why the child cannot be timed against its parent here, or None when it can: verification is on, there
    is a ``speedup`` target, and the costs were measured on this device with thinkfast's runtime."""
    if not verify or speedup is None:
        return "verify is off" if not verify else "no speedup target"
    if costs.get("source"):
        return f"costs come from {costs['source']}"
    if costs.get("runtime", "thinkfast") != "thinkfast":
        return f"costs were measured in {costs['runtime']}"
    here = device_name(device)
    return None if here == costs["device"] else f"costs were measured on {costs['device']!r}, this is {here!r}"


def measured_speedup(parent, child, targets: Targets, costs: dict, device) -> float:
    """How many times faster the child runs than its parent for the targets' runtime and batch size, at the
    costs' lengths and dtype: the median ratio over back-to-back pairs of calls
    (:func:`thinkfast.puzzle.timing.paired_speedup`). Both models go back to the CPU afterwards."""
    finish_races()  # a HiGHS run still busy on a core would slow the timings
    out = paired_speedup(parent, child, f"{targets.runtime}_s", targets.batch_size, costs["prefill_len"],
                         costs["decode_context"], torch_dtype(costs["dtype"]), device)
    parent.to("cpu")
    child.to("cpu")
    return out


def calibrate(problem, costs: dict, targets: Targets, first: list, build: Callable, measure: Callable[..., float], *,
              tries: int, n_solutions: int = 1, alpha: float = 0.8, time_limit: float | None = None,
              tolerance: float = TOLERANCE) -> tuple:
    """Re-solve with a corrected predicted target until the measured speedup meets ``targets.speedup`` (at
    least ``(1 - tolerance)`` times it) without exceeding it by more than 10%, ``tries`` times at most.
    ``first``: the solutions for the target itself; ``build(solution)`` assembles a child, ``measure(child)``
    times it against the parent. Returns ``(solutions, child, measured, report)`` of the best child that meets
    the target (lowest objective), else of the fastest; ``report`` lists each try.

    The predicted target is corrected by the measured miss of the last child, from that child's own predicted
    speedup (``own * target / measured``, 0.5% more after a miss), until a child that meets and one that misses
    bracket it (or the correction would not move below a target whose child met), then bisected geometrically.
    A child that missed bounds the bracket by its own predicted speedup, so every later solve must find a child
    predicted faster than it (a predicted target of 1 gives the parent, which misses any target above 1)."""
    target = targets.speedup
    done_tries: list[dict] = []
    lo, hi = 1.0, None  # the largest predicted speedup of a child that missed, the smallest target whose child met
    predicted, solutions, measured, own = target, first, None, None
    for attempt in range(tries + 1):
        if attempt:
            missed = measured < target * (1 - tolerance)
            predicted = own * target / measured * (1.005 if missed else 1.0)
            if hi is not None and (lo > 1.0 or predicted >= hi):  # bracketed (or no correction left): bisect
                predicted = math.sqrt(lo * hi)
            predicted = max(predicted, lo * 1.0001)
            try:
                solutions = solve_mip(problem.scores, problem.costs,
                                      limits_for(dataclasses.replace(targets, speedup=predicted), problem, costs),
                                      n_solutions=n_solutions, alpha=alpha, time_limit=time_limit)
            except InfeasibleError:
                done_tries.append({"predicted_target": predicted, "infeasible": True})
                break
        own = summary(problem, solutions[0], targets)["speedup"]
        same = [t for t in done_tries if t.get("choice") == solutions[0].choice]
        if same:  # a child measured before: its time is known
            child, measured = same[0]["child"], same[0]["measured_speedup"]
        else:
            child = build(solutions[0])
            measured = measure(child)
        meets = measured >= target * (1 - tolerance)
        done_tries.append({"predicted_target": predicted, "choice": solutions[0].choice, "predicted_speedup": own,
                           "objective": solutions[0].objective, "measured_speedup": measured, "meets": meets,
                           "solutions": solutions, "child": child})
        print(f"search: predicted target {predicted:.3f}x -> measured {measured:.2f}x "
              f"({'meets' if meets else 'misses'} {target}x)")
        if meets:
            hi = predicted if hi is None else min(hi, predicted)
            if measured <= target * 1.1:
                break
        else:
            lo = max(lo, own)
        if hi is not None and hi / lo < 1.01:
            break
    done = [t for t in done_tries if "child" in t]
    ok = [t for t in done if t["meets"]]
    best = min(ok, key=lambda t: t["objective"]) if ok else max(done, key=lambda t: t["measured_speedup"])
    report = [{k: v for k, v in t.items() if k not in ("solutions", "child", "choice")} for t in done_tries]
    return best["solutions"], best["child"], best["measured_speedup"], report
