"""The Puzzle search: one block variant per layer by mixed-integer programming.

Paper: Puzzle (arXiv 2411.19146) section 4 "decomposed NAS search"; Llama-Nemotron (arXiv 2505.00949)
section 2.1. Binary ``x[i, j]`` = layer ``i`` takes variant ``j``::

    minimise    sum_ij score[i, j] x[i, j]
    subject to  sum_j x[i, j] = 1                        for every layer i
                sum_ij cost_c[i, j] x[i, j] <= limit_c   for every constraint c
                sum_ij y[i, j] x[i, j] <= alpha * layers  for every earlier solution y (diversity)

Every target of the paper is one such linear row once the caller has turned it into a per-block cost:
memory (parameters + batch x KV cache), KV-cache tokens, parameters, latency (summed block runtime)
and throughput / speedup at a batch size (``batch * seq / sum runtime >= T`` is
``sum runtime <= batch * seq / T``). :func:`thinkfast.puzzle.search` does those conversions; this
module only knows named cost matrices and limits.

Solver: SciPy's HiGHS (``scipy.optimize.milp``) with a zero relative gap, so a returned solution is
proven optimal unless it says otherwise (``optimal=False`` after a time limit; never reported as
optimal, unlike puzzletron's PuLP path).

Departures / additions:
- Dominated variants are removed before the solve: ``j`` is dominated in its layer when another
  variant is no worse in score and in every constrained cost and strictly better in one (ties keep the
  lower index). An optimal solution never needs a dominated variant, so the single-solution optimum is
  unchanged (a test checks it against brute force); it shrinks Puzzle-sized instances several-fold.
  With diversity rows an earlier solution can make the dominating variant costly, so solutions after
  the first are solved over the full variant set.
- Reduced-cost fixing before the MIP: the LP relaxation's reduced costs ``r_j`` bound the objective of
  any solution that uses variable ``j`` from below by ``z_LP + r_j``; with a feasible incumbent from
  rounding the LP (a basic LP solution has at most one fractional layer per limit), every ``j`` with
  ``z_LP + r_j > z_inc`` is dropped. Exact, and it leaves HiGHS a few hundred variables at Puzzle scale.
- Cost rows are scaled by their limits (HiGHS's feasibility tolerance is absolute; runtimes in seconds
  are 1e-4). Every solution is re-checked against every constraint, one-variant-per-layer and the
  diversity rows on the original matrices ("trust but verify", as puzzletron does); a violation within
  the solver's tolerance is removed by re-solving with that limit lowered by twice the excess, and any
  other violation is an error.
- An infeasible problem raises :class:`InfeasibleError` naming each constraint that cannot be met
  together with the others and the best value it can reach (puzzletron returns an empty list).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

__all__ = ["InfeasibleError", "Solution", "brute_force", "dominated_mask", "solve_mip"]

_TOL = 1e-9  # tolerance of the re-check, as a share of each limit (HiGHS' own is 1e-6 absolute)


class InfeasibleError(ValueError):
    """No architecture meets every limit. ``best`` maps each violated constraint to the best value
    it can reach while the other constraints hold (or alone, when it cannot be met at all)."""

    def __init__(self, message: str, best: Mapping[str, float]):
        super().__init__(message)
        self.best = dict(best)


@dataclass(frozen=True)
class Solution:
    """One architecture: ``choice[i]`` is layer ``i``'s variant index."""

    choice: tuple[int, ...]
    objective: float
    totals: dict[str, float]  # summed cost per constraint name
    optimal: bool  # proven optimal (zero gap) by HiGHS
    seconds: float  # wall time of this solve (pruning + HiGHS + re-check)
    variables: int  # binary variables after pruning
    stats: dict = field(default_factory=dict)


def _as_arrays(scores, costs: Mapping[str, np.ndarray], limits: Mapping[str, float], allowed):
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty [layers, variants] matrix, got shape {scores.shape}")
    unknown = sorted(set(limits) - set(costs))
    if unknown:
        raise ValueError(f"limits for unknown cost(s) {unknown}; costs are {sorted(costs)}")
    mats = {}
    for name in limits:
        m = np.asarray(costs[name], dtype=np.float64)
        if m.shape != scores.shape:
            raise ValueError(f"cost {name!r} has shape {m.shape}, scores have {scores.shape}")
        if not np.isfinite(limits[name]):
            raise ValueError(f"limit {name!r} must be finite, got {limits[name]}")
        mats[name] = m
    mask = np.isfinite(scores)
    for name, m in mats.items():
        mask &= np.isfinite(m)
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != scores.shape:
            raise ValueError(f"allowed has shape {allowed.shape}, scores have {scores.shape}")
        mask &= allowed
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"layer(s) {empty.tolist()} have no allowed variant with finite score and costs")
    return scores, mats, mask


def dominated_mask(scores: np.ndarray, costs: Sequence[np.ndarray], mask: np.ndarray | None = None) -> np.ndarray:
    """``[layers, variants]`` bool: True where a variant is dominated within its layer.

    ``k`` dominates ``j`` when ``score[k] <= score[j]`` and ``cost[k] <= cost[j]`` for every cost, with
    one strict inequality, or when they are equal everywhere and ``k < j``. Only variants in ``mask``
    take part.

    >>> s = np.array([[0.0, 1.0, 1.0, 2.0]]); c = np.array([[4.0, 2.0, 3.0, 1.0]])
    >>> dominated_mask(s, [c]).tolist()
    [[False, False, True, False]]
    """
    stack = np.stack([scores, *costs], axis=-1)  # [L, V, 1 + C]
    L, V, _ = stack.shape
    mask = np.ones((L, V), dtype=bool) if mask is None else mask
    out = ~mask
    for i in range(L):
        idx = np.flatnonzero(mask[i])
        a = stack[i, idx]  # [n, D]
        le = (a[:, None, :] <= a[None, :, :]).all(-1)  # le[k, j]: k no worse than j everywhere
        lt = (a[:, None, :] < a[None, :, :]).any(-1)
        eq = le & le.T
        earlier = np.arange(len(idx))[:, None] < np.arange(len(idx))[None, :]
        dom = (le & lt) | (eq & earlier)  # dom[k, j]: k dominates j
        out[i, idx] = dom.any(axis=0)
    return out


def _reduced_cost_keep(scores, mats, limits, keep) -> np.ndarray:
    """Reduced-cost fixing at the root (exact): solve the LP relaxation, round it to a feasible
    incumbent ``z_inc``, and drop every variable whose reduced cost ``r_j`` proves that any solution
    using it costs more: ``z_LP + r_j > z_inc``. Returns the smaller ``keep`` mask (``keep`` itself when
    the LP or the rounding fails)."""
    from scipy.optimize import linprog

    L = scores.shape[0]
    li, vj = np.nonzero(keep)
    n = li.size
    c = scores[li, vj]
    a_eq = csr_matrix((np.ones(n), (li, np.arange(n))), shape=(L, n))
    names = list(mats)
    scale = np.array([_scale(limits[k], mats[k]) for k in names])
    a_ub = np.stack([mats[k][li, vj] for k in names]) / scale[:, None] if names else None
    b_ub = np.array([limits[k] for k in names]) / scale if names else None
    lp = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=np.ones(L), bounds=(0, 1), method="highs")
    if lp.status != 0:
        return keep
    y_eq = lp.eqlin.marginals
    reduced = c - a_eq.T @ y_eq
    if names:
        reduced = reduced - a_ub.T @ lp.ineqlin.marginals
    # incumbent: every integral layer as in the LP; the few fractional layers (at most one per limit
    # in a basic solution) tried over their LP support, best feasible combination kept
    x = lp.x
    choice = np.full(L, -1)
    support: dict[int, list[int]] = {}
    for j in np.flatnonzero(x > 1e-9):
        if x[j] > 1 - 1e-9:
            choice[li[j]] = vj[j]
        else:
            support.setdefault(int(li[j]), []).append(int(vj[j]))
    frac = sorted(support)
    if len(frac) > 6 or any(len(s) > 4 for s in support.values()):
        return keep
    best = None
    rows = np.arange(L)
    for combo in itertools.product(*(support[i] for i in frac)):
        trial = choice.copy()
        trial[frac] = combo
        if (trial < 0).any():
            return keep
        if all(mats[k][rows, trial].sum() <= limits[k] for k in names):
            value = scores[rows, trial].sum()
            if best is None or value < best:
                best = value
    if best is None:
        return keep
    tol = 1e-6 * max(1.0, abs(best))
    out = np.zeros_like(keep)
    ok = lp.fun + reduced <= best + tol
    out[li[ok], vj[ok]] = True
    return out


def _violations(choice, mats, limits) -> dict[str, float]:
    """Constraint violations of ``choice`` as shares of each limit's scale (beyond a 1e-9 tolerance)."""
    rows = np.arange(len(choice))
    out = {}
    for name, m in mats.items():
        excess = (float(m[rows, choice].sum()) - limits[name]) / _scale(limits[name], m)
        if excess > _TOL:
            out[name] = excess
    return out


def _verify(choice, scores, mats, limits, earlier, alpha) -> tuple[float, dict[str, float]]:
    L = scores.shape[0]
    rows = np.arange(L)
    objective = float(scores[rows, choice].sum())
    totals = {name: float(m[rows, choice].sum()) for name, m in mats.items()}
    for name in _violations(choice, mats, limits):
        raise AssertionError(f"MIP solution violates {name}: {totals[name]} > {limits[name]}")
    for y in earlier:
        overlap = int((np.asarray(y) == np.asarray(choice)).sum())
        if overlap > alpha * L + 1e-9:
            raise AssertionError(f"MIP solution shares {overlap} layers with an earlier one (> {alpha} x {L})")
    return objective, totals


def _scale(limit: float, row: np.ndarray) -> float:
    """Divisor that brings a cost row to order one (HiGHS's feasibility tolerance is absolute, and
    costs in seconds or bytes are far from one)."""
    if limit != 0:
        return abs(limit)
    top = float(np.abs(row[np.isfinite(row)]).max(initial=0.0))
    return top if top > 0 else 1.0


def _solve_once(scores, mats, limits, keep, earlier, alpha, time_limit, tighten=None):
    """HiGHS over the variants in ``keep``; returns (choice or None, result). ``tighten[name]`` lowers
    that limit by this share of its scale (used to push a solution off a tolerance-sized violation)."""
    L, V = scores.shape
    li, vj = np.nonzero(keep)  # variables in layer-major order
    n = li.size
    rows, lower, upper = [], [], []
    one_per_layer = csr_matrix((np.ones(n), (li, np.arange(n))), shape=(L, n))
    constraints = [LinearConstraint(one_per_layer, 1.0, 1.0)]
    if mats:
        names = list(mats)
        scale = np.array([_scale(limits[k], mats[k]) for k in names])
        dense = np.stack([mats[name][li, vj] for name in names]) / scale[:, None]
        rhs = np.array([limits[k] for k in names]) / scale - np.array([(tighten or {}).get(k, 0.0) for k in names])
        constraints.append(LinearConstraint(dense, -np.inf, rhs))
    for y in earlier:
        y = np.asarray(y)
        rows.append((vj == y[li]).astype(np.float64))
        lower.append(-np.inf)
        upper.append(np.floor(alpha * L + 1e-9))
    if rows:
        constraints.append(LinearConstraint(np.stack(rows), np.array(lower), np.array(upper)))
    options = {"mip_rel_gap": 0.0, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(scores[li, vj], constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1), options=options)
    if res.x is None:
        return None, res
    x = res.x > 0.5
    choice = np.full(L, -1)
    choice[li[x]] = vj[x]
    return choice, res


def _infeasibility(scores, mats, limits, mask, time_limit) -> InfeasibleError:
    """Explain an infeasible problem: for each constraint, the best value it reaches alone and, when
    that meets its limit, the best it reaches while all the others hold."""
    best: dict[str, float] = {}
    lines = []
    for name, m in mats.items():
        alone = float(np.where(mask, m, np.inf).min(axis=1).sum())
        if alone > limits[name]:
            best[name] = alone
            lines.append(f"{name} <= {limits[name]:.6g} is out of reach: the smallest possible is {alone:.6g}")
    if not best:  # each limit can be met alone: find which cannot be met together with the others
        for name, m in mats.items():
            others = {k: v for k, v in mats.items() if k != name}
            choice, _ = _solve_once(m, others, limits, mask, [], 1.0, time_limit)
            if choice is None:
                continue
            reach = float(m[np.arange(len(choice)), choice].sum())
            if reach > limits[name]:
                best[name] = reach
                lines.append(f"{name} <= {limits[name]:.6g} cannot hold with the other limits: "
                             f"the smallest possible with them is {reach:.6g}")
    if not lines:
        lines.append("no combination meets every limit (each pair can be met; the combination cannot)")
    return InfeasibleError("no architecture meets the targets: " + "; ".join(lines), best)


def solve_mip(scores, costs: Mapping[str, np.ndarray], limits: Mapping[str, float], *, n_solutions: int = 1,
              alpha: float = 0.8, allowed=None, prune: bool = True, time_limit: float | None = None) -> list[Solution]:
    """Solve the Puzzle MIP; up to ``n_solutions`` diverse solutions, best first.

    Args:
        scores: ``[layers, variants]`` quality cost to minimise (e.g. replace-1-block KL); ``inf``
            or ``nan`` marks a variant a layer does not have.
        costs: name -> ``[layers, variants]`` per-block cost.
        limits: name -> upper bound on the summed cost; only named costs are constrained.
        n_solutions: how many solutions; each later one shares at most ``alpha * layers`` layers
            with every earlier one (Puzzle's diversity constraint). Fewer are returned when no
            further diverse solution exists.
        allowed: optional ``[layers, variants]`` bool mask.
        prune: drop dominated variants before the first solve (exact; see the module docstring).
        time_limit: seconds per HiGHS call; a solution found by then is returned with
            ``optimal=False``.

    Raises :class:`InfeasibleError` when not even one architecture meets the limits.

    >>> s = np.array([[0.0, 1.0], [0.0, 3.0]]); c = np.array([[2.0, 1.0], [2.0, 1.0]])
    >>> solve_mip(s, {"runtime": c}, {"runtime": 3.0})[0].choice
    (1, 0)
    """
    if n_solutions < 1:
        raise ValueError(f"n_solutions must be >= 1, got {n_solutions}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    scores, mats, mask = _as_arrays(scores, costs, limits, allowed)
    solutions: list[Solution] = []
    earlier: list[np.ndarray] = []
    for k in range(n_solutions):
        t0 = time.perf_counter()
        keep = mask
        if prune and k == 0:
            keep = mask & ~dominated_mask(scores, list(mats.values()), mask)
            keep = _reduced_cost_keep(scores, mats, limits, keep)
        choice, res = _solve_once(scores, mats, limits, keep, earlier, alpha, time_limit)
        tighten: dict[str, float] = {}
        for _ in range(5):  # HiGHS accepts violations within its tolerance; we do not
            bad = _violations(choice, mats, limits) if choice is not None else {}
            if not bad:
                break
            for name, excess in bad.items():
                tighten[name] = tighten.get(name, 0.0) + 2 * excess + 1e-9
            choice, res = _solve_once(scores, mats, limits, keep, earlier, alpha, time_limit, tighten)
        if choice is None:
            if k == 0:
                if res.status == 2:
                    raise _infeasibility(scores, mats, limits, mask, time_limit)
                raise RuntimeError(f"HiGHS found no solution: {res.message}")
            break  # no further diverse solution
        objective, totals = _verify(choice, scores, mats, limits, earlier, alpha)
        solutions.append(Solution(
            choice=tuple(int(c) for c in choice), objective=objective, totals=totals,
            optimal=res.status == 0, seconds=time.perf_counter() - t0, variables=int(keep.sum()),
            stats={"status": int(res.status), "message": res.message,
                   "mip_gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
                   "nodes": int(getattr(res, "mip_node_count", 0) or 0)},
        ))
        earlier.append(choice)
    return solutions


def brute_force(scores, costs: Mapping[str, np.ndarray], limits: Mapping[str, float]) -> tuple[tuple[int, ...], float] | None:
    """Exhaustive optimum for tiny instances (tests): ``(choice, objective)`` or None if infeasible."""
    scores = np.asarray(scores, dtype=np.float64)
    L, V = scores.shape
    best = None
    for choice in itertools.product(range(V), repeat=L):
        idx = (np.arange(L), np.array(choice))
        if any(np.asarray(costs[n])[idx].sum() > limits[n] + 1e-9 for n in limits):
            continue
        value = float(scores[idx].sum())
        if best is None or value < best[1] - 1e-12:
            best = (tuple(choice), value)
    return best
