"""RL prompts from your own files: JSON lines in TRL's prompt format or the Llama-Nemotron schema.

A row is one prompt plus the columns its rewards read (TRL passes a dataset's other columns to every reward
as keyword arguments; so does thinkfast's GRPO):

* TRL: ``{"prompt": "What is 2+2?", "solution": "4"}``, or ``"prompt"`` as a list of ``{"role",
  "content"}`` messages (conversational; a system message may come first);
* Llama-Nemotron post-training schema: ``{"input": ..., "system_prompt": ..., "reasoning": "on"}`` with
  ``input`` a string or messages (``output``, when present, is kept as a column like any other).

The mode (reasoning on or off) is the row's ``reasoning`` field or its system prompt's toggle line
(``detailed thinking on`` / ``off``); a row that states neither takes the stage's ``thinking`` setting. The
prompt must end with a user message. A bad row is a DataError naming its file and line, or skipped and
counted (:func:`thinkfast.data.read_json_rows`).

:func:`file_prompts` turns such files into prompt ids and reward columns, some rows held out;
:func:`nano_prompts` does the same for the nano world's generated problems.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data import DataError, _short, read_json_rows
from ..evaluation import build_prompt, chat_ids
from ..nano import tasks as nano_tasks
from ..toggle import SYSTEM_OFF, SYSTEM_ON

__all__ = ["PromptRow", "RESERVED", "file_prompts", "nano_if_prompts", "nano_prompts", "read_prompts", "row_to_prompt"]

# columns thinkfast sets itself for the rewards (TRL's names where TRL has them)
RESERVED = ("prompts", "completion_ids", "thinking")


@dataclass(frozen=True)
class PromptRow:
    """One RL prompt: its messages (ending with the user's), the mode the row states (None: not stated), the
    reward columns and where it came from."""

    messages: tuple
    thinking: bool | None
    columns: dict = field(default_factory=dict, hash=False)
    source: str = ""


def _toggle(system: str) -> bool | None:
    first = system.lstrip().split("\n", 1)[0].strip()
    return True if first == SYSTEM_ON else False if first == SYSTEM_OFF else None


def _messages(value, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a string or a non-empty list of {{'role', 'content'}} messages, "
                         f"got {_short(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message of {what} needs string 'role' and 'content', got {_short(m)}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {m['role']!r} in {what}; expected system, user or assistant")
        if m["role"] == "system" and i:
            raise ValueError(f"a system message may only come first in {what}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"{what} must end with a user message (the prompt), not {out[-1]['role']!r}")
    return out


def row_to_prompt(row, source: str = "") -> PromptRow:
    """One JSON row -> :class:`PromptRow`; a ValueError says what is wrong with it.

    >>> r = row_to_prompt({"prompt": "What is 2+2?", "solution": "4"})
    >>> r.messages, r.thinking, r.columns
    (({'role': 'user', 'content': 'What is 2+2?'},), None, {'solution': '4'})
    >>> row_to_prompt({"input": "2+2?", "system_prompt": "detailed thinking off", "output": "4"}).thinking
    False
    >>> row_to_prompt({"prompt": [{"role": "assistant", "content": "hi"}]})
    Traceback (most recent call last):
    ...
    ValueError: prompt must end with a user message (the prompt), not 'assistant'
    """
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    key = "prompt" if "prompt" in row else "input" if "input" in row else None
    if key is None:
        raise ValueError(f"a row needs 'prompt' (TRL) or 'input' (Llama-Nemotron); it has keys {sorted(row)}")
    messages = _messages(row[key], key)
    system = row.get("system_prompt")
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"system_prompt must be a string, got {_short(system)}")
        if messages[0]["role"] == "system":
            raise ValueError(f"both system_prompt and a system message in {key}")
        messages.insert(0, {"role": "system", "content": system})
    reasoning = row.get("reasoning")
    if reasoning not in (None, "on", "off"):
        raise ValueError(f"reasoning must be 'on' or 'off', got {_short(reasoning)}")
    stated = None if reasoning is None else reasoning == "on"
    toggle = _toggle(messages[0]["content"]) if messages[0]["role"] == "system" else None
    if stated is not None and toggle is not None and stated != toggle:
        raise ValueError(f"reasoning is {reasoning!r} but the system prompt says "
                         f"{messages[0]['content'].strip().splitlines()[0]!r}")
    columns = {k: v for k, v in row.items() if k not in (key, "system_prompt", "reasoning")}
    clash = sorted(set(columns) & set(RESERVED))
    if clash:
        raise ValueError(f"column(s) {clash} are set by thinkfast for the rewards; rename them")
    return PromptRow(tuple(messages), stated if stated is not None else toggle, columns, source)


def read_prompts(patterns: Sequence[str], skip_bad: bool = False) -> tuple[list[PromptRow], list[str]]:
    """Prompts of JSON-lines files (paths or globs): (rows, skipped rows as ``"file line N: why"``)."""
    return read_json_rows(patterns, row_to_prompt, skip_bad=skip_bad, what="RL prompts")


def nano_prompts(tokenizer, n: int, *, seed: int, kinds: Sequence[str], digits: Sequence[int],
                 steps: Sequence[int], thinking: str = "on", phrasing: str = "canonical"
                 ) -> tuple[list[list[int]], dict[str, list]]:
    """``n`` nano-world training problems (``kinds`` x ``digits`` x ``steps``) as chat prompt ids in mode
    ``thinking`` ("on", "off" or "both": alternating, "on" first), and their reward columns: ``answer`` (the
    integer), ``thinking`` (the mode), ``prompts`` (the messages). ``phrasing``: "canonical" (one wording) or
    "varied" (each prompt worded by a "train" template of :data:`thinkfast.nano.tasks.PHRASINGS`, as toggle SFT's)."""
    if phrasing not in ("canonical", "varied"):
        raise ValueError(f"phrasing={phrasing!r}: choose canonical or varied")
    problems = nano_tasks.make_problems(n, seed=seed, kinds=tuple(kinds), digits=tuple(digits), steps=tuple(steps),
                                        split="train")
    rng = random.Random(f"rl-phrasing:{seed}")
    templates = [nano_tasks.phrasing(p, rng) if phrasing == "varied" else None for p in problems]
    modes = [thinking == "on" or (thinking == "both" and i % 2 == 0) for i in range(len(problems))]
    prompts = [build_prompt(tokenizer, p, "chat", "on" if m else "off", t) for p, m, t in zip(problems, modes, templates)]
    return prompts, {"answer": [p.answer for p in problems], "thinking": modes,
                     "prompts": [[{"role": "user", "content": nano_tasks.chat_prompt(p, t)}]
                                 for p, t in zip(problems, templates)]}


def nano_if_prompts(tokenizer, n: int, *, seed: int, kinds: Sequence[str], digits: Sequence[int],
                    steps: Sequence[int], instructions: Sequence[int] = (1, 3), thinking: str = "both",
                    split: str = "train") -> tuple[list[list[int]], dict[str, list], list]:
    """``n`` nano instruction-following prompts (:func:`thinkfast.tasks.instructions.nano_if_items`: a nano problem
    with 1-3 of IFEval's instructions, each prompt in its own mode) as chat prompt ids, their reward columns
    (``answer``, ``thinking``, ``prompts``, ``instruction_id_list``, ``kwargs``: what ``nano_accuracy``,
    ``think_format`` and the ``ifeval_*`` rewards read) and the items themselves."""
    from ..tasks.instructions import nano_if_items

    items = nano_if_items(n, seed=seed, kinds=tuple(kinds), digits=tuple(digits), steps=tuple(steps), split=split,
                          instructions=tuple(instructions), thinking=thinking)
    messages = [[{"role": "user", "content": it.prompt}] for it in items]
    ids = [chat_ids(tokenizer, m, it.thinking) for m, it in zip(messages, items)]
    return ids, {"answer": [it.problem.answer for it in items], "thinking": [it.thinking for it in items],
                 "prompts": messages, "instruction_id_list": [list(it.instruction_id_list) for it in items],
                 "kwargs": [[dict(k) for k in it.kwargs] for it in items]}, items


def file_prompts(tokenizer, files: Sequence[str], *, held_out: int, seed: int, thinking: str = "on",
                 skip_bad: bool = False, stage: str = "grpo", key: str = "files") -> tuple[list, dict, list, dict, dict]:
    """The prompts of JSON-lines ``files`` as chat prompt ids, ``held_out`` rows (drawn by ``seed``) set aside:
    (train ids, their columns, held-out ids, their columns, ``{"rows", "skipped", "fields"}`` with each file's
    row fields in the order they first appear). A row's mode is its own (:func:`row_to_prompt`), else
    ``thinking`` ("both": alternating). Columns: the rows' fields (``None`` where a row lacks one), ``thinking``,
    ``prompts``. Fewer usable rows than ``held_out + 1`` is a DataError (``stage`` and ``key`` name the config key)."""
    keys: dict[str, dict] = {}  # each file's row fields, in the order they first appear (error messages)

    def convert(row, source: str):
        prompt = row_to_prompt(row, source)
        keys.setdefault(source.rpartition(":")[0], {}).update(dict.fromkeys(row))
        return prompt

    rows, skipped = read_json_rows(files, convert, skip_bad=skip_bad, what="RL prompts")
    if skipped:
        print(f"{stage}: skipped {len(skipped)} bad row(s), e.g. {skipped[0]}")
    if len(rows) <= held_out:
        raise DataError(f"{stage}.{key} {list(files)}: {len(rows)} usable rows, not more than eval_problems="
                        f"{held_out} held out ({len(skipped)} skipped)")
    order = list(range(len(rows)))
    random.Random(f"{stage}-held-out:{seed}").shuffle(order)
    names = sorted({k for r in rows for k in r.columns})

    def part(idx: list[int]) -> tuple[list, dict]:
        chosen = [rows[i] for i in sorted(idx)]
        modes = [r.thinking if r.thinking is not None else thinking == "on" or (thinking == "both" and i % 2 == 0)
                 for i, r in enumerate(chosen)]
        ids = [chat_ids(tokenizer, list(r.messages), m) for r, m in zip(chosen, modes)]
        cols = {k: [r.columns.get(k) for r in chosen] for k in names}
        cols.update(thinking=modes, prompts=[list(r.messages) for r in chosen])
        return ids, cols

    held, train = order[:held_out], order[held_out:]
    return (*part(train), *part(held), {"rows": len(rows), "skipped": len(skipped),
                                        "fields": {f: list(k) for f, k in keys.items()}})
