"""Grading answers and estimating pass rates, as the reference harnesses do.

* :func:`pass_at_k`: the unbiased estimator of Chen et al. 2021 (HumanEval), ``1 - C(n-c, k) / C(n, k)``
  for ``c`` right answers among ``n`` samples; pass@1 is the mean over the samples.
* :func:`maj_at_n`: majority vote over the samples' extracted answers (no-answers never vote).
* :func:`final_answer`: the part of a response after its think block; an unclosed or malformed think block
  has none (a miss, never a graded trace).
* :func:`gsm8k_gold`: GSM8K's ``#### N`` convention.
* :class:`MathGrader`: math-verify's ``verify(parse(gold), parse(pred))`` in worker processes, each call in a
  worker's main thread (where math-verify's own signal-based timeouts work), with a per-answer wall-clock
  limit on top: an answer whose grading hangs is wrong and its worker is replaced.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import re
from collections import Counter
from collections.abc import Sequence

from .toggle import parse_response

__all__ = ["MathGrader", "final_answer", "gsm8k_gold", "last_boxed", "maj_at_n", "pass_at_k", "verify_math",
           "vote_key"]


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


def final_answer(text: str) -> str | None:
    """The answer part of a response: after ``</think>`` when it thinks, the whole text when it does not;
    ``None`` for an unclosed or malformed think block.

    >>> final_answer("<think>\\n2+2=4\\n</think>\\n\\nIt is 4."), final_answer("<think>\\nso 4"), final_answer("4")
    ('It is 4.', None, '4')
    """
    return parse_response(text).answer


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (braces balanced), or None.

    >>> last_boxed("so \\boxed{3} then \\boxed{\\frac{1}{2}}."), last_boxed("none")
    ('\\frac{1}{2}', None)
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def vote_key(answer: str | None) -> str | None:
    r"""What a sample votes for in maj@n: its last boxed answer, else its last number, spaces and a
    trailing period dropped; None (no answer) for a missing answer or one with neither.

    >>> vote_key("It is \\boxed{ 1/2 }."), vote_key("so 1,234 apples."), vote_key("no idea"), vote_key(None)
    ('1/2', '1234', None, None)
    """
    if answer is None:
        return None
    boxed = last_boxed(answer)
    if boxed is not None:
        return boxed.replace(" ", "").rstrip(".")
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", answer)
    return numbers[-1].replace(",", "") if numbers else None


def gsm8k_gold(answer: str) -> str:
    """The number after GSM8K's ``####`` (commas dropped).

    >>> gsm8k_gold("She pays 2 * 3 = <<2*3=6>>6 dollars.\\n#### 1,234")
    '1234'
    """
    m = re.search(r"####\s*(.+?)\s*$", answer.strip())
    if not m:
        raise ValueError(f"no '#### answer' in {answer[-80:]!r}")
    return m.group(1).replace(",", "")


def verify_math(gold: str, pred: str) -> bool:
    """math-verify's own check, ``verify(parse(gold), parse(pred))``, with its default timeouts (main thread)."""
    from math_verify import parse, verify

    return bool(verify(parse(gold), parse(pred)))


def _warm_up(module: str) -> None:
    import importlib
    import time

    importlib.import_module(module)
    if module == __name__:
        import math_verify  # noqa: F401  (sympy and the parsers: seconds, once per worker)
    time.sleep(0.2)  # long enough for every worker to take one


def _grade_one(args: tuple[str, str, str]) -> bool:
    module, name, pair = args[0], args[1], args[2]
    import importlib

    fn = getattr(importlib.import_module(module), name)
    return bool(fn(*pair))


class MathGrader:
    """Grade (gold, prediction) pairs in ``workers`` processes, ``timeout`` seconds per pair at most.

    ``check`` is the grading function, by ``module:function`` (default math-verify's own check,
    :func:`verify_math`); it runs in a worker's main thread. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, workers: int = 2, timeout: float = 20.0, check: str = "thinkfast.grading:verify_math"):
        if workers < 1 or not timeout > 0:
            raise ValueError("workers must be >= 1 and timeout > 0")
        self.workers, self.timeout = workers, timeout
        self.module, _, self.name = check.partition(":")
        self.timeouts = 0
        self._pool: cf.ProcessPoolExecutor | None = None

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        """A pool whose workers have started and imported the check (so the timeout counts grading only)."""
        pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        for f in [pool.submit(_warm_up, self.module) for _ in range(self.workers)]:
            f.result()
        return pool

    def grade(self, golds: Sequence[str], preds: Sequence[str | None]) -> list[bool]:
        """Whether each prediction equals its gold; a ``None`` prediction (no answer) is wrong without a call."""
        if len(golds) != len(preds):
            raise ValueError(f"{len(golds)} golds for {len(preds)} predictions")
        out = [False] * len(golds)
        todo = [i for i, p in enumerate(preds) if p is not None]
        while todo:
            if self._pool is None:
                self._pool = self._new_pool()
            futures = {i: self._pool.submit(_grade_one, (self.module, self.name, (golds[i], preds[i]))) for i in todo}
            todo = []
            for i, f in futures.items():
                try:
                    out[i] = f.result(timeout=self.timeout)
                except cf.TimeoutError:
                    # this pair hangs: wrong. Its worker cannot be interrupted, so the pool is replaced and the
                    # pairs not yet finished are graded again on the new one
                    self.timeouts += 1
                    out[i] = False
                    todo = [j for j in futures if j > i and not futures[j].done()]
                    done = {j: futures[j] for j in futures if j > i and futures[j].done()}
                    for j, g in done.items():
                        out[j] = _result(g)
                    self._kill()
                    break
                except Exception:  # noqa: BLE001 - a grader crash on one odd string is a wrong answer
                    out[i] = False
        return out

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for p in list(getattr(pool, "_processes", {}).values()):
                p.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._kill()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _result(f: cf.Future) -> bool:
    try:
        return bool(f.result(timeout=0))
    except Exception:  # noqa: BLE001
        return False
