"""Rewards for RL: the built-in task rewards by name, loading a user's, and the runner that makes them safe.

A reward is ``f(completions, **columns) -> list[float | None]``, exactly as TRL's ``GRPOTrainer`` calls it,
so a TRL reward works here unchanged: ``completions`` holds, per sample, ``[{"role": "assistant", "content":
text}]`` for chat prompts (TRL's conversational format) or the text itself for plain prompts; the keyword
arguments are the prompt's dataset columns (one list entry per sample), plus ``prompts`` and
``completion_ids`` (and ``thinking``, the mode).

Built in (:data:`BUILTIN`), each the grader evaluation uses for its task (:mod:`thinkfast.tasks`):
``nano_accuracy`` (the nano verifier on the answer after the think block), ``math_accuracy`` (math-verify
against a ``solution`` column, evaluation's extraction and check), ``think_format`` (the toggle's format
rule), ``ifeval_strict`` / ``ifeval_loose`` (IFEval's checkers on ``instruction_id_list`` and ``kwargs``
columns, all instructions followed or 0), ``ifeval_share`` (the share of them followed). A trained reward model by ``reward_model:PATH`` (its score, batched).
Any other by ``module:function`` (:func:`load_reward`).

:class:`RewardRunner` sums the weighted rewards. ``None`` from a reward means "cannot score this sample"
(TRL's semantics, where it becomes NaN): the sum runs over the rewards that scored the sample (a ``nansum``),
and a sample no reward scored is unscorable: its total is ``None``, and the advantages leave it out of its
group's baseline (:mod:`thinkfast.rl.advantages`) instead of counting it as 0. A truncated response (no stop
token) that some reward scored gets 0 in total. A reward that raises, hangs past ``timeout`` seconds or
returns the wrong thing counts 0 for that batch and is reported as a :class:`RewardError` naming it; the
runner never stops the run. (A hung reward's thread is abandoned, not killed: Python cannot kill a thread; it
is a daemon, so it does not keep the process alive.) :class:`RewardFailures` counts the errors per reward, so
a stage can warn, and stop when a reward fails on every call for too long (:class:`RewardFailed`).
"""

from __future__ import annotations

import importlib
import inspect
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..tasks.completion import completion_text
from ..tasks.ifeval import ifeval_loose, ifeval_share, ifeval_strict
from ..tasks.math import math_accuracy
from ..tasks.nano import nano_accuracy
from ..tasks.think_format import think_format
from .prompts import RESERVED

__all__ = ["BUILTIN", "RewardError", "RewardFailed", "RewardFailures", "RewardRunner", "completion_text",
           "load_reward", "missing_columns", "missing_columns_message", "reward_model_reward"]

BUILTIN: dict[str, Callable] = {"nano_accuracy": nano_accuracy, "think_format": think_format,
                                "math_accuracy": math_accuracy, "ifeval_strict": ifeval_strict,
                                "ifeval_loose": ifeval_loose, "ifeval_share": ifeval_share}


REWARD_MODEL_PREFIX = "reward_model:"
_SCORERS: dict[str, object] = {}  # reward model folder (resolved) -> its RewardScorer, loaded once per process


def reward_model_reward(path: str, *, batch_size: int = 32, device: str = "auto") -> Callable:
    """A reward with TRL's signature that scores each completion with the reward model at ``path`` (a
    ``reward_model`` stage's folder or its ``reward_model/``; :func:`thinkfast.rl.reward_model.load_reward_model`,
    loaded here, once per folder and process, on CUDA when there is one): ``f(completions, prompts, thinking=None,
    **columns) -> list[float]``, in batches of ``batch_size``. ``prompts`` are the prompts' messages, ``thinking``
    each sample's mode (None: the prompt's system message decides)."""
    from pathlib import Path

    from ..runtime import resolve_device
    from .reward_model import load_reward_model

    key = str(Path(path).resolve())
    if key not in _SCORERS:  # now, not in the first call: a slow load must not count against the reward's timeout
        _SCORERS[key] = load_reward_model(key, resolve_device(device))

    def reward_model(completions, prompts, thinking=None, **columns) -> list[float]:
        texts = [completion_text(c) for c in completions]
        messages = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        return _SCORERS[key].score(messages, texts, thinking, batch_size=batch_size)

    reward_model.__qualname__ = reward_model.__name__ = f"reward_model:{path}"
    return reward_model


def load_reward(name: str) -> Callable:
    """A built-in reward by name, ``reward_model:PATH`` (a trained reward model's scores,
    :func:`reward_model_reward`), or ``module:function`` (any importable module, e.g. a user's TRL reward)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith(REWARD_MODEL_PREFIX):
        path = name[len(REWARD_MODEL_PREFIX):]
        if not path:
            raise ValueError(f"rewards: {name!r} names no folder (reward_model:PATH)")
        return reward_model_reward(path)
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rewards: cannot load {name!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"rewards: {name!r} is not callable")
    return fn


def missing_columns(fn, columns) -> list[str]:
    """The keyword arguments a reward requires (no default) that ``columns`` does not supply.

    >>> missing_columns(math_accuracy, {"answer": [], "thinking": []})
    ['solution']
    """
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]  # the first is the completions
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return []
    have = set(columns) | {"prompts", "completion_ids"}
    return [p.name for p in params if p.default is p.empty and p.name not in have
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# what thinkfast itself passes to every reward besides a prompt file's columns (TRL's names where TRL has them)
_SUPPLIED = {"prompts": "the prompt's messages", "completion_ids": "the completion's token ids",
             "thinking": "the mode, True or False"}
# fields of a prompt row that thinkfast reads itself (rl.prompts) and the argument they reach the rewards as
_CONSUMED = {"prompt": "prompts", "input": "prompts", "system_prompt": "prompts", "reasoning": "thinking"}
assert set(_SUPPLIED) == set(RESERVED)


def missing_columns_message(reward: str, lacking: list[str], file_fields: dict[str, list[str]] | None,
                            stage: str = "grpo") -> str:
    """What to tell a user whose ``reward`` requires keyword arguments ``lacking`` that no column supplies, in
    the prompt files' own terms (``file_fields``: each file's row fields; None: the nano world's prompts);
    ``stage`` names the config section (``grpo.rewards``, ``grpo.files``).

    >>> print(missing_columns_message("my:r", ["answer", "prompt"], {"p.jsonl": ["prompt", "target"]}))
    ... # doctest: +NORMALIZE_WHITESPACE
    grpo.rewards: my:r requires the keyword argument(s) answer, prompt, which no prompt column supplies: p.jsonl
    has the fields prompt, target (a row's fields other than prompt/input, system_prompt and reasoning reach
    every reward as keyword arguments of the same name, TRL's way), and thinkfast supplies prompts (the prompt's
    messages), completion_ids (the completion's token ids), thinking (the mode, True or False). Fix: add a field
    'answer' to every row; rename the argument 'prompt' to 'prompts' (thinkfast reads the row's 'prompt' itself);
    or give the argument(s) a default
    """
    if file_fields is None:
        have = "the nano world's prompts give answer (the problem's integer answer)"
    else:
        have = "; ".join(f"{f} has the fields {', '.join(keys) or '(none)'}" for f, keys in file_fields.items())
        have += (" (a row's fields other than prompt/input, system_prompt and reasoning reach every reward as "
                 "keyword arguments of the same name, TRL's way)")
    fixes = []
    for a in lacking:
        if a in _CONSUMED:
            fixes.append(f"rename the argument {a!r} to {_CONSUMED[a]!r} (thinkfast reads the row's {a!r} itself)")
        elif file_fields is None:
            fixes.append(f"use prompt files with a field {a!r} ({stage}.files)")
        else:
            fixes.append(f"add a field {a!r} to every row")
    supplied = ", ".join(f"{k} ({v})" for k, v in _SUPPLIED.items())
    return (f"{stage}.rewards: {reward} requires the keyword argument(s) {', '.join(lacking)}, which no prompt "
            f"column supplies: {have}, and thinkfast supplies {supplied}. Fix: {'; '.join(fixes)}; or give the "
            "argument(s) a default")


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
    """Weighted sum of reward functions, each called safely. A reward's ``None`` for a sample drops its term
    (TRL's ``nansum``); a sample that no reward scored totals ``None`` (unscorable), even when truncated."""

    functions: Sequence[tuple[str, Callable, float]]  # (name, function, weight)
    timeout: float = 30.0

    def __call__(self, completions: list, truncated: Sequence[bool], columns: dict[str, list]
                 ) -> tuple[list[float | None], dict[str, list[float | None]], list[RewardError]]:
        """Returns (total reward per sample, ``None`` where no reward scored it; each reward's values, ``None``
        where it could not score; one :class:`RewardError` per failed reward, whose values count 0)."""
        n = len(completions)
        parts: dict[str, list[float | None]] = {}
        errors: list[RewardError] = []
        for name, fn, _ in self.functions:
            value, error, detail = _call_with_timeout(fn, self.timeout, (completions,), dict(columns))
            if error is None:
                try:
                    values = [None if v is None else float(v) for v in value]
                    if len(values) != n:
                        raise ValueError(f"returned {len(values)} values for {n} completions")
                    if any(v != v for v in values if v is not None):
                        raise ValueError("returned NaN")
                except (TypeError, ValueError) as e:
                    error = f"bad return value: {e}"
            if error is not None:
                errors.append(RewardError(name, _one_line(error), detail))
                values = [0.0] * n
            parts[name] = values
        total: list[float | None] = []
        for i in range(n):
            scored = [(w, parts[name][i]) for name, _, w in self.functions if parts[name][i] is not None]
            total.append(None if not scored else 0.0 if truncated[i] else sum(w * v for w, v in scored))
        return total, parts, errors
