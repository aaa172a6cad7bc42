"""What every grader reads: a completion's text (TRL's two formats) and the answer after its think block.

Reasoning traces are stripped before grading and an unclosed or malformed think block means no answer, never
a graded trace (Llama-Nemotron's evaluation; the parser is :func:`thinkfast.toggle.parse_response`).
"""

from __future__ import annotations

from ..toggle import parse_response

__all__ = ["completion_text", "final_answer"]


def completion_text(completion) -> str:
    """The text of a completion in either of TRL's formats.

    >>> completion_text([{"role": "assistant", "content": "4"}]), completion_text("4")
    ('4', '4')
    """
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def final_answer(text: str) -> str | None:
    """The answer part of a response: after ``</think>`` when it thinks, the whole text when it does not;
    ``None`` for an unclosed or malformed think block.

    >>> final_answer("<think>\\n2+2=4\\n</think>\\n\\nIt is 4."), final_answer("<think>\\nso 4"), final_answer("4")
    ('It is 4.', None, '4')
    """
    return parse_response(text).answer
