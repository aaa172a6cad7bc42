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
``sum runtime <= batch * seq / T``). :mod:`thinkfast.puzzle.targets` does those conversions; this
module only knows named cost matrices and limits.

Solver: our own exact *Lagrangian reduced-cost enumeration*, proven optimal (zero gap), raced by
SciPy's HiGHS (``scipy.optimize.milp``, zero relative gap), which is also the fallback and
``method="highs"``. At Puzzle scale (126 layers x 54 variants, three binding limits) it takes about a
tenth of a second where HiGHS takes one to three and puzzletron's PuLP/CBC more (``benchmarks/mip.py``).
How it works:

1. Dominated variants are removed (below).
2. The LP relaxation (HiGHS's LP solver, milliseconds) gives multipliers ``lam >= 0`` for the limit
   rows. With ``red = score + lam . cost`` and ``r[i, j] = red[i, j] - min_j red[i, j]``, every
   feasible architecture costs at least ``z_lag + sum_i r[i, x_i]``, where ``z_lag`` is the LP bound.
   So an architecture within ``gap`` of ``z_lag`` only uses variants with ``r <= gap``: at Puzzle
   scale one to three per layer, most layers exactly one.
3. Breadth-first enumeration over the layers left with a choice, pruning a partial architecture when
   its remaining layers cannot fit the limits or when a Lagrangian bound on its final gap (several
   multiplier vectors around ``lam``) exceeds ``gap``; partial architectures with identical usage
   are merged. What survives to the last layer is every architecture within ``gap``; the cheapest
   is optimal once ``gap`` is at least the optimum's own gap.
4. ``gap``: a beam-limited pass (the 50 best partial states per layer) gives an incumbent (an upper
   bound); exact passes then run with a growing gap starting well below it, and the first that finds
   anything has found the optimum.
   When every score is a multiple of one quantum ``q`` (scores rounded to a grid; many tied
   architectures), so is every objective: the bound rounds up to the grid, the incumbent is optimal
   as soon as it sits on the first level above the LP bound, and the exact passes walk the levels
   (HiGHS's "objective integrality" does the same).
   If the state count would pass a budget (several million states: many exact ties, or a weak
   bound), HiGHS solves the problem restricted to the variants with ``r`` within the incumbent's
   gap (reduced-cost fixing, exact).
5. The race (default, :class:`_Race`): HiGHS runs beside the enumeration in a thread, first over the
   whole problem for at most ``race_quick`` (0.1 s), then, if the enumeration has run ``race_delay``
   (0.1 s), over that same restricted set; whichever proves an optimum first answers. On instances
   with many near-tied architectures (the ``flat`` family of ``benchmarks/mip_instances.py``) the
   exact passes can take seconds while HiGHS over the restricted set (a few hundred variables) takes
   a fraction of one. Ties between optima may resolve differently depending on who answers; the
   objective is the same.

Our design, not the papers' (both use an off-the-shelf MIP solver); it is exact, so it departs in
speed only. The tests check it against brute force on small instances and against HiGHS at Puzzle
scale, ties included.

Departures / additions:
- Dominated variants are removed before the solve: ``j`` is dominated in its layer when another
  variant is no worse in score and in every constrained cost (diversity rows included) and strictly
  better in one (ties keep the lower index). An optimal solution never needs a dominated variant,
  so the optimum is unchanged (a test checks it against brute force); it shrinks Puzzle-sized
  instances several-fold.
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

__all__ = ["InfeasibleError", "Solution", "brute_force", "dominated_mask", "finish_races", "solve_mip"]

_TOL = 1e-9  # tolerance of the re-check, as a share of each limit (HiGHS' own is 1e-6 absolute)
_FEAS = 1e-12  # feasibility tolerance of the enumeration on the scaled rows (each limit is 1)


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
    optimal: bool  # proven optimal (zero gap): always by the enumeration; by HiGHS unless time-limited
    seconds: float  # wall time of this solve (pruning + solve + re-check)
    variables: int  # variants left after dominance pruning (after reduced-cost fixing when HiGHS took over)
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
        if np.isnan(limits[name]) or limits[name] == -np.inf:  # a target computed from NaN, or unreachable
            raise InfeasibleError(f"no architecture meets the targets: {name} <= {limits[name]} cannot be met",
                                  {name: float(np.where(np.isfinite(m), m, np.inf).min(axis=1).sum())})
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
    L, V = scores.shape
    mask = np.ones((L, V), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    le = np.ones((L, V, V), dtype=bool)  # le[i, k, j]: k no worse than j everywhere
    lt = np.zeros((L, V, V), dtype=bool)  # lt[i, k, j]: k strictly better than j somewhere
    for f in (scores, *costs):
        f = np.where(mask, f, np.inf)
        if (f == f[:1]).all():  # the same in every layer (costs of a parent whose layers share a shape)
            f = f[:1]
        le &= f[:, :, None] <= f[:, None, :]
        lt |= f[:, :, None] < f[:, None, :]
    eq = le & le.transpose(0, 2, 1)
    earlier = np.arange(V)[:, None] < np.arange(V)[None, :]
    dom = ((le & lt) | (eq & earlier)) & mask[:, :, None]  # dom[i, k, j]: allowed k dominates j
    return ~mask | dom.any(axis=1)


_TS = np.array([0.0, 0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0])  # multiplier scales of the bounds


class _TooLarge(Exception):
    """The enumeration outgrew its state cap (the caller falls back to HiGHS over ``keep``, the
    variants the Lagrangian bound leaves when an incumbent is known)."""

    def __init__(self, message: str, keep=None):
        super().__init__(message)
        self.keep = keep


@dataclass
class _Lagrange:
    """The LP relaxation's duals turned into a per-variable bound (see :func:`_lagrange`)."""

    lam: np.ndarray  # [C] multipliers of the scaled cost rows (>= 0)
    r: np.ndarray  # [L, V] reduced cost above the layer's cheapest, inf outside ``keep``
    zlag: float  # lower bound on the objective of every feasible solution


def _lagrange(scores, A, b, keep):
    """Solve the LP relaxation over ``keep`` and return its Lagrangian bound, or the LP's status
    (2: infeasible, so the MIP is too; anything else: no usable duals) when it fails.

    With multipliers ``lam >= 0`` on the rows ``A x <= b``, every feasible ``x`` satisfies
    ``score . x = zlag + sum_i r[i, x_i] + lam . (b - A x) >= zlag + sum_i r[i, x_i]``, where
    ``red = score + lam . A``, ``m_i = min_j red[i, j]``, ``r = red - m`` and ``zlag = sum m - lam . b``.
    The LP's duals make ``zlag`` the LP bound."""
    from scipy.optimize import linprog

    L = scores.shape[0]
    li, vj = np.nonzero(keep)
    n = li.size
    a_eq = csr_matrix((np.ones(n), (li, np.arange(n))), shape=(L, n))
    if len(b):
        lp = linprog(scores[li, vj], A_ub=A[:, li, vj], b_ub=b, A_eq=a_eq, b_eq=np.ones(L), bounds=(0, 1),
                     method="highs")
        if lp.status != 0:
            return lp.status
        lam = np.maximum(-np.asarray(lp.ineqlin.marginals, dtype=np.float64), 0.0)
    else:
        lam = np.zeros(0)
    red = np.where(keep, scores + np.einsum("c,clv->lv", lam, A), np.inf)
    m = red.min(axis=1)
    return _Lagrange(lam=lam, r=red - m[:, None], zlag=float(m.sum() - lam @ b))


def _quantum(values: np.ndarray, layers: int) -> float | None:
    """The largest ``q`` (a whole number over a power of ten, down to 1e-6) with every value a whole
    multiple of it, or None (values off any such grid, all zero, or too large to sum exactly). Then
    every objective is a multiple of ``q`` too, and a bound rounds up to the grid (HiGHS detects the
    same "objective integrality")."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    for k in range(7):
        m = v * 10.0**k
        ints = np.round(m)
        if np.abs(ints).max() * layers >= 2.0**52:
            return None
        if (np.abs(m - ints) <= 1e-9 * np.maximum(1.0, np.abs(m))).all():
            g = int(np.gcd.reduce(np.abs(ints).astype(np.int64)))
            return g / 10.0**k if g else None
    return None


def _enumerate(scores, A, b, lag: _Lagrange, gap: float, *, beam: int | None = None, cap: int = 4_000_000,
               budget: int | None = None, poll=None):
    """Every solution whose objective is within ``gap`` of ``lag.zlag``, by breadth-first expansion
    of partial assignments, and the best of them: ``(objective, choice, states)``, or ``(inf, None,
    states)`` when there is none.

    Only variants with ``r <= gap`` can take part (``r`` alone bounds the gap from below). Layers
    left with one candidate are fixed; the others are expanded in order of how much their
    candidates' costs differ (priced by ``lam``), so the constraints bite early. A partial state
    (accumulated ``R = sum r``, usage ``U``) is dropped when the rest cannot fit (``U`` plus the
    least usage of the remaining layers exceeds ``b``) or when a Lagrangian bound on its final gap
    exceeds ``gap``: for any ``mu >= 0`` the gap of a completion is at least
    ``R + sum_rest min_j (r + (mu - lam) . a) - (mu - lam) . (b - U)``, taken over ``mu`` in a few
    multiples of ``lam`` and ``lam`` tilted towards or away from each constraint. Of states with
    equal usage (layers often share costs) only the cheapest is kept: they have the same
    completions. At a full assignment the ``mu = 0`` bound is the exact gap, so the survivors are
    exactly the solutions within ``gap``. ``beam`` keeps only the best partial
    states (a heuristic used for the incumbent); ``cap`` bounds ``states x candidates`` per layer
    and ``budget`` all states; beyond either it raises :class:`_TooLarge`. ``poll()`` is called once per
    layer (the race with HiGHS)."""
    L = scores.shape[0]
    n_c = len(b)
    # multipliers mu: multiples of lam, and lam with one constraint's multiplier halved or raised by half
    tilts = np.ones((2 * n_c, n_c))
    tilts[np.arange(2 * n_c), np.repeat(np.arange(n_c), 2)] = np.tile([0.5, 1.5], n_c)
    mus = np.concatenate([_TS[:, None] * np.ones((1, n_c)), tilts]) * lag.lam[None, :]
    nus = mus - lag.lam[None, :]  # [T, C]
    cand = np.isfinite(lag.r) & (lag.r <= gap)
    opts = [np.flatnonzero(cand[i]) for i in range(L)]
    if any(o.size == 0 for o in opts):
        return np.inf, None, 0
    fixed = np.array([o.size == 1 for o in opts])
    choice = np.array([o[0] for o in opts])
    rows = np.flatnonzero(fixed)
    C0 = float(scores[rows, choice[rows]].sum())
    U0 = A[:, rows, choice[rows]].sum(axis=1) if n_c else np.zeros(0)
    free = np.flatnonzero(~fixed)
    if n_c:
        spread = [-(lag.lam @ (A[:, i, opts[i]].max(1) - A[:, i, opts[i]].min(1))) for i in free]
        free = free[np.argsort(spread, kind="stable")]
    F = free.size
    umin = np.zeros((F + 1, n_c))  # least usage of layers p.. of the free order
    S = np.zeros((F + 1, len(nus)))  # sum over layers p.. of min_j (r + nu . a), per nu
    for p in range(F - 1, -1, -1):
        i, o = free[p], opts[free[p]]
        umin[p] = umin[p + 1] + A[:, i, o].min(axis=1)
        S[p] = S[p + 1] + (lag.r[i, o][None, :] + nus @ A[:, i, o]).min(axis=1)
    if ((U0 + umin[0]) > b + _FEAS).any():
        return np.inf, None, 0
    R0 = float(lag.r[rows, choice[rows]].sum())  # 0 in practice: a lone candidate is its layer's minimum
    R, U, Cs = np.array([R0]), U0[None, :].copy(), np.array([C0])
    back = []
    states = 1
    for p, i in enumerate(free):
        if poll is not None:
            poll()
        o = opts[i]
        k = o.size
        if R.size * k > cap:
            raise _TooLarge(f"{R.size} partial states x {k} candidates at layer {i}")
        R2 = (R[:, None] + lag.r[i, o][None, :]).reshape(-1)
        U2 = (U[:, None, :] + A[:, i, o].T[None, :, :]).reshape(R.size * k, n_c)
        C2 = (Cs[:, None] + scores[i, o][None, :]).reshape(-1)
        lb = R2 + (S[p + 1][None, :] - (b - U2) @ nus.T).max(axis=1) if n_c else R2 + S[p + 1, 0]
        ok = (lb <= gap) & ((U2 + umin[p + 1]) <= b + _FEAS).all(axis=1)
        idx = np.flatnonzero(ok)
        if n_c and idx.size > 1:  # states with the same usage share every completion: keep the cheapest
            key = np.round(U2[idx], 12)
            order = np.lexsort((C2[idx], *key.T[::-1]))
            ks = key[order]
            first = np.ones(order.size, dtype=bool)
            first[1:] = (ks[1:] != ks[:-1]).any(axis=1)
            idx = np.sort(idx[order[first]])
        if beam is not None and idx.size > beam:
            idx = idx[np.argpartition(lb[idx], beam)[:beam]]
        if idx.size == 0:
            return np.inf, None, states
        back.append((idx // k, o[idx % k]))
        R, U, Cs = R2[idx], U2[idx], C2[idx]
        states += idx.size
        if budget is not None and states > budget:
            raise _TooLarge(f"more than {budget} partial states")
    j = int(np.argmin(Cs))
    best = float(Cs[j])
    out = choice.copy()
    for p in range(F - 1, -1, -1):
        parent, option = back[p]
        out[free[p]] = option[j]
        j = int(parent[j])
    return best, out, states


def _solve_enumeration(scores, A, b, keep, *, beam: int = 50, gap0: float = 2e-3, deepen: float = 0.1,
                       budget: int = 3_000_000, race: "_Race | None" = None):
    """Proven-optimal solve by Lagrangian reduced-cost enumeration (module docstring). Returns
    ``(choice, stats)``; ``choice`` is None with ``stats["lp_status"] == 2`` when even the LP
    relaxation is infeasible. Raises :class:`_TooLarge` when the exact pass would not fit in memory
    (the caller then falls back to HiGHS over the variants the bound leaves). With a ``race``, HiGHS
    may start beside it over the variants that can still be optimal (:class:`_Race`)."""
    poll = race.poll if race is not None else None
    lag = _lagrange(scores, A, b, keep)
    if not isinstance(lag, _Lagrange):
        return None, {"lp_status": int(lag)}
    sc = np.where(keep, scores, np.inf)
    scale = max(1.0, abs(lag.zlag))
    # incumbent: beam search within a small gap, widened until it finds one
    z_inc, choice, states = np.inf, None, 0
    for gap in (gap0 * scale, 16 * gap0 * scale, 256 * gap0 * scale, np.inf):
        z_inc, choice, n = _enumerate(sc, A, b, lag, gap, beam=beam, poll=poll)
        states += n
        if choice is not None:
            break
    if choice is None:  # no feasible solution found heuristically: let the exact pass decide
        raise _TooLarge("the beam search found no feasible solution")
    stats = {"lp_bound": lag.zlag, "incumbent_gap": z_inc - lag.zlag}
    tol = 1e-9 * max(1.0, abs(z_inc))
    top = z_inc - lag.zlag + tol
    if race is not None:  # an optimum uses only variants within the incumbent's gap (reduced-cost fixing)
        race.keep = keep & np.isfinite(lag.r) & (lag.r <= top)
    # objective on a grid (every score a multiple of q): every objective is too, so the bound rounds up
    q = _quantum(sc[keep], scores.shape[0])

    def least_gap(covered: float) -> float:  # the least gap left once every gap <= covered held nothing
        return -np.inf if q is None else np.ceil((lag.zlag + covered - tol) / q) * q - lag.zlag

    floor = least_gap(0.0)
    if q is not None:
        stats["quantum"] = q
    # exact passes with a growing gap: the first that finds a solution has found the optimum (a
    # better one would lie within the same gap); the incumbent's gap is the last resort. On a grid the
    # incumbent is optimal once every level below its own holds nothing.
    gap = min(top, max(deepen * gap0 * scale, floor + tol))
    while z_inc - lag.zlag > max(1e-12 * scale, floor + tol):  # else the incumbent meets the bound: optimal
        try:
            z, best, n = _enumerate(sc, A, b, lag, gap, budget=budget - states, poll=poll)
        except _TooLarge as e:
            raise _TooLarge(str(e), keep=keep & np.isfinite(lag.r) & (lag.r <= top)) from None
        states += n
        if best is not None and z < z_inc:
            z_inc, choice = z, best
        if best is not None or gap >= top:
            break
        floor = least_gap(gap)
        gap = min(top, max(1.4 * gap, floor + tol))
    stats["candidates"] = int((lag.r <= gap).sum())
    stats["final_gap"] = float(gap)
    stats["states"] = states
    return choice, stats


class _HighsWon(Exception):
    """HiGHS, racing beside the enumeration, proved an optimum first."""


class _Race:
    """HiGHS in background threads beside the enumeration, so that the solve is never much slower than
    HiGHS alone (HiGHS releases the GIL while it solves, so they run in parallel on two cores).

    Two runs, one after the other: at once, HiGHS over the whole problem with a short time limit
    (``quick`` seconds: instances HiGHS proves that fast, many exact ties for example, are answered by
    it, here within about 20 ms of HiGHS alone); then, once that has ended, the enumeration has run ``delay`` seconds and has an incumbent,
    HiGHS over the variants within the incumbent's Lagrangian gap, which an optimum cannot leave
    (``keep``; far fewer variables, so HiGHS proves the optimum much sooner than over all of them), or
    over every variant (``full``) if no incumbent exists after ``5 * delay`` (at least 0.25 s). The first
    to prove an optimum wins; a HiGHS run the enumeration beats is left to finish in the background
    (SciPy cannot cancel it; the quick run ends by its time limit) and its answer is dropped."""

    def __init__(self, delay: float, solve, full, quick: float, time_limit: float | None):
        self.t0, self.delay, self.solve, self.full = time.perf_counter(), delay, solve, full
        self.time_limit = time_limit
        self.keep = None
        self.threads: list = []
        self.second = False
        self.result = None  # (choice, res, stats, variants given) once HiGHS proved an optimum (or infeasibility)
        if quick > 0:
            self._start(full, quick if time_limit is None else min(quick, time_limit))

    def _start(self, keep, limit) -> None:
        import threading

        global _JOIN_AT_EXIT
        if not _JOIN_AT_EXIT:  # a daemon thread still inside HiGHS when Python exits aborts the process
            import atexit

            atexit.register(finish_races)
            _JOIN_AT_EXIT = True
        thread = threading.Thread(target=self._run, args=(keep.copy(), limit), daemon=True, name="thinkfast-highs-race")
        self.threads.append(thread)
        thread.start()

    def _run(self, keep, limit):
        try:
            choice, res, stats = self.solve(keep, limit)
        except Exception:  # noqa: BLE001 - the enumeration still answers
            return
        if res.status in (0, 2) and self.result is None:
            self.result = (choice, res, stats, keep)

    def poll(self) -> None:
        if self.result is not None:
            raise _HighsWon()
        if self.second or any(t.is_alive() for t in self.threads):
            return
        elapsed = time.perf_counter() - self.t0
        keep = self.keep if self.keep is not None else self.full if elapsed >= max(5 * self.delay, 0.25) else None
        if keep is not None and elapsed >= self.delay:
            self.second = True
            self._start(keep, self.time_limit)

    def wait(self):
        """HiGHS's answer once its runs end (the enumeration gave up), or None when none proved one."""
        for thread in self.threads:
            thread.join()
        return self.result


_JOIN_AT_EXIT = False


def finish_races() -> None:
    """Wait for HiGHS runs that lost a race and still run in the background (before timing anything)."""
    import threading

    for thread in threading.enumerate():
        if thread.name == "thinkfast-highs-race":
            thread.join()


def _solve_highs(scores, mats, limits, keep, earlier, alpha, time_limit):
    """HiGHS over ``keep``, re-solved with a limit lowered where its answer breaks a limit within HiGHS's
    tolerance (we accept no violation): ``(choice or None, result, stats)``."""
    choice, res = _solve_once(scores, mats, limits, keep, earlier, alpha, time_limit)
    tighten: dict[str, float] = {}
    for _ in range(5):
        bad = _violations(choice, mats, limits) if choice is not None else {}
        if not bad:
            break
        for name, excess in bad.items():
            tighten[name] = tighten.get(name, 0.0) + 2 * excess + 1e-9
        choice, res = _solve_once(scores, mats, limits, keep, earlier, alpha, time_limit, tighten)
    stats = {"method": "highs", "status": int(res.status), "message": res.message,
             "mip_gap": float(getattr(res, "mip_gap", 0.0) or 0.0),
             "nodes": int(getattr(res, "mip_node_count", 0) or 0)}
    return choice, res, stats


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
              alpha: float = 0.8, allowed=None, prune: bool = True, time_limit: float | None = None,
              method: str = "auto", race_delay: float = 0.1, race_quick: float = 0.1) -> list[Solution]:
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
            ``optimal=False``. The enumeration has no time limit (it is exact or hands over).
        method: ``"auto"`` (Lagrangian reduced-cost enumeration raced by HiGHS: over the whole problem
            for its first ``race_quick`` seconds, then over the variants the incumbent's gap leaves once
            the enumeration has run ``race_delay`` seconds; handing over to HiGHS when its state count
            would not fit in memory), ``"enumeration"`` (the same without the race) or ``"highs"``
            (HiGHS's branch and cut only).

    Raises :class:`InfeasibleError` when not even one architecture meets the limits, and for a
    NaN or ``-inf`` limit.

    >>> s = np.array([[0.0, 1.0], [0.0, 3.0]]); c = np.array([[2.0, 1.0], [2.0, 1.0]])
    >>> solve_mip(s, {"runtime": c}, {"runtime": 3.0})[0].choice
    (1, 0)
    """
    if n_solutions < 1:
        raise ValueError(f"n_solutions must be >= 1, got {n_solutions}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if method not in ("auto", "enumeration", "highs"):
        raise ValueError(f"method must be 'auto', 'enumeration' or 'highs', got {method!r}")
    scores, mats, mask = _as_arrays(scores, costs, limits, allowed)
    L = scores.shape[0]
    names = list(mats)
    solutions: list[Solution] = []
    earlier: list[np.ndarray] = []
    for k in range(n_solutions):
        t0 = time.perf_counter()
        # rows A x <= b: cost rows scaled by their limits, then one row per earlier solution
        rows = [mats[n] / _scale(limits[n], mats[n]) for n in names]
        rhs = [limits[n] / _scale(limits[n], mats[n]) for n in names]
        for y in earlier:
            rows.append((np.arange(scores.shape[1])[None, :] == y[:, None]).astype(np.float64))
            rhs.append(float(np.floor(alpha * L + 1e-9)))
        A = np.stack(rows) if rows else np.zeros((0, *scores.shape))
        b = np.array(rhs, dtype=np.float64)
        keep = mask & ~dominated_mask(scores, list(A), mask) if prune else mask
        choice, res, stats = None, None, {}
        enumerated = method != "highs"
        race = None
        if enumerated:
            if method == "auto":
                race = _Race(race_delay, lambda kp, tl, e=list(earlier): _solve_highs(scores, mats, limits, kp, e,
                                                                                       alpha, tl),
                             keep, race_quick, time_limit)
            try:
                choice, stats = _solve_enumeration(scores, A, b, keep, race=race)
                if choice is None and stats["lp_status"] != 2:
                    raise _TooLarge("the LP relaxation failed")
                stats["method"] = "enumeration"
            except _HighsWon:
                enumerated = False
                choice, res, stats, keep = race.result
                stats["race"] = "HiGHS finished first"
            except _TooLarge as e:
                enumerated, stats = False, {"fallback": str(e)}
                if e.keep is not None:
                    keep = e.keep
                # HiGHS is already on the restricted set: wait for it (the quick run over all variables
                # would only be slower than solving the restricted set now)
                won = race.wait() if race is not None and race.second else None
                if won is not None:
                    choice, res, more, keep = won
                    stats.update(more)
        if not enumerated and res is None:
            choice, res, more = _solve_highs(scores, mats, limits, keep, earlier, alpha, time_limit)
            stats.update(more)
        if choice is None:
            if k == 0:
                if enumerated or res.status == 2:
                    raise _infeasibility(scores, mats, limits, mask, time_limit)
                raise RuntimeError(f"HiGHS found no solution: {res.message}")
            break  # no further diverse solution
        objective, totals = _verify(choice, scores, mats, limits, earlier, alpha)
        solutions.append(Solution(
            choice=tuple(int(c) for c in choice), objective=objective, totals=totals,
            optimal=enumerated or res.status == 0, seconds=time.perf_counter() - t0,
            variables=int(keep.sum()), stats=stats,
        ))
        earlier.append(np.asarray(choice))
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
