"""Real math benchmarks from local files: GSM8K, MATH-500, AIME 2024 and 2025.

The files are the byte-exact public copies in the shared data folder (``../shared/data`` next to the
project, or ``$THINKFAST_DATA``; see its SOURCES.md); nothing is downloaded. Each item carries the user
prompt and the gold answer:

* the prompt (every suite): the problem, a blank line, then ``Please reason step by step, and put your final
  answer within \\boxed{}.`` (DeepSeek-R1's recommended math prompt, which the Llama-Nemotron evaluations
  follow); the reasoning toggle is the system prompt's business, not the suite's;
* the gold: GSM8K's number after ``####`` (commas dropped), MATH-500's ``answer`` field, AIME's
  ``expected_answer``, given to math-verify as ``$gold$`` (:attr:`Item.math_gold`); graded with
  :class:`thinkfast.tasks.math.MathGrader` against the response's final answer
  (:func:`thinkfast.tasks.completion.final_answer`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..tasks.math import gsm8k_gold

__all__ = ["IFEVAL_FILE", "MATH_PROMPT", "SUITES", "Item", "data_root", "load_suite"]

MATH_PROMPT = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."

# name -> (file under the data root, problem field, gold field, gold transform)
SUITES = {
    "gsm8k": ("gsm8k/test.jsonl", "question", "answer", gsm8k_gold),
    "math500": ("math500/test.jsonl", "problem", "answer", None),
    "aime24": ("aime24/test.jsonl", "problem", "expected_answer", None),
    "aime25": ("aime25/test.jsonl", "problem", "expected_answer", None),
}

# IFEval (thinkfast.tasks.ifeval): its prompts are used as they are, graded by the instructions' checkers
IFEVAL_FILE = "ifeval/input_data.jsonl"


@dataclass(frozen=True)
class Item:
    """One benchmark problem: its id (``suite/row``), the user prompt and the gold answer."""

    id: str
    prompt: str
    gold: str

    @property
    def math_gold(self) -> str:
        """The gold as math-verify parses it best: in ``$...$`` (a bare ``\\sqrt{51}`` or ``p - q`` does not
        parse)."""
        return f"${self.gold}$"


def data_root() -> Path:
    """``$THINKFAST_DATA``, else ``../shared/data`` from the working directory (the project root)."""
    return Path(os.environ.get("THINKFAST_DATA") or Path.cwd().parent / "shared" / "data")


def load_suite(name: str, root: Path | None = None, limit: int | None = None) -> list[Item]:
    """The items of suite ``name`` (the first ``limit`` when given). A missing file is a FileNotFoundError
    naming it; a row without its fields is a ValueError naming file and line."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {sorted(SUITES)}")
    rel, problem_key, gold_key, transform = SUITES[name]
    path = (root or data_root()) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {name} file is not there (see the shared data folder's SOURCES.md, "
                                "or set THINKFAST_DATA)")
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get(problem_key), str) or row.get(gold_key) is None:
                raise ValueError(f"{path} line {n}: needs '{problem_key}' and '{gold_key}'")
            gold = str(row[gold_key])
            items.append(Item(f"{name}/{len(items)}", MATH_PROMPT.format(problem=row[problem_key]),
                              transform(gold) if transform else gold))
            if limit is not None and len(items) == limit:
                break
    return items
