"""Estimators of evaluation's tables, as the reference harnesses compute them.

* :func:`pass_at_k`: the unbiased estimator of Chen et al. 2021 (HumanEval), ``1 - C(n-c, k) / C(n, k)``
  for ``c`` right answers among ``n`` samples; pass@1 is the mean over the samples.
* :func:`maj_at_n`: majority vote over the samples' extracted answers (no-answers never vote).

Grading itself is per task in :mod:`thinkfast.tasks` (math answers: :mod:`thinkfast.tasks.math`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

__all__ = ["maj_at_n", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are right (Chen et al. 2021, numerically stable form).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 0, 2), pass_at_k(4, 3, 2), pass_at_k(5, 2, 2)
    (0.25, 0.0, 1.0, 0.7)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_n(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent answer among the samples is right. Answers are compared as given (normalise
    them first); ``None`` (no answer) never votes; a tie goes to the answer seen first.

    >>> maj_at_n(["4", "5", "4", None], [True, False, True, False])
    True
    >>> maj_at_n(["5", "4", None, None], [False, True, False, False])
    False
    >>> maj_at_n([None, None], [False, False])
    False
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return bool(correct[list(answers).index(winner)])
