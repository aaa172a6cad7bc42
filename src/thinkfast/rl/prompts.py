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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data import _short, read_json_rows
from ..toggle import SYSTEM_OFF, SYSTEM_ON

__all__ = ["PromptRow", "RESERVED", "read_prompts", "row_to_prompt"]

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
