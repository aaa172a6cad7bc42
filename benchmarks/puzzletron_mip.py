"""Adapter: run NVIDIA Model-Optimizer's puzzletron MIP (PuLP + CBC) on a generic instance.

Benchmark-only peer, never a dependency of ``thinkfast``. Installed into the project venv with::

    .venv/bin/pip install nvidia-modelopt==0.47.0 --no-deps
    .venv/bin/pip install hydra-core omegaconf typeguard immutabledict fire nvidia-ml-py ninja requests pulp

(only ``pulp`` is needed by the code path used here; tested with nvidia-modelopt 0.47.0, PuLP 3.3.2 and
its bundled CBC 2.10 binary; torch/transformers were left untouched.)

What it calls: ``run_mip`` from ``modelopt/torch/puzzletron/mip/mip_with_multi_layer_replacements.py``,
the function ``run_puzzle.run_single_puzzle_config`` calls (as ``run_multi_layer_replacement_mip``)::

    run_mip(replacements: dict[id, dict], objective: str, constraints: dict[str, float | (min, max)],
            bigger_is_better: bool, max_seconds_per_solution: float | None = None) -> list[dict]

The package ``modelopt.torch.puzzletron`` imports its whole pipeline on import (torch, ``datasets``,
...), so the module file is loaded directly under a private package name together with its sibling
``mip/utils.py`` (its only other import); the code that runs is the installed file, unchanged.

Mapping of our arrays onto its inputs:

* one replacement per (layer i, variant j), ``parent_layer_indices=[i]`` (single-layer replacements; the
  peer adds ``sum_j x_ij == 1`` per layer), ``metrics.score = scores[i, j]``,
  ``stats.c<k> = costs[name_k][i, j]``; ``objective="metrics.score"``, ``bigger_is_better=False``.
* ``constraints={"stats.c<k>": limits[name_k]}`` -> the peer's ``sum x * cost <= max_cost`` (exactly
  our ``<=``; an infinite limit is skipped by the peer). Cost names go through ``c<k>`` because the
  peer reads keys as dotted paths.
* ``max_seconds_per_solution=time_limit_s`` -> ``PULP_CBC_CMD(timeLimit=..., msg=True)`` (wall clock,
  PuLP's default ``timeMode="elapsed"``; CBC's default single thread and zero gap).
* Non-finite scores: the peer drops those replacements (a forbidden variant). A variant with a
  non-finite cost gets score ``inf`` here so the peer drops it too (PuLP rejects inf coefficients).

Quirks of the peer (see the README of the benchmark / the report):

* It returns ``[]`` unless PuLP's status is "Optimal"; infeasible and "time limit without incumbent"
  are indistinguishable from the return value, so the PuLP status is captured by briefly wrapping
  ``pulp.LpProblem.solve`` during the call.
* PuLP maps CBC's "Stopped on time - objective value ..." to status *Optimal* (sol_status "Solution
  Found"), so ``run_mip`` returns a time-limited incumbent as if optimal; ``hit_time_limit`` reports it.
* With a very short time limit (~0.01 s on 80 x 54) CBC can run out of time inside preprocessing, print
  "Pre-processing says infeasible or unbounded" and write "Integer infeasible", which PuLP reports as
  "Infeasible" although the instance is feasible; a stop without incumbent is otherwise "Not Solved".
* If every variant of a layer is dropped, that layer silently vanishes from the peer's model; the
  adapter reports ``status="layer without variants"`` then.
* It returns one solution (no diversity / multiple solutions in this version).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

_PKG = "_puzzletron_mip_peer"
_MODULE = None


def _load():
    """The peer module ``mip_with_multi_layer_replacements`` (cached), loaded without the package init."""
    global _MODULE
    if _MODULE is None:
        spec = importlib.util.find_spec("modelopt")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("nvidia-modelopt is not installed")
        mip_dir = Path(list(spec.submodule_search_locations)[0]) / "torch" / "puzzletron" / "mip"
        if not (mip_dir / "mip_with_multi_layer_replacements.py").exists():
            raise ImportError(f"no puzzletron MIP module under {mip_dir}")
        pkg = types.ModuleType(_PKG)
        pkg.__path__ = [str(mip_dir)]
        sys.modules.setdefault(_PKG, pkg)
        _MODULE = importlib.import_module(f"{_PKG}.mip_with_multi_layer_replacements")
    return _MODULE


def available() -> bool:
    """True when the puzzletron ``run_mip`` (and PuLP's CBC) can be imported and run."""
    try:
        mod = _load()
        return bool(mod.pulp.PULP_CBC_CMD().available())
    except Exception:
        return False


def versions() -> dict:
    from importlib.metadata import version

    return {"nvidia-modelopt": version("nvidia-modelopt"), "pulp": version("pulp")}


@contextlib.contextmanager
def _fd_stdout_to(path):
    """Redirect fd 1 (CBC is a subprocess writing to the inherited stdout) into ``path``."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def solve_with_puzzletron(scores, costs, limits, time_limit_s=60.0, quiet=True) -> dict:
    """Minimise ``sum_i scores[i, choice[i]]`` s.t. ``sum_i costs[n][i, choice[i]] <= limits[n]`` via ``run_mip``.

    Returns ``choice`` (variant per layer, or None), ``objective`` (the peer's ``total_value``),
    ``seconds`` (wall time of the ``run_mip`` call: PuLP model build + MPS write + CBC + read back),
    ``status`` (PuLP's status string as seen by ``run_mip``, e.g. "Optimal", "Infeasible",
    "Not Solved", except that a time-limited incumbent, which PuLP calls "Optimal", is reported as
    "Stopped on time limit (...)"), ``hit_time_limit``, plus ``pulp_status`` (raw), ``sol_status``
    (PuLP's, e.g. "Optimal Solution Found" / "Solution Found"), ``cbc_result`` (CBC's "Result - ..." /
    "Problem is ..." line, only when ``quiet``) and ``solver_seconds`` (the ``LpProblem.solve`` call only).
    ``quiet`` hides CBC's log (the peer forces ``msg=True``).
    """
    mod = _load()
    pulp = mod.pulp
    scores = np.asarray(scores, dtype=np.float64)
    n_layers, n_variants = scores.shape
    names = list(limits)
    cost_arrays = [np.asarray(costs[n], dtype=np.float64) for n in names]
    bad = np.zeros(scores.shape, dtype=bool)
    for c in cost_arrays:
        assert c.shape == scores.shape
        bad |= ~np.isfinite(c)

    replacements = {}
    for i in range(n_layers):
        for j in range(n_variants):
            replacements[f"layer{i}_variant{j}"] = {
                "parent_layer_indices": [i],
                "layer": i,
                "variant": j,
                "metrics": {"score": float("inf") if bad[i, j] else float(scores[i, j])},
                "stats": {f"c{k}": 0.0 if bad[i, j] else float(c[i, j]) for k, c in enumerate(cost_arrays)},
            }
    constraints = {f"stats.c{k}": float(limits[n]) for k, n in enumerate(names)}

    captured = {}
    orig_solve = pulp.LpProblem.solve

    def solve(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return orig_solve(self, *args, **kwargs)
        finally:
            captured.update(status=self.status, sol_status=self.sol_status,
                            solver_seconds=time.perf_counter() - t)

    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        pulp.LpProblem.solve = solve
        try:
            with _fd_stdout_to(log_path) if quiet else contextlib.nullcontext():
                t0 = time.perf_counter()
                try:
                    solutions = mod.run_mip(replacements, objective="metrics.score", constraints=constraints,
                                            bigger_is_better=False, max_seconds_per_solution=time_limit_s)
                    error = None
                except (AssertionError, pulp.PulpError) as e:  # the peer's "trust but verify" asserts
                    solutions, error = [], f"{type(e).__name__}: {e}"
                seconds = time.perf_counter() - t0
        finally:
            pulp.LpProblem.solve = orig_solve
        log = Path(log_path).read_text() if quiet and os.path.exists(log_path) else ""

    cbc_result = next((l.strip() for l in log.splitlines() if l.startswith(("Result - ", "Problem is ", "Pre-processing says"))), None)
    status = pulp.LpStatus.get(captured.get("status"), "no solve call")
    sol_status = pulp.LpSolution.get(captured.get("sol_status"), None)
    hit_time_limit = (captured.get("sol_status") == pulp.LpSolutionIntegerFeasible  # "Stopped on time - obj."
                      or captured.get("status") == pulp.LpStatusNotSolved  # "Stopped on time (no integer ...)"
                      or (cbc_result is not None and "time limit" in cbc_result.lower()))
    out = {"choice": None, "objective": None, "seconds": seconds,
           # PuLP says "Optimal" for a time-limited incumbent too; don't pass that on as optimal
           "status": f"Stopped on time limit (PuLP: {status} / {sol_status})" if hit_time_limit else status,
           "hit_time_limit": bool(hit_time_limit), "pulp_status": status, "sol_status": sol_status,
           "cbc_result": cbc_result, "solver_seconds": captured.get("solver_seconds")}
    if error is not None:
        out["status"] = f"{status} ({error})"
    if solutions:
        (sol,) = solutions
        choice = [None] * n_layers
        for r in sol["chosen_replacements"]:
            choice[r["layer"]] = r["variant"]
        if any(c is None for c in choice):
            out["status"] = "layer without variants"
        else:
            out["choice"] = [int(c) for c in choice]
            out["objective"] = float(sol["total_value"])
    return out


# ----------------------------------------------------------------------------------------------- self-test

def _random_instance(n_layers, n_variants, n_costs, tightness, seed):
    """Variant 0 = parent (score 0, most expensive); others cheaper with larger scores."""
    rng = np.random.default_rng(seed)
    frac = rng.uniform(0.05, 1.0, (n_costs, n_layers, n_variants))
    frac[:, :, 0] = 1.0
    parent = rng.uniform(1.0, 3.0, (n_costs, n_layers, 1))
    cost_arr = frac * parent
    removed = 1.0 - frac.mean(axis=0)
    scores = removed * rng.lognormal(0.0, 1.0, (n_layers, 1)) * rng.uniform(0.5, 1.5, (n_layers, n_variants))
    scores[:, 0] = 0.0
    names = ["memory", "runtime", "kv_cache"][:n_costs] + [f"cost{k}" for k in range(3, n_costs)]
    costs = {n: cost_arr[k] for k, n in enumerate(names)}
    limits = {n: tightness * costs[n][:, 0].sum() for n in names}
    return scores, costs, limits


def _brute_force(scores, costs, limits):
    import itertools

    best, best_choice = np.inf, None
    rows = np.arange(scores.shape[0])
    for choice in itertools.product(range(scores.shape[1]), repeat=scores.shape[0]):
        c = np.array(choice)
        if all(costs[n][rows, c].sum() <= limits[n] for n in limits):
            v = scores[rows, c].sum()
            if v < best:
                best, best_choice = v, list(choice)
    return best_choice, best


def _feasible(choice, costs, limits):
    rows = np.arange(len(choice))
    return all(costs[n][rows, choice].sum() <= limits[n] * (1 + 1e-9) for n in limits)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="also time an 80 x 54 instance with 3 constraints")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--tightness", type=float, default=0.52)
    args = ap.parse_args()

    assert available(), "puzzletron MIP not importable"
    print("versions:", versions())
    for seed in range(3):
        s, c, l = _random_instance(6, 5, 2, 0.6, seed)
        r = solve_with_puzzletron(s, c, l, time_limit_s=30)
        bf_choice, bf_obj = _brute_force(s, c, l)
        assert r["choice"] is not None and _feasible(r["choice"], c, l), r
        assert np.isclose(r["objective"], bf_obj, rtol=1e-9, atol=1e-9), (r, bf_obj, bf_choice)
        print(f"small seed={seed}: ok objective={r['objective']:.6f} brute={bf_obj:.6f} status={r['status']} "
              f"{r['seconds']:.3f}s")
    # infeasible: limit below the cheapest possible total
    s, c, l = _random_instance(6, 5, 2, 0.6, 0)
    l = dict(l, memory=0.5 * c["memory"].min(axis=1).sum())
    r = solve_with_puzzletron(s, c, l, time_limit_s=30)
    assert r["choice"] is None, r
    print(f"infeasible: choice=None status={r['status']} cbc={r['cbc_result']!r}")

    if args.big:
        s, c, l = _random_instance(80, 54, 3, args.tightness, 0)
        r = solve_with_puzzletron(s, c, l, time_limit_s=args.time_limit)
        ok = r["choice"] is not None and _feasible(r["choice"], c, l)
        print(f"80x54x3 random (tightness {args.tightness}): seconds={r['seconds']:.2f} "
              f"solver_seconds={r['solver_seconds']:.2f} status={r['status']} sol_status={r['sol_status']} "
              f"hit_time_limit={r['hit_time_limit']} feasible={ok} objective={r['objective']} "
              f"cbc={r['cbc_result']!r}")
