"""The nano world: verifiable multi-step arithmetic with a programmatic teacher.

Llama-Nemotron is distilled from DeepSeek-R1 reasoning traces on math, code and
science prompts, then taught to switch reasoning on and off.  The nano world is
the laptop-sized stand-in for that data: problems are integer arithmetic
(``add``, ``sub``, ``mul``) and short multi-step word problems (``word``), every
answer is checkable exactly (:func:`verify`), and :func:`teacher_trace` plays the
role of R1 -- a deterministic "long" chain of thought that a tiny Llama, reading
every digit as a token of its own, can learn to imitate.

Trace design (why a sub-million-parameter model can learn it; docs/LOG.md has the
formats tried and how each fared):

* one line per digit column, least-significant digit first;
* each line first restates what is left of the operands (``4+3:`` after
  ``47+38:``), so the digits in play are the last ones just written: copying the
  previous line minus a digit is local, nothing is found by counting columns;
* then the column fact, the digit written and the carry/borrow, spelled out
  (a tiny model uses those extra positions: a compact ``4+3+1: 8 r85`` was worse);
* the running result (``so far``) is built by PREPENDING the new digit, so the
  final ``a + b = r`` line is a copy.

Addition ``47 + 38``::

    47+38: 7+8+0=15, write 5 carry 1, so far 5
    4+3: 4+3+1=8, write 8 carry 0, so far 85
    47 + 38 = 85

Subtraction borrows (``x-y-c: borrow, (x+10)-y-c=d, ...``) and, when ``a < b``,
computes ``b - a`` and negates.  Multiplication multiplies ``a`` by each digit
of ``b`` (right to left, the header ``47 * 38, digit 8:`` restating what is left
of ``b``; each column writes the product, then adds the carry:
``4*8=32, +5=37``), shifts, and sums the partial products pairwise with the
addition trace.  Word problems emit one ``step i:`` block per operation,
restating the clause of the question it comes from
(``step 3: gives away 15: 83 - 15``), each ending with the running ``total N``.

Pretraining documents are plain text (``Problem: ...``), either worked
(think mode, cued by :data:`STEP_CUE`) or bare (direct mode); the chat-side
helpers produce the ``<think>...</think>`` responses used by the toggle SFT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "PHRASINGS",
    "STEP_CUE",
    "Problem",
    "chat_prompt",
    "chat_response",
    "eval_suite",
    "extract_answer",
    "fact_drill_document",
    "format_answer",
    "make_problems",
    "phrasing",
    "pretrain_document",
    "sample_problem",
    "teacher_trace",
    "text_prompt",
    "verify",
]

KINDS = ("add", "sub", "mul", "word")
SPLITS = ("train", "eval")
STEP_CUE = "Let's think step by step."
MODES = ("think", "direct")


@dataclass(frozen=True)
class Problem:
    """One nano-world problem; frozen and hashable."""

    kind: str
    digits: int
    steps: int
    question: str
    answer: int
    ops: tuple[tuple[str, int, int], ...]


# --------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------

def _bounds(digits: int) -> tuple[int, int]:
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def _operand(rng: random.Random, digits: int) -> int:
    lo, hi = _bounds(digits)
    return rng.randint(lo, hi)


# (name, pronoun, item, container, gain verb, loss verb)
_WORD_TEMPLATES = (
    ("Ann", "She", "apples", "bags", "buys", "gives away"),
    ("Ben", "He", "marbles", "boxes", "finds", "loses"),
    ("Cleo", "She", "stickers", "packs", "gets", "uses"),
    ("Dev", "He", "cookies", "trays", "bakes", "eats"),
    ("Eva", "She", "coins", "jars", "earns", "spends"),
    ("Finn", "He", "books", "crates", "receives", "donates"),
    ("Gus", "He", "eggs", "cartons", "collects", "sells"),
    ("Hana", "She", "pencils", "cases", "buys", "lends out"),
)


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown op {op!r}")


def _sample_word(rng: random.Random, digits: int, steps: int) -> Problem:
    """Word problem with exactly ``steps`` operations and a non-negative total.

    A "k containers of m items" action costs two operations: ``("*", m, k)``
    (multiplicand first so the teacher multiplies by a single digit) followed by
    ``("+", total, m*k)``.  A problem may also *start* with containers
    (one ``*`` operation that sets the total).
    """
    if steps < 1:
        raise ValueError(f"word problems need steps >= 1, got {steps}")
    name, pron, item, box, gain, loss = rng.choice(_WORD_TEMPLATES)
    lo, hi = _bounds(digits)
    lo = max(lo, 2)  # 1-digit amounts are 2..9: no "gives away 0 apples", no "1 apples"
    ops: list[tuple[str, int, int]] = []
    remaining = steps
    if rng.random() < 0.25:
        k, m = rng.randint(2, 9), rng.randint(lo, hi)
        sentences = [f"{name} has {k} {box} of {m} {item}."]
        ops.append(("*", m, k))
        total = m * k
        remaining -= 1
    else:
        total = rng.randint(lo, hi)
        sentences = [f"{name} has {total} {item}."]
    while remaining > 0:
        choices = ["add"]
        if total >= lo:
            choices.append("remove")
        if remaining >= 2:
            choices.append("groups")
        action = rng.choice(choices)
        if action == "add":
            n = rng.randint(lo, hi)
            sentences.append(f"{pron} {gain} {n} more {item}.")
            ops.append(("+", total, n))
            total += n
            remaining -= 1
        elif action == "remove":
            n = rng.randint(lo, min(hi, total))  # chosen after the current total
            sentences.append(f"{pron} {loss} {n} {item}.")
            ops.append(("-", total, n))
            total -= n
            remaining -= 1
        else:
            k, m = rng.randint(2, 9), rng.randint(lo, hi)
            sentences.append(f"{pron} {gain} {k} {box} of {m} {item}.")
            ops.append(("*", m, k))
            ops.append(("+", total, m * k))
            total += m * k
            remaining -= 2
    sentences.append(f"How many {item} does {name} have now?")
    return Problem("word", digits, steps, " ".join(sentences), total, tuple(ops))


def sample_problem(rng: random.Random, kind: str, digits: int, steps: int = 2) -> Problem:
    """Sample one problem; ``steps`` is only used by ``kind="word"``.

    >>> p = sample_problem(random.Random(0), "add", 2)
    >>> (p.kind, p.digits, p.steps, p.answer == p.ops[0][1] + p.ops[0][2])
    ('add', 2, 1, True)
    """
    if kind == "word":
        return _sample_word(rng, digits, steps)
    symbol = {"add": "+", "sub": "-", "mul": "*"}.get(kind)
    if symbol is None:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    a, b = _operand(rng, digits), _operand(rng, digits)
    return Problem(kind, digits, 1, f"{a} {symbol} {b}", _apply(symbol, a, b), ((symbol, a, b),))


def _rng(key: str) -> random.Random:
    # sha256 of a "split:seed[:cell]" string: train and eval never share a stream.
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def _check(kinds, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}; expected one of {KINDS}")
    if not kinds:
        raise ValueError("kinds must be non-empty")


def make_problems(n: int, seed: int, kinds=KINDS, digits=(1, 2), steps=(2,),
                  split: str = "train") -> list[Problem]:
    """``n`` deterministic problems.

    Kinds are cycled in order (problem ``i`` has kind ``kinds[i % len(kinds)]``);
    digits and steps are sampled uniformly.  The RNG is seeded from
    ``sha256(f"{split}:{seed}")``, so the train and eval streams never share a
    seed (equal problems can still occur by chance in tiny spaces such as
    1-digit addition).
    """
    kinds, digits, steps = tuple(kinds), tuple(digits), tuple(steps)
    _check(kinds, split)
    if not digits or not steps:
        raise ValueError("digits and steps must be non-empty")
    rng = _rng(f"{split}:{seed}")
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        d = rng.choice(digits)
        s = rng.choice(steps)
        out.append(sample_problem(rng, kind, d, s))
    return out


def eval_suite(seed: int = 1234, per_cell: int = 50, kinds=KINDS, digits=(1, 2, 3),
               steps=(2,)) -> dict[tuple[str, int, int], list[Problem]]:
    """Held-out problems per ``(kind, digits, steps)`` cell (split ``"eval"``).

    ``steps`` in the key is ``problem.steps``: 1 for add/sub/mul, each value of
    ``steps`` for word.  Problems within a cell are distinct where the space
    allows it (1-digit cells have only 100 distinct add/sub/mul problems).
    """
    kinds = tuple(kinds)
    _check(kinds, "eval")
    suite: dict[tuple[str, int, int], list[Problem]] = {}
    for kind in kinds:
        for d in digits:
            for s in (steps if kind == "word" else (1,)):
                rng = _rng(f"eval:{seed}:{kind}:{d}:{s}")
                seen: set[Problem] = set()
                cell: list[Problem] = []
                for _ in range(per_cell * 20):
                    if len(cell) == per_cell:
                        break
                    p = sample_problem(rng, kind, d, s)
                    if p not in seen:
                        seen.add(p)
                        cell.append(p)
                while len(cell) < per_cell:  # space exhausted: allow repeats
                    cell.append(sample_problem(rng, kind, d, s))
                suite[(kind, d, s)] = cell
    return suite


# --------------------------------------------------------------------------
# the teacher
# --------------------------------------------------------------------------

def _add_lines(a: int, b: int) -> list[str]:
    """Column addition, one line per column: what is left of both operands (so the digits in play
    are the last ones just written, never found by counting columns), the column sum with the carry,
    the digit written, the carry out, and the result so far (new digit prepended)."""
    lines, r, c = [], "", 0
    for i in range(max(len(str(a)), len(str(b)))):
        ra, rb = a // 10**i, b // 10**i
        x, y = ra % 10, rb % 10
        s = x + y + c
        r = f"{s % 10}{r}"
        lines.append(f"{ra}+{rb}: {x}+{y}+{c}={s}, write {s % 10} carry {s // 10}, so far {r}")
        c = s // 10
    if c:
        r = f"{c}{r}"
        lines.append(f"carry {c}, so far {r}")
    lines.append(f"{a} + {b} = {a + b}")
    return lines


def _sub_lines(a: int, b: int) -> list[str]:
    lines = []
    big, small = a, b
    if a < b:
        lines.append(f"{a} < {b}, so compute {b} - {a} and negate")
        big, small = b, a
    r, c = "", 0
    for i in range(len(str(big))):
        ra, rb = big // 10**i, small // 10**i
        x, y = ra % 10, rb % 10
        d = x - y - c
        if d < 0:
            d += 10
            r = f"{d}{r}"
            lines.append(f"{ra}-{rb}: {x}-{y}-{c}: borrow, {x + 10}-{y}-{c}={d}, write {d} borrow 1, so far {r}")
            c = 1
        else:
            r = f"{d}{r}"
            lines.append(f"{ra}-{rb}: {x}-{y}-{c}={d}, write {d} borrow 0, so far {r}")
            c = 0
    lines.append(f"{big} - {small} = {big - small}")
    if a < b:
        lines.append(f"{a} - {b} = {a - b}")
    return lines


def _mul_digit_lines(a: int, digit: int) -> list[str]:
    lines, r, c = [], "", 0
    for i in range(len(str(a))):
        ra = a // 10**i
        x = ra % 10
        p = x * digit + c
        r = f"{p % 10}{r}"
        lines.append(f"{ra}*{digit}: {x}*{digit}={x * digit}, +{c}={p}, write {p % 10} carry {p // 10}, so far {r}")
        c = p // 10
    if c:
        r = f"{c}{r}"
        lines.append(f"carry {c}, so far {r}")
    lines.append(f"{a} * {digit} = {a * digit}")
    return lines


def _mul_lines(a: int, b: int) -> list[str]:
    """Long multiplication: one partial product per digit of b, right to left (the header restates
    what is left of b, so the digit in play is its last one), shifted, then summed pairwise."""
    lines: list[str] = []
    shifted: list[int] = []
    for k in range(len(str(b))):
        rest = b // 10**k
        digit = rest % 10
        lines.append(f"{a} * {rest}, digit {digit}:")
        lines += _mul_digit_lines(a, digit)
        value = a * digit * 10**k
        if k > 0:
            lines.append(f"shift {k}: {value}")  # "0", never "00", for a zero partial
        shifted.append(value)
    if len(shifted) > 1:
        total = shifted[0]
        for value in shifted[1:]:
            lines.append(f"{total} + {value}:")
            lines += _add_lines(total, value)
            total += value
        lines.append(f"{a} * {b} = {a * b}")
    return lines


def _op_lines(op: str, a: int, b: int) -> list[str]:
    if op == "+":
        return _add_lines(a, b)
    if op == "-":
        return _sub_lines(a, b)
    if op == "*":
        return _mul_lines(a, b)
    raise ValueError(f"unknown op {op!r}")


def _word_lines(problem: Problem) -> list[str]:
    """One ``step i: a op b`` block per operation, each ending with the running ``total N``.

    A step that a sentence of the question asks for first restates that sentence's clause
    (``step 3: gives away 15: 83 - 15``), so the number and the operation are copied from the text next
    to each other; an opening ``Ann has 47 apples.`` becomes ``has 47, total 47``. The addition that
    follows a "k containers of m" product restates the running total (``step 2: total 47, 47 + 36``):
    ``total`` is followed by a number nowhere else, so that copy reaches back over the product's lines
    by matching one token."""
    statements = [s.strip() for s in re.findall(r"[^.?]+[.?]", problem.question) if s.strip().endswith(".")]
    clauses = [" ".join(s.rstrip(".").split()[1:-1]) for s in statements]  # "buys 3 bags of 12"
    ops = iter(problem.ops)
    lines: list[str] = []
    step = 0
    for j, clause in enumerate(clauses):
        if " of " in clause:  # k containers of m: m * k, then (after the opening sentence) + the total
            _, m, k = next(ops)
            step += 1
            lines.append(f"step {step}: {clause}: {m} * {k}")
            lines += _mul_lines(m, k)
            value = m * k
            if j > 0:
                _, t, v = next(ops)
                step += 1
                lines.append(f"step {step}: total {t}, {t} + {v}")
                lines += _add_lines(t, v)
                value = t + v
            lines.append(f"total {value}")
        elif j == 0:
            lines.append(f"{clause}, total {clause.split()[-1]}")
        else:
            op, a, b = next(ops)
            step += 1
            lines.append(f"step {step}: {clause}: {a} {op} {b}")
            lines += _op_lines(op, a, b)
            lines.append(f"total {_apply(op, a, b)}")
    if next(ops, None) is not None:
        raise ValueError(f"word problem text and ops disagree: {problem}")
    return lines


def teacher_trace(problem: Problem) -> str:
    """Step-by-step worked solution (no trailing newline).

    >>> print(teacher_trace(sample_problem(random.Random(0), "add", 1)))
    6+6: 6+6+0=12, write 2 carry 1, so far 2
    carry 1, so far 12
    6 + 6 = 12
    """
    if problem.kind == "word":
        return "\n".join(_word_lines(problem))
    if len(problem.ops) != 1:
        raise ValueError(f"{problem.kind} problem must have exactly one op")
    return "\n".join(_op_lines(*problem.ops[0]))


# --------------------------------------------------------------------------
# answers and verification
# --------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"Answer:", re.IGNORECASE)  # "answer:" / "ANSWER:" too: all-lowercase or capital replies
_INT_AFTER_RE = re.compile(r"\s*(-?\d+)(?!\.\d)")
_BOXED_RE = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def format_answer(n: int) -> str:
    """The canonical final-answer line.

    >>> format_answer(-7)
    'Answer: -7'
    """
    return f"Answer: {n}"


def extract_answer(text: str) -> int | None:
    """Integer after the LAST ``Answer:`` in any case (``answer:``, ``ANSWER:``: replies asked for all lowercase
    or capital letters); ``\\boxed{N}`` only if no ``Answer:``.

    >>> extract_answer("Answer: 3\\nwait\\nAnswer:  -12")
    -12
    >>> extract_answer("ANSWER: 7"), extract_answer('{"answer": "answer: 7"}')
    (7, 7)
    >>> extract_answer("so it is \\\\boxed{85}")
    85
    >>> extract_answer("Answer: \\\\boxed{5}") is None
    True
    >>> extract_answer("no idea") is None
    True
    """
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _ANSWER_RE.finditer(text)]
    if starts:
        m = _INT_AFTER_RE.match(text, starts[-1])
        return int(m.group(1)) if m else None
    boxed = _BOXED_RE.findall(text)
    return int(boxed[-1]) if boxed else None


def verify(problem: Problem, response: str) -> bool:
    """True when the response's extracted answer equals ``problem.answer``.

    >>> verify(Problem("add", 1, 1, "2 + 3", 5, (("+", 2, 3),)), "Answer: 5")
    True
    >>> verify(Problem("add", 1, 1, "2 + 3", 5, (("+", 2, 3),)), "5")
    False
    """
    return extract_answer(response) == problem.answer


# --------------------------------------------------------------------------
# documents and chat
# --------------------------------------------------------------------------

def text_prompt(problem: Problem, mode: str) -> str:
    """Plain-text prompt; the model completes it with ``trace\\nAnswer: N`` (think)
    or ``N`` (direct).

    >>> p = Problem("add", 2, 1, "47 + 38", 85, (("+", 47, 38),))
    >>> text_prompt(p, "direct")
    'Problem: 47 + 38\\nAnswer: '
    """
    if mode == "think":
        return f"Problem: {problem.question}\n{STEP_CUE}\n"
    if mode == "direct":
        return f"Problem: {problem.question}\nAnswer: "
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def pretrain_document(problem: Problem, mode: str, template: str | None = None) -> str:
    """One pretraining document (the caller joins documents with end-of-text); with ``template`` (one of
    :data:`PHRASINGS`) the question is worded by it.

    >>> print(pretrain_document(Problem("add", 1, 1, "4 + 3", 7, (("+", 4, 3),)), "direct", "Hi! Compute {q}."))
    Problem: Hi! Compute 4 + 3.
    Answer: 7
    """
    asked = problem if template is None else dataclasses.replace(problem, question=chat_prompt(problem, template))
    if mode == "think":  # the trace restates the question's own sentences, whatever wording asked it
        return text_prompt(asked, "think") + teacher_trace(problem) + "\n" + format_answer(problem.answer)
    if mode == "direct":
        return f"Problem: {asked.question}\n{format_answer(problem.answer)}"
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def fact_drill_document(rng: random.Random, n_facts: int = 24) -> str:
    """A drill of single-column facts in the exact syntax the traces use (``7*3=21, +2=23``,
    ``13-5-0=8``): the nano world's times tables. Measured in docs/LOG.md: the parent's errors were
    mostly wrong facts, which the traces alone show too rarely to memorise in a few minutes.

    >>> print(fact_drill_document(random.Random(1), 3))
    Facts:
    9+1+1=11
    7+7+1=15
    6*3=18, +1=19
    """
    lines = []
    for _ in range(n_facts):
        kind = rng.choice(("add", "sub", "mul"))
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        if kind == "add":
            c = rng.randint(0, 1)
            lines.append(f"{x}+{y}+{c}={x + y + c}")
        elif kind == "sub":
            c = rng.randint(0, 1)
            d = x - y - c
            lines.append(f"{x}-{y}-{c}={d}" if d >= 0 else f"{x + 10}-{y}-{c}={d + 10}")
        else:
            c = rng.randint(0, 8)
            lines.append(f"{x}*{y}={x * y}, +{c}={x * y + c}")
    return "Facts:\n" + "\n".join(lines)


def copy_drill_document(rng: random.Random, n_questions: int = 2) -> str:
    """Word-problem questions written out and then copied verbatim: practice for the copy
    ("induction") circuits that the traces need to restate a clause's number. Repeated text is the
    classic trigger for those circuits; without it, some seeds of the parent never learn to copy the
    second digit of a number out of a word problem within the 10-minute budget (docs/LOG.md).

    >>> print(copy_drill_document(random.Random(0), 1))
    Text: Ann has 75 apples. She gives away 61 apples. She gives away 13 apples. How many apples does Ann have now?
    Copy: Ann has 75 apples. She gives away 61 apples. She gives away 13 apples. How many apples does Ann have now?
    """
    text = " ".join(sample_problem(rng, "word", rng.randint(1, 3), rng.randint(1, 3)).question
                    for _ in range(n_questions))
    return f"Text: {text}\nCopy: {text}"


def chat_prompt(problem: Problem, template: str | None = None) -> str:
    """User turn: word problems as is, bare arithmetic as ``What is a op b?`` (the canonical phrasing); or
    ``template`` with the question in place of ``{q}`` (one of :data:`PHRASINGS`).

    >>> chat_prompt(Problem("add", 2, 1, "47 + 38", 85, (("+", 47, 38),)), "{q} = ?")
    '47 + 38 = ?'
    """
    if template is not None:
        return template.format(q=problem.question)
    if problem.kind == "word":
        return problem.question
    return f"What is {problem.question}?"


# How users ask (issue 26): toggle SFT draws each prompt's wording from the "train" templates: a core wording (the
# canonical one, the question alone, other verbs) between an opening and a closing drawn apart (no words, a
# greeting, a remark, a request), 600-odd templates; the "held_out" ones are never trained on (neither their strings
# nor their distinctive words: "please", "solve", "how much", "tell me", "evaluate", "quick", "help", "teacher",
# "try") and measure whether the toggle and the skill survive a wording the model never saw (eval suite
# ``nano_phrased``). Templates for bare arithmetic get the expression ("47 + 38"), word problems' the whole question.
_OPENINGS = ("", "Hi! ", "Hello. ", "Question: ", "Here is one. ", "A small sum for you. ", "I wonder about this. ",
             "Math time. ", "Next problem. ", "Hey, ", "Let me ask you something. ", "Homework: ")
_CLOSINGS = ("", " Thanks.", " Thank you!", " Be careful.", " Show the number.", " I need it now.", " Go.",
             " Give me the result.")
_ARITH_CORES = ("What is {q}?", "{q}", "{q} = ?", "Compute {q}.", "Calculate {q}.", "Work out {q}.",
                "What do you get for {q}?", "Find the value of {q}.", "What does {q} equal?", "Do {q}.",
                "I need {q}. What is it?", "The value of {q} is what?")
_WORD_CORES = ("{q}", "Here is a word problem. {q}", "Read carefully. {q}", "A puzzle for you: {q}", "{q} Work it out.",
               "{q} What number is it?", "Story: {q}")


def _compose(cores: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(o + c + e for c in cores for o in _OPENINGS for e in _CLOSINGS))


PHRASINGS = {
    "train": {"arith": _compose(_ARITH_CORES), "word": _compose(_WORD_CORES)},
    "held_out": {
        "arith": ("Please solve this: {q}", "Can you tell me what {q} is?", "How much is {q}?",
                  "Quick one: {q}", "Evaluate {q}, please."),
        "word": ("Please solve this: {q}", "Can you help me with this? {q}", "{q} Thanks for your help!",
                 "My teacher gave us this: {q}", "Try this one. {q} What is the answer?"),
    },
}


def phrasing(problem: Problem, rng: random.Random, split: str = "train") -> str:
    """A template of ``split`` ("train" or "held_out") for this problem's kind, drawn with ``rng``."""
    if split not in PHRASINGS:
        raise ValueError(f"unknown phrasing split {split!r}; expected one of {list(PHRASINGS)}")
    return rng.choice(PHRASINGS[split]["word" if problem.kind == "word" else "arith"])


def chat_response(problem: Problem, thinking: bool) -> str:
    """Assistant turn for toggle SFT: reasoning in ``<think>`` or the bare answer."""
    if thinking:
        return f"<think>\n{teacher_trace(problem)}\n</think>\n\n{format_answer(problem.answer)}"
    return format_answer(problem.answer)
