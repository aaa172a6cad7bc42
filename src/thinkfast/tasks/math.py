r"""Math answers: one extraction and one check for evaluation and RL (REFERENCE.md section 7).

The answer is the text after the think block (:func:`thinkfast.tasks.completion.final_answer`; an unclosed or
malformed block has none, so a number in the reasoning is never graded). It is right when math-verify, with
its default extraction, finds it equal to the gold: :func:`verify_math`, ``verify(parse(gold),
parse(answer))``, gold first. math-verify's default ``parse`` takes the rightmost ``\boxed{}`` (or a
"final answer is ..." phrase) that parses, else the rightmost LaTeX, else the rightmost plain expression, so a
model that answers "The answer is 18." is graded too; ``verify`` compares symbolically (``0.5`` equals
``\frac{1}{2}``, ``\{1, 2\}`` equals ``\{2, 1\}``, ``x^2+2x+1`` equals ``(x+1)^2``).

* :class:`MathGrader`: evaluation's grader: :func:`verify_math` in worker processes, each call in a worker's
  main thread (where math-verify's own signal-based timeouts work), with a per-answer wall-clock limit on
  top: an answer whose grading hangs is wrong and its worker is replaced.
* :func:`math_accuracy`: the same check as GRPO's reward (TRL's signature, a ``solution`` column), in the
  caller's thread: math-verify's timeouts when that is the main thread, else the reward runner's timeout
  (:class:`thinkfast.rl.rewards.RewardRunner`). ``None`` (cannot be scored) when the gold does not parse.
* :func:`vote_key`: what a sample votes for in maj@n; :func:`gsm8k_gold`: GSM8K's ``#### N`` convention.

Before this module, the reward extracted answers as TRL's ``accuracy_reward`` does (LaTeX only, ``\boxed{}``
first, an anchor required, first match only), so RL trained on a different check from the one the table
showed: "The answer is 18." or a bare ``4`` scored 0 in RL and right in evaluation, and "\boxed{4}. So the
final answer is $3$" was 4 for RL and 3 for evaluation (tests/test_tasks.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import re
import threading
from collections.abc import Sequence

from .completion import completion_text, final_answer

__all__ = ["MathGrader", "gsm8k_gold", "last_boxed", "math_accuracy", "verify_math", "vote_key"]


def verify_math(gold: str, answer: str | None, timeout: int | None = 5) -> bool | None:
    """math-verify's own check, ``verify(parse(gold), parse(answer))`` with its default extraction; ``None``
    when the gold does not parse (nothing to compare with), False for no answer. ``timeout``: math-verify's
    per-call limit in seconds (signal-based: the main thread only; ``None`` off).

    >>> verify_math("$\\\\frac{1}{2}$", "so x = $\\\\boxed{0.5}$"), verify_math("4", "3"), verify_math("no gold", "4")
    (True, False, None)
    """
    from math_verify import parse, verify

    parsed = parse(gold, parsing_timeout=timeout)
    if not parsed:
        return None
    if answer is None:
        return False
    return bool(verify(parsed, parse(answer, parsing_timeout=timeout), timeout_seconds=timeout))


def math_accuracy(completions, solution, **kwargs) -> list[float | None]:
    r"""1.0 when the answer after the think block equals ``solution`` under :func:`verify_math` (evaluation's
    check); ``None`` (cannot be scored) when the gold does not parse.

    >>> math_accuracy(["<think>\nx = 1/2?\n</think>\n\nSo $x = \\boxed{\\frac{1}{3}}$",
    ...                "<think>\n$\\boxed{\\frac{1}{3}}$", "The answer is 0.5.", "$\\boxed{4}$"],
    ...               ["$\\frac{1}{3}$", "$\\frac{1}{3}$", "$\\frac{1}{2}$", "not math"])
    [1.0, 0.0, 1.0, None]
    """
    # math-verify's timeouts use signal.alarm, which works in the main thread only; the runner calls rewards
    # in a thread of their own and enforces its own timeout
    main = threading.current_thread() is threading.main_thread()
    if not main:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    out: list[float | None] = []
    for c, sol in zip(completions, solution, strict=True):
        ok = verify_math(str(sol), final_answer(completion_text(c)), timeout=5 if main else None)
        out.append(None if ok is None else float(ok))
    return out


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
    trailing period dropped; None (no answer) for a missing answer or one with neither. (Which vote wins is
    decided here; whether the winner is right, by :func:`verify_math`.)

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
    """Grade (gold, answer) pairs in ``workers`` processes, ``timeout`` seconds per pair at most.

    ``check`` is the grading function, by ``module:function`` (default :func:`verify_math`, the check the
    math reward uses); it runs in a worker's main thread. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, workers: int = 2, timeout: float = 20.0, check: str = f"{__name__}:verify_math"):
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
        """Whether each answer equals its gold; a ``None`` answer (no answer) is wrong without a call, and so is
        a gold that does not parse."""
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
