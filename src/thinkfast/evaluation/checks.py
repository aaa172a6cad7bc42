"""The periodic checks of training stages on prompts of your own files (the nano world's are
:func:`thinkfast.evaluation.harness.toggle_check` and :func:`~thinkfast.evaluation.harness.if_check`): each prompt
asked greedily in both modes of the chat template, its answer graded by the math check
(:func:`thinkfast.tasks.math.verify_math`) when the prompt has a gold solution, and by IFEval's checkers when it
names instructions."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Sequence

from ..generation import SamplingParams
from ..tasks.math import verify_math
from ..toggle import format_ok, parse_response, stop_token_ids
from .harness import CHAT_MODES, chat_ids, decoded

__all__ = ["prompt_if_check", "prompt_toggle_check"]


def _timeout() -> int | None:
    """math-verify's own timeouts (signal-based) work in the main thread only."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def prompt_toggle_check(backend, tokenizer, messages: Sequence[list[dict]], solutions: Sequence[str | None], *,
                        max_new_tokens: int = 600, batch_size: int = 64) -> dict:
    """Per mode (``on``, ``off``): ``accuracy`` (share of prompts with a solution answered right after the think
    block; None when none has one), ``format_ok`` (the mode obeyed: on, one well-formed think block; off, none),
    ``mean_tokens`` and ``truncated`` (share cut off by ``max_new_tokens``); ``collapsed`` names a mode obeyed
    less than half the time (None: neither)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)), batch_size=batch_size, seed=0)
    out: dict = {}
    for mode in CHAT_MODES:
        prompts = [chat_ids(tokenizer, list(m), mode == "on") for m in messages]
        completions = backend.generate(prompts, params, progress=False)
        texts = [decoded(tokenizer, c) for c in completions]
        graded = [verify_math(str(s), parse_response(t).answer, timeout=_timeout())
                  for s, t in zip(solutions, texts) if s is not None]
        out[mode] = {"accuracy": statistics.fmean(bool(g) for g in graded) if graded else None,
                     "format_ok": statistics.fmean(format_ok(t, thinking=mode == "on") for t in texts),
                     "mean_tokens": statistics.fmean(c.n_tokens for c in completions),
                     "truncated": statistics.fmean(c.finish_reason == "length" for c in completions)}
    out["collapsed"] = [m for m in CHAT_MODES if out[m]["format_ok"] < 0.5] or None
    return out


def prompt_if_check(backend, tokenizer, messages: Sequence[list[dict]], columns: dict, *, max_new_tokens: int = 600,
                    batch_size: int = 64, scorer=None) -> dict:
    """Instruction following on prompts in IFEval's schema (``columns``: ``instruction_id_list``, ``kwargs`` and,
    optionally, ``solution``, one entry per prompt), each asked greedily in both modes. Per mode, as
    :func:`~thinkfast.evaluation.harness.if_check`: ``if_strict``, ``if_loose``, ``if_instructions`` (over the
    prompts that name instructions; None when none does),
    ``accuracy`` (the math check on prompts with a solution; None without), ``format_ok``, ``no_answer``,
    ``mean_tokens``, ``truncated`` and, with ``scorer`` (``score_ids(sequences)``), ``rm_score``."""
    from ..tasks import ifeval

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)), batch_size=batch_size, seed=0)
    solutions = columns.get("solution") or [None] * len(messages)
    instruction_ids = columns.get("instruction_id_list") or [None] * len(messages)
    kwargs = columns.get("kwargs") or [None] * len(messages)
    out: dict = {}
    for mode in CHAT_MODES:
        prompts = [chat_ids(tokenizer, list(m), mode == "on") for m in messages]
        completions = backend.generate(prompts, params, progress=False)
        texts = [decoded(tokenizer, c) for c in completions]
        answers = [parse_response(t).answer for t in texts]
        graded = [ifeval.grade(ifeval.IFEvalItem(0, m[-1]["content"], tuple(ids), tuple(kw or [{}] * len(ids))),
                               a or "")
                  for m, ids, kw, a in zip(messages, instruction_ids, kwargs, answers) if ids]
        scores = ifeval.score(graded) if graded else dict.fromkeys(
            ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict"))
        math = [verify_math(str(s), a, timeout=_timeout()) for s, a in zip(solutions, answers) if s is not None]
        out[mode] = {"if_strict": scores["prompt_level_strict"], "if_loose": scores["prompt_level_loose"],
                     "if_instructions": scores["instruction_level_strict"],
                     "accuracy": statistics.fmean(bool(g) for g in math) if math else None,
                     "format_ok": statistics.fmean(format_ok(t, thinking=mode == "on") for t in texts),
                     "no_answer": statistics.fmean(a is None for a in answers),
                     "mean_tokens": statistics.fmean(c.n_tokens for c in completions),
                     "truncated": statistics.fmean(c.finish_reason == "length" for c in completions)}
        if scorer is not None:
            out[mode]["rm_score"] = statistics.fmean(scorer.score_ids([p + list(c.token_ids)
                                                                       for p, c in zip(prompts, completions)]))
    return out
