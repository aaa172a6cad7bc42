"""Reward functions with TRL's signature, and the runner that makes them safe to call.

A reward is ``f(completions, **columns) -> list[float]``, exactly as TRL's ``GRPOTrainer`` calls it, so a
TRL reward works here unchanged: ``completions`` holds, per sample, ``[{"role": "assistant", "content":
text}]`` for chat prompts (TRL's conversational format) or the text itself for plain prompts; the keyword
arguments are the prompt's dataset columns (one list entry per sample), plus ``prompts`` and
``completion_ids``. ``None`` in a reward's list means "not applicable" and counts 0.

Built in (REFERENCE.md section 5, Llama-Nemotron section 5):

* :func:`nano_accuracy`: the nano world's verifier on the answer after the think block;
* :func:`think_format`: "on" needs exactly one ``<think>`` ... ``</think>`` pair, in order, before the
  answer; "off" needs no think tags.
* :func:`math_accuracy`: math answers against a ``solution`` column through math-verify (``parse`` and
  ``verify``, symbolic equivalence), as TRL's ``accuracy_reward`` does, but on the answer after the think
  block only: an unclosed or malformed think block scores 0, a number inside the reasoning is never graded.

:class:`RewardRunner` sums the weighted rewards; a truncated response (no stop token) gets 0 in total, and a
reward that raises, hangs past ``timeout`` seconds or returns the wrong thing counts 0 for that batch and is
reported as a :class:`RewardError` naming it; the runner never stops the run. (A hung reward's thread is
abandoned, not killed: Python cannot kill a thread; it is a daemon, so it does not keep the process alive.)
:class:`RewardFailures` counts the errors per reward, so a stage can warn, and stop when a reward fails on
every call for too long (:class:`RewardFailed`).
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..nano.tasks import extract_answer
from ..toggle import format_ok, parse_response

__all__ = ["BUILTIN", "RewardError", "RewardFailed", "RewardFailures", "RewardRunner", "completion_text",
           "math_accuracy", "nano_accuracy", "think_format"]


def completion_text(completion) -> str:
    """The text of a completion in either of TRL's formats.

    >>> completion_text([{"role": "assistant", "content": "4"}]), completion_text("4")
    ('4', '4')
    """
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def nano_accuracy(completions, answer, **kwargs) -> list[float]:
    """1.0 when the answer after the think block is ``Answer: <answer>``; malformed think blocks score 0.

    >>> nano_accuracy(["<think>\\n2+2\\n</think>\\n\\nAnswer: 4", "<think>Answer: 4", "Answer: 5"], [4, 4, 4])
    [1.0, 0.0, 0.0]
    """
    out = []
    for c, a in zip(completions, answer):
        final = parse_response(completion_text(c)).answer
        out.append(1.0 if final is not None and extract_answer(final) == int(a) else 0.0)
    return out


def think_format(completions, thinking, **kwargs) -> list[float]:
    """1.0 when the response obeys the requested mode (``thinking`` True: one well-formed think block
    with reasoning in it; False: no think tags).

    >>> think_format(["<think>\\nx\\n</think>\\n\\n4", "4", "<think>\\nx\\n</think>\\n\\n4"], [True, False, False])
    [1.0, 1.0, 0.0]
    """
    return [1.0 if format_ok(completion_text(c), bool(t)) else 0.0 for c, t in zip(completions, thinking)]


def math_accuracy(completions, solution, **kwargs) -> list[float | None]:
    """1.0 when the answer after the think block equals ``solution`` under math-verify; ``None`` (not
    applicable, counted 0) when the gold solution does not parse. The answer is extracted as TRL's
    ``accuracy_reward`` extracts it (LaTeX, ``\\boxed{}`` first, an anchor required), the gold as math-verify's
    default parse does; symbolic equivalence by ``math_verify.verify``.

    >>> math_accuracy(["<think>\\nx = 1/2?\\n</think>\\n\\nSo $x = \\\\boxed{\\\\frac{1}{3}}$",
    ...                "<think>\\n$\\\\boxed{\\\\frac{1}{3}}$", "The answer is $\\\\boxed{0.5}$."],
    ...               ["$\\\\frac{1}{3}$", "$\\\\frac{1}{3}$", "$\\\\frac{1}{2}$"])
    [1.0, 0.0, 1.0]
    """
    try:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError as e:  # a core dependency; a broken install is reported by the runner
        raise ImportError("math_accuracy needs math-verify (pip install math-verify)") from e
    # math-verify's timeouts use signal.alarm, which works in the main thread only; the runner calls rewards
    # in a thread of their own and enforces its own timeout
    main = threading.current_thread() is threading.main_thread()
    if not main:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    timeout = 5 if main else None
    answer_config = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True),
                                           boxed_match_priority=0, try_extract_without_anchor=False)]
    out: list[float | None] = []
    for c, sol in zip(completions, solution, strict=True):
        gold = parse(str(sol), parsing_timeout=timeout)
        if not gold:
            out.append(None)
            continue
        final = parse_response(completion_text(c)).answer
        if final is None:
            out.append(0.0)
            continue
        pred = parse(final, extraction_config=answer_config, extraction_mode="first_match", parsing_timeout=timeout)
        out.append(float(verify(gold, pred, timeout_seconds=timeout)))
    return out


BUILTIN: dict[str, Callable] = {"nano_accuracy": nano_accuracy, "think_format": think_format,
                                "math_accuracy": math_accuracy}


@dataclass(frozen=True)
class RewardError:
    """One failed call of a reward: its name, a one-line message (``ZeroDivisionError: division by zero``,
    ``timed out after 30 s``, ``bad return value: ...``) and the traceback's last frames, if any."""

    reward: str
    message: str
    detail: str = ""

    def __str__(self) -> str:
        return f"reward {self.reward}: {self.message}"


class RewardFailed(ValueError):
    """A reward failed where its failure makes the run meaningless (every call for too many steps, or the one
    call that measures pass rates); the message is one line naming the reward and its last error."""


@dataclass
class RewardFailures:
    """Per reward: calls, failed calls, the last error and the calls in a row that failed (the current run).

    >>> f = RewardFailures(["acc", "fmt"])
    >>> f.add({"fmt": "ValueError: x"}); f.add({}); f.add({"fmt": "ValueError: y"})
    >>> f.counts()["fmt"], f.in_a_row
    ({'calls': 3, 'failed': 2, 'last_error': 'ValueError: y'}, {'acc': 0, 'fmt': 1})
    """

    names: Sequence[str]
    calls: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    in_a_row: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.names = list(dict.fromkeys(self.names))
        for n in self.names:
            self.failed.setdefault(n, 0)
            self.in_a_row.setdefault(n, 0)

    def add(self, failed: dict[str, str]) -> None:
        """One call of every reward; ``failed`` maps the rewards that failed to their one-line message."""
        self.calls += 1
        for n in self.names:
            if n in failed:
                self.failed[n] += 1
                self.in_a_row[n] += 1
                self.last_error[n] = failed[n]
            else:
                self.in_a_row[n] = 0

    def counts(self) -> dict[str, dict]:
        """``{reward: {"calls", "failed", "last_error" (when one failed)}}``."""
        return {n: {"calls": self.calls, "failed": self.failed[n],
                    **({"last_error": self.last_error[n]} if n in self.last_error else {})} for n in self.names}


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _call_with_timeout(fn: Callable, timeout: float, args: tuple, kwargs: dict):
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - any failure of user code is reported, not raised
            box["error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            box["detail"] = traceback.format_exc(limit=3)

    t = threading.Thread(target=target, daemon=True, name=f"reward:{getattr(fn, '__name__', fn)}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        return None, f"timed out after {timeout:g} s", ""
    return box.get("value"), box.get("error"), box.get("detail", "")


@dataclass
class RewardRunner:
    """Weighted sum of reward functions, each called safely."""

    functions: Sequence[tuple[str, Callable, float]]  # (name, function, weight)
    timeout: float = 30.0

    def __call__(self, completions: list, truncated: Sequence[bool], columns: dict[str, list]
                 ) -> tuple[list[float], dict[str, list[float]], list[RewardError]]:
        """Returns (total reward per sample, each reward's values, one :class:`RewardError` per failed reward)."""
        n = len(completions)
        parts: dict[str, list[float]] = {}
        errors: list[RewardError] = []
        for name, fn, _ in self.functions:
            value, error, detail = _call_with_timeout(fn, self.timeout, (completions,), dict(columns))
            if error is None:
                try:
                    values = [0.0 if v is None else float(v) for v in value]
                    if len(values) != n:
                        raise ValueError(f"returned {len(values)} values for {n} completions")
                    if any(v != v for v in values):
                        raise ValueError("returned NaN")
                except (TypeError, ValueError) as e:
                    error = f"bad return value: {e}"
            if error is not None:
                errors.append(RewardError(name, _one_line(error), detail))
                values = [0.0] * n
            parts[name] = values
        total = [0.0 if truncated[i] else sum(w * parts[name][i] for name, _, w in self.functions) for i in range(n)]
        return total, parts, errors
