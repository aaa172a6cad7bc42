"""The search targets: user targets as linear limits on block costs, and why they cannot be met.

REFERENCE.md section 1. :class:`Targets` holds them (the ``search`` section of a pipeline config, where
they are described, builds one). Each target becomes one ``sum_i cost[i, x_i] <= limit`` row of
:func:`thinkfast.puzzle.mip.solve_mip`, the costs every architecture pays (``problem.fixed``, whole-model
overhead included) subtracted from the limit. Messages name a target as the user sets it (``search.speedup``).

When no architecture meets the targets, :func:`explain_infeasible` says so in the user's units (a
speedup, tokens/s, seconds, parameters, bytes) rather than as the solver's row (``decode_s@16 <=
-0.00065``): for each target alone, the best value any architecture of the library reaches on the
measured costs (the fastest child: each layer's fastest block, plus the fixed part, as
``problem.totals`` counts it); when each is reachable alone, the best each reaches while the others
hold. :func:`check_finite` rejects a NaN or infinite score or cost of a block the library has (the
``inf`` padding of layers with fewer blocks is not a block), which the solver would otherwise read
as "block missing".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..config import ConfigError
from .mip import InfeasibleError, solve_mip

__all__ = ["Targets", "check_finite", "explain_infeasible", "limits_for", "summary"]

_LIMITS = ("speedup", "min_throughput", "max_latency_s", "max_params", "max_memory_bytes", "max_kv_cache_bytes",
           "kv_fraction")


@dataclass(frozen=True)
class Targets:
    """What the child must meet (any combination; None: not a target). Runtimes are of ``runtime``
    (one decode step, or a prefill of the costs' ``prefill_len`` tokens) at ``batch_size``.

    - ``speedup``: the parent's runtime over the child's, at least this;
    - ``min_throughput``: tokens/s (decode: ``batch_size`` per step; prefill: ``batch_size * prefill_len``);
    - ``max_latency_s``: the runtime itself;
    - ``max_params``; ``max_memory_bytes``: parameter bytes plus the KV cache of ``batch_size`` sequences
      of ``memory_context`` tokens; ``max_kv_cache_bytes``: that KV cache alone; ``kv_fraction``: KV-cache
      bytes per token at most this share of the parent's.
    """

    runtime: Literal["decode", "prefill"] = "decode"
    batch_size: int = 16  # one of the costs' batch sizes
    speedup: float | None = None
    min_throughput: float | None = None
    max_latency_s: float | None = None
    max_params: float | None = None
    max_memory_bytes: float | None = None
    memory_context: int = 2048
    max_kv_cache_bytes: float | None = None
    kv_fraction: float | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.memory_context < 1:
            raise ValueError(f"batch_size={self.batch_size} and memory_context={self.memory_context} must be >= 1")
        for name in _LIMITS:
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}={v} must be > 0")


def _runtime_key(targets: Targets) -> str:
    return f"{targets.runtime}_s@{targets.batch_size}"


def limits_for(targets: Targets, problem, costs: dict) -> dict[str, float]:
    """Targets -> ``{cost matrix name: limit on its summed block values}`` (fixed costs subtracted).

    ``max_memory_bytes`` adds a ``memory_bytes`` matrix (parameter bytes + KV cache of
    ``batch_size x memory_context`` tokens) to ``problem``."""
    if str(targets.batch_size) not in {str(b) for b in costs["batch_sizes"]}:
        raise ConfigError(f"search.batch_size={targets.batch_size} was not measured; "
                          f"the costs file has batch sizes {costs['batch_sizes']}")
    key = _runtime_key(targets)
    parent = problem.totals(problem.parent_choice)
    fixed = problem.fixed
    limits: dict[str, float] = {}

    def add(name: str, total_limit: float) -> None:
        value = total_limit - fixed.get(name, 0.0)
        limits[name] = min(limits.get(name, np.inf), value)

    if targets.speedup is not None:
        add(key, parent[key] / targets.speedup)
    if targets.min_throughput is not None:
        add(key, _tokens(targets, costs) / targets.min_throughput)
    if targets.max_latency_s is not None:
        add(key, targets.max_latency_s)
    if targets.max_params is not None:
        add("params", targets.max_params)
    if targets.max_kv_cache_bytes is not None:
        add("kv_bytes_per_token", targets.max_kv_cache_bytes / (targets.batch_size * targets.memory_context))
    if targets.kv_fraction is not None:
        add("kv_bytes_per_token", parent["kv_bytes_per_token"] * targets.kv_fraction)
    if targets.max_memory_bytes is not None:
        problem.costs["memory_bytes"] = problem.costs["param_bytes"] + (
            targets.batch_size * targets.memory_context * problem.costs["kv_bytes_per_token"])
        problem.fixed["memory_bytes"] = fixed.get("param_bytes", 0.0)
        add("memory_bytes", targets.max_memory_bytes)
    return limits


def summary(problem, sol, targets: Targets) -> dict:
    """One solution as the stage reports it: chosen blocks, objective, predicted speedup, sizes."""
    key = _runtime_key(targets)
    parent, child = problem.totals(problem.parent_choice), problem.totals(sol.choice)
    return {
        "choice": [list(problem.names[i][k]) for i, k in enumerate(sol.choice)],
        "objective": sol.objective, "optimal": sol.optimal, "solve_seconds": round(sol.seconds, 4),
        "solver": sol.stats.get("method"),
        "speedup": parent[key] / child[key], "params": child["params"],
        "params_fraction": child["params"] / parent["params"],
        "kv_fraction": child["kv_bytes_per_token"] / max(parent["kv_bytes_per_token"], 1e-30),
    }


def _tokens(targets: Targets, costs: dict) -> int:
    """Tokens one timed call processes: one per sequence (decode) or the whole prompt (prefill)."""
    return targets.batch_size * (costs["prefill_len"] if targets.runtime == "prefill" else 1)


def _label(key: str) -> str:
    """A cost matrix name in words: ``decode_s@16`` -> ``decode time at batch 16``."""
    if "@" in key:
        kind, b = key.split("@")
        return f"{kind.removesuffix('_s')} time at batch {b}"
    return {"params": "parameter count", "param_bytes": "parameter bytes",
            "kv_bytes_per_token": "KV-cache bytes per token", "memory_bytes": "memory bytes"}.get(key, key)


def _usable(problem) -> np.ndarray:
    """``[layers, width]`` bool: the blocks the library has (the rest is ``inf`` padding)."""
    mask = np.zeros(problem.scores.shape, dtype=bool)
    for i, names in enumerate(problem.names):
        mask[i, :len(names)] = True
    return mask


def check_finite(problem, keys=None, excluded_ok: bool = False) -> None:
    """Raise :class:`ConfigError` naming layer and block for each NaN or infinite score or cost
    (only the cost matrices in ``keys`` when given) of a block the library has, and for a NaN or
    infinite fixed cost. ``excluded_ok``: a score of +inf marks a block that a child structure excludes
    (:func:`~thinkfast.puzzle.assemble.restrict`), not an error."""
    usable = _usable(problem)
    mats = {"score": problem.scores, **{k: m for k, m in problem.costs.items() if keys is None or k in keys}}
    bad = []
    for what, m in mats.items():
        m = np.asarray(m, dtype=np.float64)
        wrong = np.isnan(m) | (m == -np.inf) if what == "score" and excluded_ok else ~np.isfinite(m)
        for i, k in zip(*np.nonzero(usable & wrong)):
            a, f = problem.names[i][k]
            where = "scores file" if what == "score" else "costs file"
            bad.append(f"layer {i} block {a}+{f}: {'the score' if what == 'score' else 'the ' + _label(what)} "
                       f"is {_nan(m[i, k])} (from the {where})")
    for k, v in problem.fixed.items():
        if (keys is None or k in keys) and not math.isfinite(v):
            bad.append(f"the fixed part (embedding, final norm, LM head): the {_label(k)} is {_nan(v)} "
                       "(from the costs file)")
    if bad:
        more = f"; and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ConfigError("NaN or infinite value(s) in the search problem, so no result can be trusted: "
                          + "; ".join(bad[:8]) + more + ". Re-run the stage that wrote it (scores or costs).")


def _nan(x) -> str:
    return "NaN" if math.isnan(x) else f"{float(x)}"


def _bytes(n: float) -> str:
    unit = next(((u, 2**e) for u, e in (("GiB", 30), ("MiB", 20)) if abs(n) >= 2**e), None)
    return f"{n:,.0f} bytes" + (f" ({n / unit[1]:,.3g} {unit[0]})" if unit else "")


def _count(n: float) -> str:
    return f"{n:,.0f}" if abs(n) >= 100 else f"{n:.3g}"


def _active(targets: Targets, problem, costs: dict) -> list[tuple]:
    """Active targets as ``(name, value, cost key, limit on the total, subject, phrase)``;
    ``phrase(total)`` says what a total of that cost means in the user's units."""
    key = _runtime_key(targets)
    parent = problem.totals(problem.parent_choice)
    p_time = parent[key]
    b, ctx = targets.batch_size, targets.memory_context
    on = f"{targets.runtime} at batch {b} on {costs.get('device', 'the measured device')}"
    per = "step" if targets.runtime == "decode" else f"prefill of {costs.get('prefill_len')} tokens"
    tokens = _tokens(targets, costs)

    def ms(t):
        return f"{t * 1e3:.4g} ms"

    fast, small = "the fastest child", "the smallest child"
    out = []
    speedup = targets.speedup
    if speedup is not None:
        out.append(("speedup", speedup, key, p_time / speedup, fast,
                    lambda t: f"is {p_time / t:.2f}x faster than the parent ({on}; {ms(t)} vs {ms(p_time)} per {per})"))
    if targets.min_throughput is not None:
        out.append(("min_throughput", targets.min_throughput, key, tokens / targets.min_throughput, fast,
                    lambda t: f"reaches {_count(tokens / t)} tokens/s ({on}; the parent {_count(tokens / p_time)})"))
    if targets.max_latency_s is not None:
        out.append(("max_latency_s", targets.max_latency_s, key, targets.max_latency_s, fast,
                    lambda t: f"takes {t:.4g} s ({ms(t)}) per {per} ({on}; the parent {p_time:.4g} s)"))
    if targets.max_params is not None:
        out.append(("max_params", targets.max_params, "params", targets.max_params, small,
                    lambda n: f"has {_count(n)} params (the parent {_count(parent['params'])})"))
    kv_parent = parent["kv_bytes_per_token"]
    if targets.max_kv_cache_bytes is not None:
        out.append(("max_kv_cache_bytes", targets.max_kv_cache_bytes, "kv_bytes_per_token",
                    targets.max_kv_cache_bytes / (b * ctx), "the child with the smallest KV cache",
                    lambda n: f"needs {_bytes(n * b * ctx)} for {b} sequences x {ctx} tokens "
                              f"(the parent {_bytes(kv_parent * b * ctx)})"))
    if targets.kv_fraction is not None:
        out.append(("kv_fraction", targets.kv_fraction, "kv_bytes_per_token", kv_parent * targets.kv_fraction,
                    "the child with the smallest KV cache",
                    lambda n: f"keeps a fraction {n / max(kv_parent, 1e-30):.3g} of the parent's KV cache per token "
                              f"({_count(n)} vs {_count(kv_parent)} bytes)"))
    if targets.max_memory_bytes is not None:
        mem = lambda c: c["param_bytes"] + b * ctx * c["kv_bytes_per_token"]  # noqa: E731
        out.append(("max_memory_bytes", targets.max_memory_bytes, "memory_bytes", targets.max_memory_bytes,
                    "the child with the least memory",
                    lambda n: f"needs {_bytes(n)} (parameters + KV cache of {b} sequences x {ctx} tokens; "
                              f"the parent {_bytes(mem(parent))})"))
    return out


def explain_infeasible(targets: Targets, problem, costs: dict) -> str:
    """Why no architecture meets the targets, in the user's units: each target that no architecture
    of the library reaches even alone, with the best value it can reach; otherwise (each reachable
    alone) the best each reaches while the others hold. NaN or infinite inputs are reported first."""
    key = _runtime_key(targets)
    try:
        check_finite(problem, {key, "params", "param_bytes", "kv_bytes_per_token", "memory_bytes"}, excluded_ok=True)
    except ConfigError as e:
        return str(e)
    active = _active(targets, problem, costs)
    nan = [f"search.{n}={v}" for n, v, *_ in active if not math.isfinite(v)]
    if nan:
        return f"{', '.join(nan)} is not a number: every target must be a finite number > 0"
    if not active:
        return "no target is set (search.speedup, min_throughput, max_latency_s, max_params, ...)"
    usable = _usable(problem) & np.isfinite(problem.scores)
    mats = dict(problem.costs)
    fixed = dict(problem.fixed)
    if "memory_bytes" not in mats:
        context = targets.batch_size * targets.memory_context
        mats["memory_bytes"] = mats["param_bytes"] + context * mats["kv_bytes_per_token"]
        fixed["memory_bytes"] = fixed.get("param_bytes", 0.0)

    def over(total, limit):
        return total > limit + 1e-9 * abs(limit)

    lines = []
    for name, value, k, limit, subject, phrase in active:
        best = float(np.where(usable, mats[k], np.inf).min(axis=1).sum()) + fixed.get(k, 0.0)
        if over(best, limit):
            lines.append(f"search.{name}={value:g} cannot be reached: {subject} of this library {phrase(best)}")
    if lines:
        return "; ".join(lines)
    # each reachable alone: the best each reaches while all the others hold
    limits = {}
    for _, _, k, limit, *_ in active:
        limits[k] = min(limits.get(k, np.inf), limit - fixed.get(k, 0.0))
    reach = {}
    for k in limits:
        others = {o: limits[o] for o in limits if o != k}
        try:
            sol = solve_mip(mats[k], {o: mats[o] for o in others}, others, allowed=usable)[0]
            reach[k] = sol.objective + fixed.get(k, 0.0)
        except InfeasibleError:
            pass
    for name, value, k, limit, subject, phrase in active:
        if k in reach and over(reach[k], limit):
            lines.append(f"search.{name}={value:g}: with the other targets met, {subject} {phrase(reach[k])}")
    names = ", ".join(f"search.{n}={v:g}" for n, v, *_ in active)
    return (f"the targets {names} can each be met alone but not together"
            + (": " + "; ".join(lines) if lines else ""))
