"""Evaluation harness: prompt a model in either mode, generate in batches, grade, summarise.

Shared by the ``eval`` stage and the benchmarks (REFERENCE.md section 7: reasoning "on" sampled at
temperature 0.6 / top-p 0.95 with pass@1 averaged over n samples, "off" greedy; an unclosed think block
is no answer). ``text`` prompting (a pretrained parent): modes ``think`` ("Let's think step by step.")
and ``direct`` ("Answer: "), both greedy. ``chat`` prompting (a model taught the toggle): modes ``on`` /
``off`` through the chat template's ``enable_thinking``, with toggle obedience (``format_ok``). A chat model whose
template has no toggle (a parent's own template ignores ``enable_thinking``: :func:`thinkfast.toggle.has_toggle`)
has one mode, ``single``: each prompt asked once, greedy like "off" (a model without reasoning is a non-reasoning
model), through its own template with no toggle; toggle obedience does not apply (``format_ok`` None, "-" in the
tables, where the mode reads "single (no toggle)").

Models are reached through a generation backend (:class:`thinkfast.generation.Backend`: the local rollout
engine, or a server through :class:`thinkfast.generation.endpoint.Endpoint`); the settings are an :class:`EvalSettings`
(the ``eval`` stage's config is one).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import read_model_sidecar
from ..generation import Backend, SamplingParams
from ..nano import tasks
from ..toggle import format_ok, has_toggle, messages_for, parse_response, stop_token_ids

TEXT_MODES = ("think", "direct")
CHAT_MODES = ("on", "off")
SINGLE = "single"  # the one mode of a chat model without the toggle
MODE_LABELS = {SINGLE: "single (no toggle)"}  # how the tables name a mode, where not by its key


def chat_modes(tokenizer) -> tuple[str, ...]:
    """The modes a chat model is asked in: "on" and "off" when its template obeys the toggle, else its one mode
    (:data:`SINGLE`): asking a template that ignores ``enable_thinking`` twice would ask the same prompt twice."""
    return CHAT_MODES if has_toggle(tokenizer) else (SINGLE,)


def mode_thinking(mode: str) -> bool | None:
    """The ``enable_thinking`` of a chat mode: True for "on", False for "off", None (not set) for :data:`SINGLE`.

    >>> [mode_thinking(m) for m in ("on", "off", "single")]
    [True, False, None]
    """
    return None if mode == SINGLE else mode == "on"


@dataclass
class EvalSettings:
    """How the harness samples and reports (defaults follow REFERENCE.md section 7)."""

    seed: int = 1234
    max_new_tokens: int = 1200
    batch_size: int = 64
    samples: int = 1  # samples per problem in the sampled mode ("on"); pass@1 is their mean
    on_temperature: float = 0.6
    on_top_p: float = 0.95
    headline_digits: int = 2  # the difficulty quoted as the headline figure
    save_samples: int = 3  # responses kept per cell and mode in samples.jsonl
    pass_k: list[int] = field(default_factory=lambda: [1])  # pass@k reported for k <= samples

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.save_samples < 0 or not self.on_temperature >= 0 or not 0 < self.on_top_p <= 1:
            raise ValueError("save_samples and on_temperature must be >= 0, on_top_p in (0, 1]")
        if any(k < 1 for k in self.pass_k):
            raise ValueError("pass_k entries must be >= 1")


def decoded(tokenizer, completion) -> str:
    """A completion's text, special tokens left out (a server's completion comes as text)."""
    if completion.text is not None:
        return completion.text
    return tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def resolve_prompting(model_dir: Path, tokenizer, requested: str) -> str:
    if requested != "auto":
        return requested
    meta = read_model_sidecar(model_dir)
    if meta.get("prompting"):
        return meta["prompting"]
    return "chat" if getattr(tokenizer, "chat_template", None) else "text"


def build_prompt(tokenizer, problem: tasks.Problem, prompting: str, mode: str, template: str | None = None) -> list[int]:
    """A nano problem's prompt ids; chat prompting words the user turn with ``template`` (None: the canonical
    wording; :data:`thinkfast.nano.tasks.PHRASINGS`)."""
    if prompting == "text":
        return tokenizer(tasks.text_prompt(problem, mode), add_special_tokens=False)["input_ids"]
    return chat_ids(tokenizer, messages_for(tasks.chat_prompt(problem, template), thinking=None), mode_thinking(mode))


def chat_ids(tokenizer, messages: list[dict], thinking: bool | None) -> list[int]:
    """Prompt ids of ``messages`` through the chat template, the toggle set by ``enable_thinking`` (None: not
    passed, the template's own mode), ready for the assistant's turn."""
    flag = {} if thinking is None else {"enable_thinking": thinking}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **flag)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def grade(problem: tasks.Problem, text: str, prompting: str, mode: str) -> dict:
    """Grade one response: correct, and (chat) whether the toggle's format was obeyed (None in :data:`SINGLE`
    mode, which has no toggle to obey)."""
    from ..tasks.nano import nano_correct

    if prompting == "text":
        # the prompt's own tail is part of the answer ("...\nAnswer: " + "85")
        return {"correct": nano_correct(tasks.text_prompt(problem, mode) + text, problem.answer, after_think=False),
                "format_ok": True}
    return {
        "correct": nano_correct(text, problem.answer),  # the answer after the think block; malformed: wrong
        "format_ok": None if mode == SINGLE else format_ok(text, thinking=(mode == "on")),
    }


@dataclass
class Answers:
    """One mode's answers to a task: each item answered ``n`` times (its samples consecutive), the completions
    and their texts (special tokens left out)."""

    mode: str
    sampled: bool
    n: int
    completions: list
    texts: list[str]


def run_task(backend: Backend, tokenizer, task, prompting: str, cfg, log=None) -> tuple[dict, list]:
    """The harness's one loop: for every mode of ``task`` (text prompting: ``task.text_modes``; chat:
    :func:`chat_modes`, "on" and "off" or the one :data:`SINGLE`), prompt every item (``task.prompt(tokenizer, item,
    prompting, mode)``), generate through ``backend``
    ("on" sampled ``cfg.samples`` times at ``cfg.on_temperature`` / ``cfg.on_top_p``, every other mode greedy,
    once), and let the task grade and summarise (``task.score(answers, prompting, cfg) -> (metrics, kept
    records)``). Returns ({mode: metrics}, kept records); each mode's metrics are logged as ``task.event``."""
    out: dict = {}
    kept: list = []
    stops = tuple(stop_token_ids(tokenizer))
    for mode in (task.text_modes if prompting == "text" else chat_modes(tokenizer)):
        sampled = mode == "on"
        n = cfg.samples if sampled else 1
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.on_temperature if sampled else 0.0,
                                top_p=cfg.on_top_p if sampled else 1.0, stop_token_ids=stops,
                                batch_size=cfg.batch_size, seed=cfg.seed)
        prompts = [task.prompt(tokenizer, item, prompting, mode) for item in task.items for _ in range(n)]
        completions = backend.generate(prompts, params, progress=True)
        answers = Answers(mode, sampled, n, completions, [decoded(tokenizer, c) for c in completions])
        out[mode], records = task.score(answers, prompting, cfg)
        kept += records
        if log is not None:
            log.log(task.event, **task.log_fields, mode=mode,
                    **{k: v for k, v in out[mode].items() if k != "cells"})
    return out, kept


class NanoTask:
    """The nano world's cells (``{(kind, digits, steps): problems}``), graded exactly
    (:func:`thinkfast.tasks.nano.nano_correct`): per mode the accuracy overall, at ``cfg.headline_digits`` and per
    cell, mean tokens, toggle obedience (``format_ok``; None in :data:`SINGLE` mode) and the truncated share."""

    text_modes = TEXT_MODES
    event, log_fields = "mode", {}

    def __init__(self, suite: dict, phrasing: str | None = None):
        """``phrasing``: None, every problem in the canonical wording; or a split of
        :data:`thinkfast.nano.tasks.PHRASINGS` ("held_out": wordings toggle SFT never used), one template per
        problem, drawn deterministically (chat prompting only)."""
        import random

        rng = random.Random(f"nano-phrasing:{phrasing}")
        # (cell, problem, template)
        self.items = [(cell, p, tasks.phrasing(p, rng, phrasing) if phrasing else None)
                      for cell, problems in suite.items() for p in problems]

    @staticmethod
    def prompt(tokenizer, item, prompting: str, mode: str) -> list[int]:
        return build_prompt(tokenizer, item[1], prompting, mode, item[2])

    def score(self, answers: Answers, prompting: str, cfg) -> tuple[dict, list]:
        cells: dict = {}
        kept = []
        for j, (comp, text) in enumerate(zip(answers.completions, answers.texts)):
            cell, problem, template = self.items[j // answers.n]
            g = grade(problem, text, prompting, answers.mode)
            key = f"{cell[0]}/{cell[1]}d" + (f"/{cell[2]}s" if cell[0] == "word" else "")
            c = cells.setdefault(key, {"correct": [], "tokens": [], "format_ok": [], "truncated": []})
            c["correct"].append(g["correct"])
            c["format_ok"].append(g["format_ok"])
            c["tokens"].append(comp.n_tokens)
            c["truncated"].append(comp.finish_reason == "length")
            if len(c["correct"]) <= cfg.save_samples:
                kept.append({"mode": answers.mode, "cell": key, "question": problem.question,
                             **({"template": template} if template else {}),
                             "answer": problem.answer, "response": text, **g})
        toggled = answers.mode != SINGLE
        summary = {key: {"accuracy": statistics.fmean(c["correct"]), "mean_tokens": statistics.fmean(c["tokens"]),
                         "format_ok": statistics.fmean(c["format_ok"]) if toggled else None,
                         "truncated": statistics.fmean(c["truncated"]), "n": len(c["correct"])}
                   for key, c in cells.items()}
        everything = [x for c in cells.values() for x in c["correct"]]
        headline = [x for key, c in cells.items() if f"/{cfg.headline_digits}d" in key for x in c["correct"]]
        return {"accuracy": statistics.fmean(everything),
                f"accuracy_{cfg.headline_digits}d": statistics.fmean(headline) if headline else None,
                "mean_tokens": statistics.fmean(t for c in cells.values() for t in c["tokens"]),
                "format_ok": statistics.fmean(x for c in cells.values() for x in c["format_ok"]) if toggled else None,
                "cells": summary}, kept


def evaluate(backend: Backend, tokenizer, suite: dict, prompting: str, cfg, log=None) -> tuple[dict, list]:
    """The nano suite in every mode (:class:`NanoTask`). Returns (metrics, kept sample records)."""
    modes, kept = run_task(backend, tokenizer, NanoTask(suite), prompting, cfg, log)
    return {"prompting": prompting, "modes": modes}, kept


def evaluate_phrased(backend: Backend, tokenizer, suite: dict, cfg, log=None) -> tuple[dict, list]:
    """The nano suite's problems worded with the held-out templates (suite ``nano_phrased``, chat models): per
    mode the nano metrics (accuracy, per cell, ``format_ok``), ``pass@1`` the accuracy. Returns ({mode: metrics},
    kept sample records)."""
    modes, kept = run_task(backend, tokenizer, NanoTask(suite, phrasing="held_out"), "chat", cfg, log)
    for r in modes.values():
        r["pass@1"] = r["accuracy"]
    return modes, [{"suite": "nano_phrased", **r} for r in kept]


def _greedy(tokenizer, max_new_tokens: int, batch_size: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                          stop_token_ids=tuple(stop_token_ids(tokenizer)), batch_size=batch_size, seed=0)


def quick_accuracy(backend: Backend, tokenizer, problems: list, prompting: str, mode: str, *, max_new_tokens: int = 600,
                   batch_size: int = 64) -> float:
    """Share of ``problems`` answered right in ``mode``, greedy: the periodic check of training stages."""
    params = _greedy(tokenizer, max_new_tokens, batch_size)
    prompts = [build_prompt(tokenizer, p, prompting, mode) for p in problems]
    completions = backend.generate(prompts, params, progress=False)
    right = [grade(p, decoded(tokenizer, c), prompting, mode)["correct"]
             for p, c in zip(problems, completions)]
    return statistics.fmean(right) if right else 0.0


def item_prompt(tokenizer, item, prompting: str, mode: str) -> list[int]:
    """A real-suite item (:class:`thinkfast.evaluation.suites.Item`) as prompt ids: the user turn of the chat template in
    ``mode`` (``enable_thinking``), or for ``text`` prompting the problem text and a blank line."""
    if prompting == "text":
        return tokenizer(item.prompt + "\n\n", add_special_tokens=True)["input_ids"]
    return chat_ids(tokenizer, [{"role": "user", "content": item.prompt}], mode_thinking(mode))


class MathSuiteTask:
    """A real math suite (:class:`thinkfast.evaluation.suites.Item`s): the answer after the think block graded by ``grader``
    (:class:`thinkfast.tasks.math.MathGrader`). Per mode: pass@1 (the mean over samples and items), pass@k for
    each ``k`` in ``cfg.pass_k`` up to the samples, maj@n, mean tokens, think-format compliance (chat), the
    no-answer rate (an unclosed think block, or neither a boxed answer nor a number after it) and the truncated
    share."""

    text_modes = ("text",)
    event, log_fields = "suite_mode", {}

    def __init__(self, items: list, grader):
        self.items, self.grader = items, grader

    @staticmethod
    def prompt(tokenizer, item, prompting: str, mode: str) -> list[int]:
        return item_prompt(tokenizer, item, prompting, mode)

    def score(self, answers: Answers, prompting: str, cfg) -> tuple[dict, list]:
        from .estimators import maj_at_n, pass_at_k
        from ..tasks.completion import final_answer
        from ..tasks.math import vote_key

        n, items, texts, completions = answers.n, self.items, answers.texts, answers.completions
        finals = [final_answer(t) if prompting == "chat" else t for t in texts]
        right = self.grader.grade([it.math_gold for it in items for _ in range(n)], finals)
        votes = [vote_key(a) for a in finals]
        blocks = [range(i * n, (i + 1) * n) for i in range(len(items))]
        counts = [sum(right[j] for j in b) for b in blocks]
        r = {"pass@1": statistics.fmean(c / n for c in counts),
             **{f"pass@{k}": statistics.fmean(pass_at_k(n, c, k) for c in counts) for k in cfg.pass_k if 1 < k <= n},
             f"maj@{n}": statistics.fmean(maj_at_n([votes[j] for j in b], [right[j] for j in b]) for b in blocks),
             "mean_tokens": statistics.fmean(c.n_tokens for c in completions),
             "no_answer": statistics.fmean(v is None for v in votes),
             "truncated": statistics.fmean(c.finish_reason == "length" for c in completions),
             "n": len(items), "samples": n}
        if prompting == "chat" and answers.mode != SINGLE:
            r["format_ok"] = statistics.fmean(format_ok(t, thinking=answers.sampled) for t in texts)
        kept = [{"mode": answers.mode, "id": it.id, "gold": it.gold, "response": texts[i * n], "correct": right[i * n]}
                for i, it in enumerate(items[: cfg.save_samples])]
        return r, kept


class IFEvalTask:
    """IFEval (:mod:`thinkfast.tasks.ifeval`): the item's text as the user turn, unchanged; the answer checked is
    the text after the think block (a malformed block fails every instruction). Per mode: prompt- and
    instruction-level accuracy, strict and loose (means over all samples; ``pass@1`` is the prompt-level strict
    one), mean tokens, the no-answer rate, format compliance (chat), the truncated share."""

    text_modes = ("text",)
    event, log_fields = "suite_mode", {"suite": "ifeval"}

    def __init__(self, items: list):
        self.items = items

    @staticmethod
    def prompt(tokenizer, item, prompting: str, mode: str) -> list[int]:
        return item_prompt(tokenizer, item, prompting, mode)

    def score(self, answers: Answers, prompting: str, cfg) -> tuple[dict, list]:
        from ..tasks import ifeval

        n, items, texts, completions = answers.n, self.items, answers.texts, answers.completions
        finals = [parse_response(t).answer if prompting == "chat" else t for t in texts]
        graded = [ifeval.grade(items[j // n], a or "") for j, a in enumerate(finals)]
        r = {**ifeval.score(graded), "mean_tokens": statistics.fmean(c.n_tokens for c in completions),
             "no_answer": statistics.fmean(a is None for a in finals),
             "truncated": statistics.fmean(c.finish_reason == "length" for c in completions),
             "n": len(items), "samples": n}
        r["pass@1"] = r["prompt_level_strict"]
        if prompting == "chat" and answers.mode != SINGLE:
            r["format_ok"] = statistics.fmean(format_ok(t, thinking=answers.sampled) for t in texts)
        kept = [{"mode": answers.mode, "id": f"ifeval/{it.key}", "response": texts[i * n],
                 "followed": graded[i * n]["strict"]} for i, it in enumerate(items[: cfg.save_samples])]
        return r, kept


def evaluate_items(backend: Backend, tokenizer, items: list, prompting: str, cfg, grader, log=None) -> tuple[dict, list]:
    """A real math suite in each mode (:class:`MathSuiteTask`). Returns (metrics, kept sample records)."""
    return run_task(backend, tokenizer, MathSuiteTask(items, grader), prompting, cfg, log)


def evaluate_ifeval(backend: Backend, tokenizer, items: list, prompting: str, cfg, log=None) -> tuple[dict, list]:
    """IFEval in each mode (:class:`IFEvalTask`). Returns (metrics, kept sample records)."""
    return run_task(backend, tokenizer, IFEvalTask(items), prompting, cfg, log)


def budget_sweep(backend: Backend, tokenizer, problems: list, budgets: list, *, grace: int = 16, max_new_tokens: int = 800,
                 batch_size: int = 64) -> list[dict]:
    """Nano-world accuracy with reasoning on, greedy, the thinking capped at each budget by the rollout
    engine's hook (:class:`thinkfast.generation.budget.ThinkingBudget`; ``None``: no budget). Per budget: accuracy,
    mean thinking tokens, the share closed by the budget, the no-answer rate, mean response tokens."""
    from ..generation.budget import ThinkingBudget

    params = _greedy(tokenizer, max_new_tokens, batch_size)
    prompts = [build_prompt(tokenizer, p, "chat", "on") for p in problems]
    points = []
    for budget in budgets:
        hook = ThinkingBudget(tokenizer, prompts, budget, grace=grace) if budget is not None else None
        done = backend.generate(prompts, params, hook=hook)
        texts = [decoded(tokenizer, c) for c in done]
        parsed = [parse_response(t) for t in texts]
        points.append({
            "budget": budget,
            "accuracy": statistics.fmean(grade(p, t, "chat", "on")["correct"] for p, t in zip(problems, texts)),
            "mean_thinking_tokens": statistics.fmean(
                len(tokenizer.encode(r.reasoning, add_special_tokens=False)) if r.reasoning else 0 for r in parsed),
            "closed_by_budget": len(hook.closed) / len(problems) if hook else 0.0,
            "no_answer": statistics.fmean(r.answer is None for r in parsed),
            "mean_tokens": statistics.fmean(c.n_tokens for c in done)})
    return points


def _mode_width(modes, least: int) -> int:
    """The width of a table's mode column: ``least``, or wider for a long mode label (:data:`MODE_LABELS`)."""
    return max([least, *(len(MODE_LABELS.get(m, m)) + 2 for m in modes)])


def suites_table(results: dict[str, dict]) -> str:
    """One row per model, suite and mode: pass@1 (IFEval: prompt-level strict), maj@n, no-answer rate, toggle
    format compliance, mean tokens ("-" where a suite has no such figure: format in :data:`SINGLE` mode).

    >>> r = {"pass@1": 0.5, "no_answer": 0.0, "mean_tokens": 9.0}
    >>> print(suites_table({"parent": {"suites": {"ifeval": {"single": r}}}}))
    model           suite        mode                   pass@1    maj@n   no ans   format   tokens
    ----------------------------------------------------------------------------------------------
    parent          ifeval       single (no toggle)      0.500        -    0.000        -      9.0
    """
    w = _mode_width((mode for m in results.values() for modes in m.get("suites", {}).values() for mode in modes), 6)
    head = (f"{'model':<16}{'suite':<13}{'mode':<{w}}{'pass@1':>9}{'maj@n':>9}{'no ans':>9}{'format':>9}"
            f"{'tokens':>9}")
    lines = [head, "-" * len(head)]

    def cell(v):
        return f"{'-':>9}" if v is None else f"{v:>9.3f}"

    for name, m in results.items():
        for suite, modes in m.get("suites", {}).items():
            for mode, r in modes.items():
                maj = next((v for k, v in r.items() if k.startswith("maj@")), None)
                lines.append(f"{name:<16}{suite:<13}{MODE_LABELS.get(mode, mode):<{w}}{r['pass@1']:>9.3f}{cell(maj)}"
                             f"{cell(r.get('no_answer'))}{cell(r.get('format_ok'))}{r['mean_tokens']:>9.1f}")
    return "\n".join(lines)


def format_table(metrics: dict) -> str:
    """A plain-text table: one row per cell, one column pair (accuracy, tokens) per mode; a last line says what
    the :data:`SINGLE` mode is when it is there."""
    modes = list(metrics["modes"])
    cells = list(next(iter(metrics["modes"].values()))["cells"])
    head = f"{'cell':<12}" + "".join(f"{m + ' acc':>11}{m + ' tok':>11}" for m in modes)
    lines = [head, "-" * len(head)]
    for key in cells:
        row = f"{key:<12}"
        for m in modes:
            c = metrics["modes"][m]["cells"][key]
            row += f"{c['accuracy']:>11.3f}{c['mean_tokens']:>11.1f}"
        lines.append(row)
    row = f"{'all':<12}"
    for m in modes:
        row += f"{metrics['modes'][m]['accuracy']:>11.3f}{metrics['modes'][m]['mean_tokens']:>11.1f}"
    lines.append(row)
    if SINGLE in modes:
        lines.append(f"{SINGLE}: {MODE_LABELS[SINGLE]}: the chat template ignores enable_thinking; each prompt asked "
                     "once, greedy")
    return "\n".join(lines)


def models_table(results: dict[str, dict]) -> str:
    """One row per model: accuracy overall and at the headline difficulty, toggle format compliance (chat with the
    toggle; "-" otherwise), mean tokens, per mode."""
    w = _mode_width((mode for m in results.values() for mode in m.get("modes", {})), 8)
    head = f"{'model':<16}{'prompting':<11}{'mode':<{w}}{'accuracy':>10}{'headline':>10}{'format':>9}{'tokens':>9}"
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        for mode, r in m.get("modes", {}).items():
            headline = next((v for k, v in r.items() if k.startswith("accuracy_")), None)
            fmt = r.get("format_ok") if m.get("prompting") == "chat" else None
            lines.append(f"{name:<16}{m['prompting']:<11}{MODE_LABELS.get(mode, mode):<{w}}{r['accuracy']:>10.3f}"
                         f"{'' if headline is None else f'{headline:.3f}':>10}{'-' if fmt is None else f'{fmt:.3f}':>9}"
                         f"{r['mean_tokens']:>9.1f}")
    return "\n".join(lines)


def toggle_check(backend: Backend, tokenizer, problems: list, *, max_new_tokens: int = 600, batch_size: int = 64,
                 group=None) -> dict:
    """The toggle, greedy in both modes of the chat template: per mode the accuracy, the share of responses
    in the mode's format (on: one well-formed think block; off: none), the mean response tokens and the
    share cut off by ``max_new_tokens``; ``collapsed`` names a mode the model does not obey (format < 0.5).
    With ``group(problem) -> str``, each mode's ``groups`` has the accuracy, format and count of each group."""
    params = _greedy(tokenizer, max_new_tokens, batch_size)
    out: dict = {}
    for mode in CHAT_MODES:
        prompts = [build_prompt(tokenizer, p, "chat", mode) for p in problems]
        completions = backend.generate(prompts, params, progress=False)
        graded = [grade(p, decoded(tokenizer, c), "chat", mode)
                  for p, c in zip(problems, completions)]
        out[mode] = {"accuracy": statistics.fmean(g["correct"] for g in graded),
                     "format_ok": statistics.fmean(g["format_ok"] for g in graded),
                     "mean_tokens": statistics.fmean(c.n_tokens for c in completions),
                     "truncated": statistics.fmean(c.finish_reason == "length" for c in completions)}
        if group is not None:
            names = [group(p) for p in problems]
            out[mode]["groups"] = {
                name: {"accuracy": statistics.fmean(g["correct"] for g, n in zip(graded, names) if n == name),
                       "format_ok": statistics.fmean(g["format_ok"] for g, n in zip(graded, names) if n == name),
                       "n": names.count(name)} for name in sorted(set(names))}
    out["collapsed"] = [m for m in CHAT_MODES if out[m]["format_ok"] < 0.5] or None
    return out


def if_check(backend: Backend, tokenizer, items: list, *, max_new_tokens: int = 600, batch_size: int = 64,
             scorer=None, modes: tuple[str, ...] = CHAT_MODES) -> dict:
    """Instruction following on nano instruction items (:func:`thinkfast.tasks.instructions.nano_if_items`), greedy,
    every item asked in each of ``modes`` (both modes of the chat template, whatever mode it was made for; the eval
    stage passes :func:`chat_modes`, so a model without the toggle is asked once, in :data:`SINGLE`). Per mode:
    ``if_strict``
    (share of prompts whose answer after the think block follows every instruction: IFEval's prompt-level strict
    accuracy), ``if_loose``, ``if_instructions`` (share of instructions followed, strict), ``accuracy`` (the
    arithmetic answer, :func:`thinkfast.tasks.nano.nano_correct`), ``format_ok`` (the toggle obeyed; None in
    :data:`SINGLE`),
    ``no_answer`` (a malformed think block), ``mean_tokens``, ``truncated``; with ``scorer`` (a reward model: ``score_ids(sequences) -> list[float]``),
    ``rm_score``, its mean score of the prompt + response."""
    from ..tasks import ifeval
    from ..tasks.nano import nano_correct

    params = _greedy(tokenizer, max_new_tokens, batch_size)
    out: dict = {}
    for mode in modes:
        prompts = [chat_ids(tokenizer, [{"role": "user", "content": it.prompt}], mode_thinking(mode)) for it in items]
        completions = backend.generate(prompts, params, progress=False)
        texts = [decoded(tokenizer, c) for c in completions]
        graded = [ifeval.grade(ifeval.IFEvalItem(0, it.prompt, tuple(it.instruction_id_list), tuple(it.kwargs)),
                               parse_response(t).answer or "") for it, t in zip(items, texts)]
        scores = ifeval.score(graded)
        out[mode] = {"if_strict": scores["prompt_level_strict"], "if_loose": scores["prompt_level_loose"],
                     "if_instructions": scores["instruction_level_strict"],
                     "accuracy": statistics.fmean(nano_correct(t, it.problem.answer) for it, t in zip(items, texts)),
                     "format_ok": None if mode == SINGLE else statistics.fmean(format_ok(t, thinking=(mode == "on"))
                                                                              for t in texts),
                     "no_answer": statistics.fmean(parse_response(t).answer is None for t in texts),
                     "mean_tokens": statistics.fmean(c.n_tokens for c in completions),
                     "truncated": statistics.fmean(c.finish_reason == "length" for c in completions)}
        if scorer is not None:
            seqs = [p + list(c.token_ids) for p, c in zip(prompts, completions)]
            out[mode]["rm_score"] = statistics.fmean(scorer.score_ids(seqs))
    return out
