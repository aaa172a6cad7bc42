"""The pass-rate curriculum of Llama-Nemotron's reasoning RL (section 5; REFERENCE.md section 5).

Before RL, the starting model answers each prompt ``n`` times; its pass rate is the share answered right.
Prompts it already solves at ``>= threshold`` (0.75) are dropped (:func:`keep_hard`). The rest are pooled by
pass rate (``k / n``), and each batch draws its prompts from a Gaussian over the pools' pass rates whose
centre moves linearly from the easiest pool (highest pass rate) at the first batch to the hardest at the
last (:func:`gaussian_schedule`): a pool's quota is its Gaussian weight times the batch size, capped by what
is left in it (largest remainders round it); slots still free go to the remaining pools nearest the
centre; each batch is shuffled. Prompts are drawn
without replacement; once every pool is empty they are all refilled (a new epoch). :func:`random_schedule`
is the ablation's alternative: the same prompts in random order.

Departures: the paper does not give the Gaussian's width; ``sigma`` (in pass-rate units) defaults to 0.15.
Leftover slots go to the pools nearest the centre, not to the largest ones as in the paper's description:
in the nano world most kept prompts sit in one pool (pass rate 0: problems longer than any the SFT data
had), and "largest first" turned every batch after the first into that pool once the few middling
prompts were used (docs/LOG.md 2026-12-03, session 6).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["gaussian_schedule", "keep_hard", "random_schedule"]


def keep_hard(pass_rates: Sequence[float], threshold: float = 0.75, drop_unsolved: bool = False) -> list[int]:
    """Indices of the prompts solved less often than ``threshold`` (and, with ``drop_unsolved``, at least once).

    >>> keep_hard([0.0, 0.75, 0.5, 1.0, 0.7]), keep_hard([0.0, 0.75, 0.5, 1.0, 0.7], drop_unsolved=True)
    ([0, 2, 4], [2, 4])
    """
    return [i for i, p in enumerate(pass_rates) if p < threshold and not (drop_unsolved and p == 0)]


def _pools(pass_rates: Sequence[float], prompts: Sequence[int]) -> dict[float, list[int]]:
    pools: dict[float, list[int]] = {}
    for i in prompts:
        pools.setdefault(round(float(pass_rates[i]), 6), []).append(i)
    return pools


def gaussian_schedule(pass_rates: Sequence[float], prompts: Sequence[int], batch_size: int, n_batches: int, *,
                      sigma: float = 0.15, seed: int = 0) -> list[list[int]]:
    """``n_batches`` batches of ``batch_size`` prompt indices (from ``prompts``), easy to hard.

    >>> rates = [0.0] * 8 + [0.5] * 8
    >>> [sorted(rates[i] for i in b) for b in gaussian_schedule(rates, range(16), 4, 4, sigma=0.1)]
    [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """
    if not prompts:
        raise ValueError("no prompts left for the curriculum (all filtered out?)")
    if batch_size < 1 or n_batches < 1 or not sigma > 0:
        raise ValueError("batch_size and n_batches must be >= 1 and sigma > 0")
    rng = random.Random(f"curriculum:{seed}")
    full = _pools(pass_rates, prompts)
    rates = sorted(full)
    easy, hard = rates[-1], rates[0]
    left: dict[float, list[int]] = {}

    def refill():
        for r, members in full.items():
            members = list(members)
            rng.shuffle(members)
            left[r] = members

    refill()
    batches = []
    for b in range(n_batches):
        centre = easy + (hard - easy) * (b / max(1, n_batches - 1))
        if not any(left.values()):
            refill()
        weights = {r: math.exp(-((r - centre) ** 2) / (2 * sigma**2)) for r in rates if left[r]}
        total = sum(weights.values())
        shares = {r: batch_size * w / total for r, w in weights.items()}
        quota = {r: min(len(left[r]), int(x)) for r, x in shares.items()}
        spare = batch_size - sum(quota.values())
        for r in sorted(shares, key=lambda r: shares[r] - int(shares[r]), reverse=True):  # largest remainders
            if spare and quota[r] < len(left[r]) and shares[r] > quota[r]:
                quota[r] += 1
                spare -= 1
        batch: list[int] = []
        for r, take in quota.items():
            batch += [left[r].pop() for _ in range(take)]
        while len(batch) < batch_size:  # leftover slots: the nearest remaining pool (a new epoch if none)
            if not any(left.values()):
                refill()
            r = min((r for r in rates if left[r]), key=lambda r: (abs(r - centre), -len(left[r])))
            batch.append(left[r].pop())
        rng.shuffle(batch)
        batches.append(batch)
    return batches


def random_schedule(prompts: Sequence[int], batch_size: int, n_batches: int, *, seed: int = 0) -> list[list[int]]:
    """The same prompts in random order (a new shuffle each epoch)."""
    if not prompts:
        raise ValueError("no prompts to schedule")
    rng = random.Random(f"random-order:{seed}")
    order: list[int] = []
    batches = []
    for _ in range(n_batches):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(prompts)
                rng.shuffle(order)
            batch.append(order.pop())
        batches.append(batch)
    return batches
