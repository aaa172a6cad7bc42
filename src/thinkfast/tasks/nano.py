"""The nano world's task: its verifier as evaluation's grader and as GRPO's accuracy reward.

The verifier (:func:`thinkfast.nano.tasks.extract_answer`) reads the integer after the last ``Answer:``
(``\\boxed{N}`` only when there is no ``Answer:``); a chat response is graded on its answer after the think
block, and an unclosed or malformed block is wrong.
"""

from __future__ import annotations

from ..nano.tasks import extract_answer
from .completion import completion_text, final_answer

__all__ = ["nano_accuracy", "nano_correct"]


def nano_correct(text: str, answer: int, *, after_think: bool = True) -> bool:
    """Whether ``text`` answers ``answer``: the verifier on the answer after the think block (``after_think``;
    a malformed block is wrong), or on the whole text (plain-text prompting, where the prompt's own tail
    ``Answer: `` is part of it).

    >>> nano_correct("<think>\\n2+2\\n</think>\\n\\nAnswer: 4", 4), nano_correct("<think>Answer: 4", 4)
    (True, False)
    >>> nano_correct("Problem: 2 + 2\\nAnswer: 4", 4, after_think=False)
    True
    """
    if after_think:
        text = final_answer(text)
        if text is None:
            return False
    return extract_answer(text) == int(answer)


def nano_accuracy(completions, answer, **kwargs) -> list[float]:
    """The reward: 1.0 when :func:`nano_correct` (the answer after the think block is ``Answer: <answer>``).

    >>> nano_accuracy(["<think>\\n2+2\\n</think>\\n\\nAnswer: 4", "<think>Answer: 4", "Answer: 5"], [4, 4, 4])
    [1.0, 0.0, 0.0]
    """
    return [1.0 if nano_correct(completion_text(c), a) else 0.0 for c, a in zip(completions, answer)]
