"""The reasoning toggle's format rule (Llama-Nemotron section 5): evaluation's ``format_ok`` and GRPO's
format reward are the same check.

"on" needs exactly one ``<think>`` ... ``</think>`` pair, in order, with reasoning in it, before the answer;
"off" needs no think tags (:func:`thinkfast.toggle.format_ok`, the grader, lives with the toggle's parser).
"""

from __future__ import annotations

from ..toggle import format_ok
from .completion import completion_text

__all__ = ["format_ok", "think_format"]


def think_format(completions, thinking, **kwargs) -> list[float]:
    """1.0 when the response obeys the requested mode (``thinking`` True: one well-formed think block
    with reasoning in it; False: no think tags).

    >>> think_format(["<think>\\nx\\n</think>\\n\\n4", "4", "<think>\\nx\\n</think>\\n\\n4"], [True, False, False])
    [1.0, 1.0, 0.0]
    """
    return [1.0 if format_ok(completion_text(c), bool(t)) else 0.0 for c, t in zip(completions, thinking)]
