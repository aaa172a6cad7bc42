"""The Puzzle MIP: equals brute force, honours diversity, reports infeasibility, verifies solutions."""

import sys
from pathlib import Path

import numpy as np
import pytest

from thinkfast.puzzle import mip
from thinkfast.puzzle.mip import InfeasibleError, brute_force, dominated_mask, solve_mip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mip_instances import instance  # noqa: E402


def _random(rng, layers, variants, n_costs):
    scores = rng.random((layers, variants))
    scores[:, 0] = 0.0  # the parent block: best score, highest cost
    costs = {}
    for c in range(n_costs):
        m = rng.random((layers, variants)) * 0.8
        m[:, 0] = 1.0
        costs[f"c{c}"] = m
    limits = {k: float(v.sum(axis=1).mean() * layers / variants * rng.uniform(0.8, 1.2)) for k, v in costs.items()}
    return scores, costs, limits


@pytest.mark.parametrize("seed", range(30))
def test_mip_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers, variants = int(rng.integers(2, 6)), int(rng.integers(2, 6))
    scores, costs, limits = _random(rng, layers, variants, int(rng.integers(1, 4)))
    if seed % 5 == 4:  # costs in seconds (1e-4): far below HiGHS's absolute feasibility tolerance
        costs = {k: v * 1e-5 for k, v in costs.items()}
        limits = {k: v * 1e-5 for k, v in limits.items()}
    # ties in score make pruning's tie rule matter
    if seed % 3 == 0:
        scores = np.round(scores, 1)
    exact = brute_force(scores, costs, limits)
    for prune, method in ((True, "auto"), (False, "auto"), (True, "highs"), (False, "highs")):
        if exact is None:
            with pytest.raises(InfeasibleError):
                solve_mip(scores, costs, limits, prune=prune, method=method)
            continue
        sol = solve_mip(scores, costs, limits, prune=prune, method=method)[0]
        # auto: the enumeration, or the HiGHS run racing it when that proves the optimum first
        assert sol.stats["method"] == "highs" if method == "highs" else (
            sol.stats["method"] == "enumeration" or sol.stats["race"] == "HiGHS finished first")
        assert sol.optimal
        assert sol.objective == pytest.approx(exact[1], abs=1e-9)
        for name, total in sol.totals.items():
            assert total <= limits[name] + 1e-7
        rows = np.arange(layers)
        assert sol.objective == pytest.approx(scores[rows, list(sol.choice)].sum())


def test_quantum_of_scores():
    assert mip._quantum(np.array([0.1, 0.3, 1.2, 0.0]), 10) == pytest.approx(0.1)
    assert mip._quantum(np.array([2.0, 4.0, -6.0, np.inf]), 10) == 2.0
    assert mip._quantum(np.array([0.25, 0.5]), 10) == pytest.approx(0.25)
    assert mip._quantum(np.random.default_rng(0).random(50), 10) is None
    assert mip._quantum(np.zeros(4), 10) is None
    assert mip._quantum(np.array([1e15]), 126) is None  # too large to sum exactly


@pytest.mark.parametrize("seed", range(40))
def test_enumeration_on_a_score_grid_equals_brute_force(seed):
    """Scores on a grid (many tied architectures): the bound rounds up to the grid and the exact passes
    walk its levels; every answer must still be the brute-force optimum."""
    rng = np.random.default_rng(1000 + seed)
    layers, variants = int(rng.integers(3, 6)), int(rng.integers(3, 6))
    scores, costs, limits = _random(rng, layers, variants, int(rng.integers(1, 4)))
    scores = rng.integers(0, 4, size=scores.shape) * 0.5
    scores[:, 0] = 0.0
    exact = brute_force(scores, costs, limits)
    if exact is None:
        return
    sol = solve_mip(scores, costs, limits, method="enumeration")[0]
    assert sol.optimal and sol.objective == pytest.approx(exact[1], abs=1e-9)
    assert sol.stats["method"] == "enumeration" and "quantum" in sol.stats


def test_dominated_variants_never_needed():
    rng = np.random.default_rng(7)
    scores, costs, limits = _random(rng, 4, 5, 2)
    dom = dominated_mask(scores, list(costs.values()))
    assert dom.any() and not dom.all(axis=1).any()  # something pruned, never a whole layer
    # every dominated variant has a dominator that is no worse anywhere
    stack = np.stack([scores, *costs.values()], -1)
    for i, j in zip(*np.nonzero(dom)):
        assert any((stack[i, k] <= stack[i, j]).all() for k in range(5) if k != j)


def test_diversity_constraint_honoured():
    rng = np.random.default_rng(3)
    scores, costs, limits = _random(rng, 10, 4, 2)
    sols = solve_mip(scores, costs, limits, n_solutions=4, alpha=0.6)
    assert len(sols) >= 2
    for a in range(len(sols)):
        for b in range(a):
            assert sum(x == y for x, y in zip(sols[a].choice, sols[b].choice)) <= 6
    objectives = [s.objective for s in sols]
    assert objectives == sorted(objectives)  # each later one optimises over a smaller feasible set


def test_alpha_one_allows_repeats_and_alpha_zero_exhausts():
    s = np.array([[0.0, 1.0], [0.0, 1.0]])
    c = {"m": np.array([[1.0, 0.0], [1.0, 0.0]])}
    # alpha 0: each later solution must differ in every layer; only 2 such exist
    sols = solve_mip(s, c, {"m": 2.0}, n_solutions=5, alpha=0.0)
    assert [x.choice for x in sols] == [(0, 0), (1, 1)]


def test_infeasible_names_constraint_and_best_value():
    s = np.zeros((3, 2))
    c = {"memory": np.array([[3.0, 1.0]] * 3), "runtime": np.array([[1.0, 2.0]] * 3)}
    with pytest.raises(InfeasibleError, match=r"memory <= 2 is out of reach: the smallest possible is 3") as e:
        solve_mip(s, c, {"memory": 2.0, "runtime": 10.0})
    assert e.value.best == {"memory": 3.0}
    # each limit alone is reachable; together they are not
    with pytest.raises(InfeasibleError) as e:
        solve_mip(s, c, {"memory": 5.0, "runtime": 4.0})
    assert "cannot hold with the other limits" in str(e.value)
    # memory <= 5 forces >= 2 cheap-memory (slow) blocks: runtime >= 1 + 2 + 2 = 5
    assert e.value.best["runtime"] == pytest.approx(5.0)
    assert e.value.best["memory"] == pytest.approx(7.0)


def test_unconstrained_picks_best_score_and_allowed_mask():
    rng = np.random.default_rng(0)
    s = rng.random((5, 4))
    sol = solve_mip(s, {}, {})[0]
    assert list(sol.choice) == s.argmin(axis=1).tolist()
    allowed = np.ones_like(s, dtype=bool)
    allowed[:, s.argmin(axis=1)[0]] = False
    sol = solve_mip(s, {}, {}, allowed=allowed)[0]
    assert all(allowed[i, j] for i, j in enumerate(sol.choice))
    # every variant tied in every layer, no limits: any choice is optimal
    tied = solve_mip(np.zeros((6, 3)), {}, {})[0]
    assert tied.optimal and tied.objective == 0.0
    s2 = s.copy()
    s2[1, :] = np.inf
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        solve_mip(s2, {}, {})


def test_bad_inputs_are_named():
    s = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown cost"):
        solve_mip(s, {}, {"memory": 1.0})
    with pytest.raises(ValueError, match="shape"):
        solve_mip(s, {"memory": np.zeros((2, 2))}, {"memory": 1.0})
    with pytest.raises(ValueError, match="n_solutions"):
        solve_mip(s, {}, {}, n_solutions=0)


def test_limit_met_exactly_at_tiny_scale():
    """The optimum sits a hair (1e-8 of the limit) above a cheaper tie: HiGHS's absolute tolerance
    would accept it, the re-check does not, and the re-solve returns the feasible one."""
    s = np.array([[0.0, 1.0], [0.0, 1.0]])
    c = {"t": np.array([[3e-4, 1e-4], [3e-4, 1e-4]])}
    limit = 4e-4 * (1 - 1e-8)  # (0, 1) and (1, 0) cost 4e-4: just over
    sol = solve_mip(s, c, {"t": limit})[0]
    assert sol.choice == (1, 1) and sol.totals["t"] <= limit


@pytest.mark.parametrize("layers,tightness,seed,ties", [(32, 0.52, 0, False), (48, 0.3, 1, False),
                                                       (48, 0.7, 2, True), (80, 0.52, 3, False)])
def test_enumeration_equals_highs_at_puzzle_scale(layers, tightness, seed, ties):
    """54 variants per layer, three binding limits (benchmarks/mip_instances.py); with ``ties`` scores
    are rounded to 0.1, so many architectures share the optimum (the hard case for enumeration)."""
    scores, costs, limits = instance(layers, seed, tightness=tightness)
    if ties:
        scores = np.round(scores, 1)
    ours = solve_mip(scores, costs, limits, method="enumeration")[0]  # no race: the enumeration answers
    ref = solve_mip(scores, costs, limits, method="highs")[0]
    assert ours.stats["method"] == "enumeration" and ours.optimal and ref.optimal
    assert ours.objective == pytest.approx(ref.objective, rel=1e-9, abs=1e-12)
    assert ours.stats["lp_bound"] <= ours.objective + 1e-12
    for name, total in ours.totals.items():
        assert total <= limits[name] * (1 + 1e-9)


def test_enumeration_hands_over_to_highs_when_too_large(monkeypatch):
    scores, costs, limits = instance(32, 5)
    ref = solve_mip(scores, costs, limits, method="highs")[0]
    real = mip._solve_enumeration
    monkeypatch.setattr(mip, "_solve_enumeration", lambda *a, **k: real(*a, **{**k, "budget": 10}))
    sol = solve_mip(scores, costs, limits)[0]
    assert sol.stats["method"] == "highs" and "partial states" in sol.stats["fallback"]
    assert sol.optimal and sol.objective == pytest.approx(ref.objective, rel=1e-9)
    # the hand-over keeps only the variants the Lagrangian bound allows: fewer than dominance alone
    assert sol.variables < ref.variables


def test_diverse_solutions_agree_between_methods():
    rng = np.random.default_rng(11)
    scores, costs, limits = _random(rng, 12, 6, 2)
    ours = solve_mip(scores, costs, limits, n_solutions=4, alpha=0.5, method="enumeration")
    ref = solve_mip(scores, costs, limits, n_solutions=4, alpha=0.5, method="highs")
    assert [s.stats["method"] for s in ours] == ["enumeration"] * len(ours)
    assert [s.objective for s in ours] == pytest.approx([s.objective for s in ref], rel=1e-9)
    for a in range(len(ours)):
        for b in range(a):
            assert sum(x == y for x, y in zip(ours[a].choice, ours[b].choice)) <= 6


def test_highs_racing_a_slow_enumeration_answers_first(monkeypatch):
    """The default races HiGHS against an enumeration that has not finished within ``race_delay``: on an
    instance where the enumeration stalls, HiGHS's proven optimum is taken as soon as it exists."""
    import time

    scores, costs, limits = instance(48, 7, family="real")
    ref = solve_mip(scores, costs, limits, method="highs")[0]
    fast = solve_mip(scores, costs, limits, race_delay=60.0, race_quick=0.0)[0]  # solved before any race
    assert fast.stats["method"] == "enumeration" and fast.objective == pytest.approx(ref.objective, rel=1e-9)
    real = mip._enumerate

    def stalled(*a, poll=None, beam=None, **k):
        if beam is not None:  # the incumbent, as usual (HiGHS starts after it, over fewer variants)
            return real(*a, poll=None, beam=beam, **k)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 60:  # an exact pass that would take a minute
            poll()
            time.sleep(0.005)
        raise AssertionError("HiGHS never answered")

    monkeypatch.setattr(mip, "_enumerate", stalled)
    t0 = time.perf_counter()
    sol = solve_mip(scores, costs, limits, race_delay=0.0, race_quick=0.0)[0]
    assert time.perf_counter() - t0 < 30
    assert sol.stats["method"] == "highs" and sol.stats["race"] == "HiGHS finished first" and sol.optimal
    assert sol.objective == pytest.approx(ref.objective, rel=1e-9)
    assert sol.variables < ref.variables  # HiGHS raced over the variants the incumbent's gap leaves
    # the quick run over the whole problem, from the start: it answers when it proves the optimum in time
    sol = solve_mip(scores, costs, limits, race_delay=60.0, race_quick=60.0)[0]
    assert sol.stats["race"] == "HiGHS finished first" and sol.variables == ref.variables
    assert sol.objective == pytest.approx(ref.objective, rel=1e-9)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="method"):
        solve_mip(np.zeros((2, 2)), {}, {}, method="cbc")


def test_a_process_that_exits_while_a_race_runs_exits_cleanly():
    """A HiGHS run that lost the race may still be inside HiGHS when a script ends; Python's exit then
    aborted the process ("terminate called without an active exception", about 1 run in 3 on a real
    nano problem). solve_mip registers a join at exit."""
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'benchmarks')!r})\n"
            "from mip_instances import instance\nfrom thinkfast.puzzle.mip import solve_mip\n"
            "s, c, l = instance(80, 7, family='real')\n"
            "for _ in range(3):\n    solve_mip(s, c, l, race_delay=0.0, race_quick=0.0)\n")
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-500:]
