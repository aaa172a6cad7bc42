"""Nano world: tasks, teacher traces, answers, documents and the nano tokenizer.

A worked 2-digit document is 80-370 tokens of the nano tokenizer (one token per digit; the longest, a
2-digit product, ~370), so rows of 512 tokens hold every document of the default training mix.
"""

from __future__ import annotations

import random
import re

import pytest

from thinkfast.nano.tasks import (
    KINDS,
    STEP_CUE,
    Problem,
    chat_prompt,
    chat_response,
    eval_suite,
    extract_answer,
    format_answer,
    make_problems,
    pretrain_document,
    sample_problem,
    teacher_trace,
    text_prompt,
    verify,
)


def P(kind: str, a: int, b: int) -> Problem:
    op = {"add": "+", "sub": "-", "mul": "*"}[kind]
    ans = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Problem(kind, len(str(a)), 1, f"{a} {op} {b}", ans, ((op, a, b),))


# ----------------------------------------------------------------- exact traces

EXACT = {
    ("add", 47, 38): """\
47+38: 7+8+0=15, write 5 carry 1, so far 5
4+3: 4+3+1=8, write 8 carry 0, so far 85
47 + 38 = 85""",
    ("sub", 47, 38): """\
47-38: 7-8-0: borrow, 17-8-0=9, write 9 borrow 1, so far 9
4-3: 4-3-1=0, write 0 borrow 0, so far 09
47 - 38 = 9""",
    ("sub", 38, 47): """\
38 < 47, so compute 47 - 38 and negate
47-38: 7-8-0: borrow, 17-8-0=9, write 9 borrow 1, so far 9
4-3: 4-3-1=0, write 0 borrow 0, so far 09
47 - 38 = 9
38 - 47 = -9""",
    ("mul", 47, 38): """\
47 * 38, digit 8:
47*8: 7*8=56, +0=56, write 6 carry 5, so far 6
4*8: 4*8=32, +5=37, write 7 carry 3, so far 76
carry 3, so far 376
47 * 8 = 376
47 * 3, digit 3:
47*3: 7*3=21, +0=21, write 1 carry 2, so far 1
4*3: 4*3=12, +2=14, write 4 carry 1, so far 41
carry 1, so far 141
47 * 3 = 141
shift 1: 1410
376 + 1410:
376+1410: 6+0+0=6, write 6 carry 0, so far 6
37+141: 7+1+0=8, write 8 carry 0, so far 86
3+14: 3+4+0=7, write 7 carry 0, so far 786
0+1: 0+1+0=1, write 1 carry 0, so far 1786
376 + 1410 = 1786
47 * 38 = 1786""",
    ("mul", 9, 9): """\
9 * 9, digit 9:
9*9: 9*9=81, +0=81, write 1 carry 8, so far 1
carry 8, so far 81
9 * 9 = 81""",
    ("mul", 10, 0): """\
10 * 0, digit 0:
10*0: 0*0=0, +0=0, write 0 carry 0, so far 0
1*0: 1*0=0, +0=0, write 0 carry 0, so far 00
10 * 0 = 0""",
    ("add", 0, 0): """\
0+0: 0+0+0=0, write 0 carry 0, so far 0
0 + 0 = 0""",
    ("add", 99, 1): """\
99+1: 9+1+0=10, write 0 carry 1, so far 0
9+0: 9+0+1=10, write 0 carry 1, so far 00
carry 1, so far 100
99 + 1 = 100""",
    ("sub", 100, 1): """\
100-1: 0-1-0: borrow, 10-1-0=9, write 9 borrow 1, so far 9
10-0: 0-0-1: borrow, 10-0-1=9, write 9 borrow 1, so far 99
1-0: 1-0-1=0, write 0 borrow 0, so far 099
100 - 1 = 99""",
    ("mul", 25, 40): """\
25 * 40, digit 0:
25*0: 5*0=0, +0=0, write 0 carry 0, so far 0
2*0: 2*0=0, +0=0, write 0 carry 0, so far 00
25 * 0 = 0
25 * 4, digit 4:
25*4: 5*4=20, +0=20, write 0 carry 2, so far 0
2*4: 2*4=8, +2=10, write 0 carry 1, so far 00
carry 1, so far 100
25 * 4 = 100
shift 1: 1000
0 + 1000:
0+1000: 0+0+0=0, write 0 carry 0, so far 0
0+100: 0+0+0=0, write 0 carry 0, so far 00
0+10: 0+0+0=0, write 0 carry 0, so far 000
0+1: 0+1+0=1, write 1 carry 0, so far 1000
0 + 1000 = 1000
25 * 40 = 1000""",
}


@pytest.mark.parametrize("key", list(EXACT), ids=[f"{k}-{a}-{b}" for k, a, b in EXACT])
def test_exact_traces(key):
    problem = P(*key)
    assert teacher_trace(problem) == EXACT[key]
    check_trace(problem, teacher_trace(problem))


def test_exact_word_trace():
    p = Problem(
        "word", 2, 3,
        "Ann has 47 apples. She buys 3 bags of 12 apples. She gives away 15 apples. "
        "How many apples does Ann have now?",
        68, (("*", 12, 3), ("+", 47, 36), ("-", 83, 15)),
    )
    assert teacher_trace(p) == """\
has 47, total 47
step 1: buys 3 bags of 12: 12 * 3
12 * 3, digit 3:
12*3: 2*3=6, +0=6, write 6 carry 0, so far 6
1*3: 1*3=3, +0=3, write 3 carry 0, so far 36
12 * 3 = 36
step 2: total 47, 47 + 36
47+36: 7+6+0=13, write 3 carry 1, so far 3
4+3: 4+3+1=8, write 8 carry 0, so far 83
47 + 36 = 83
total 83
step 3: gives away 15: 83 - 15
83-15: 3-5-0: borrow, 13-5-0=8, write 8 borrow 1, so far 8
8-1: 8-1-1=6, write 6 borrow 0, so far 68
83 - 15 = 68
total 68"""
    check_trace(p, teacher_trace(p))


# ------------------------------------------------------- trace arithmetic checker

ADD_COL = re.compile(r"(\d)\+(\d)\+(\d)=(\d+), write (\d) carry (\d), so far (\d+)")
MUL_COL = re.compile(r"(\d)\*(\d)=(\d+), \+(\d)=(\d+), write (\d) carry (\d), so far (\d+)")
SUB_COL = re.compile(r"(\d)-(\d)-(\d)=(\d), write (\d) borrow 0, so far (\d+)")
SUB_BORROW = re.compile(r"(\d)-(\d)-(\d): borrow, (\d+)-(\d)-(\d)=(\d), write (\d) borrow 1, so far (\d+)")
CARRY = re.compile(r"carry (\d), so far (\d+)")
RESULT = re.compile(r"(\d+) ([-+*]) (\d+) = (-?\d+)")
MUL_HEAD = re.compile(r"(\d+) \* (\d+), digit (\d):")
PREFIX = re.compile(r"(\d+)[-+*](\d+): (?=\d)")  # what is left of the operands, restated
ADD_HEAD = re.compile(r"(\d+) \+ (\d+):")
SHIFT = re.compile(r"shift (\d+): (\d+)")
STEP = re.compile(r"step (\d+): (?:([a-z][a-z ]*? \d+(?: more| [a-z]+ of \d+)?): |total (\d+), )?(\d+) ([-+*]) (\d+)")
OPENING = re.compile(r"has (\d+), total (\d+)")
NEGATE = re.compile(r"(\d+) < (\d+), so compute (\d+) - (\d+) and negate")
TOTAL = re.compile(r"total (-?\d+)")


def _dig(n: int, i: int) -> int:
    return (n // 10**i) % 10


def check_trace(problem: Problem, trace: str) -> None:
    """Check every line's arithmetic, carries, column digits and copies."""
    assert not trace.endswith("\n") and "\n\n" not in trace
    cols: list[tuple[int, int]] = []  # (x, y) digits used by the current column block
    sofar, carry = "", 0
    last = None  # last "a op b = r" value
    header = None
    steps_seen = []
    value_line = None
    running = None  # the running total of a word problem
    rems: list[tuple[int, int]] = []  # restated remaining operands of the current column block
    for line in trace.split("\n"):
        if pm := PREFIX.match(line):
            rems.append((int(pm.group(1)), int(pm.group(2))))
            line = line[pm.end():]
        if m := MUL_COL.fullmatch(line):
            x, y, prod, c, s, w, co = map(int, m.groups()[:7])
            r = m.group(8)
            assert x * y == prod and prod + c == s, line
        elif m := ADD_COL.fullmatch(line):
            x, y, c, s, w, co = map(int, m.groups()[:6])
            r = m.group(7)
            assert x + y + c == s, line
        if m := MUL_COL.fullmatch(line) or ADD_COL.fullmatch(line):
            assert (w, co) == (s % 10, s // 10), line
            assert c == carry, line
            assert r == f"{w}{sofar}", line
            cols.append((x, y))
            sofar, carry = r, co
        elif m := SUB_COL.fullmatch(line):
            x, y, c, d, w = map(int, m.groups()[:5])
            assert x - y - c == d >= 0 and w == d and c == carry, line
            assert m.group(6) == f"{w}{sofar}", line
            cols.append((x, y))
            sofar, carry = m.group(6), 0
        elif m := SUB_BORROW.fullmatch(line):
            x, y, c, x10, y2, c2, d, w = map(int, m.groups()[:8])
            assert x - y - c < 0 and x10 == x + 10 and (y2, c2) == (y, c) and c == carry, line
            assert x10 - y - c == d == w, line
            assert m.group(9) == f"{w}{sofar}", line
            cols.append((x, y))
            sofar, carry = m.group(9), 1
        elif m := CARRY.fullmatch(line):
            c = int(m.group(1))
            assert c == carry != 0 and m.group(2) == f"{c}{sofar}", line
            sofar, carry = m.group(2), 0
        elif m := RESULT.fullmatch(line):
            a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            assert r == {"+": a + b, "-": a - b, "*": a * b}[op], line
            if cols:
                assert carry == 0, line
                assert int(sofar) == r, line  # the result is a copy of "so far"
                n = len(cols)
                if op == "*":
                    assert header == ("*", a, b), line
                    assert cols == [(_dig(a, i), b) for i in range(n)] and n == len(str(a)), line
                    assert rems == [(a // 10**i, b) for i in range(n)], line
                else:
                    assert a >= b or op == "+", line
                    assert n == max(len(str(a)), len(str(b))), line
                    assert cols == [(_dig(a, i), _dig(b, i)) for i in range(n)], line
                    assert rems == [(a // 10**i, b // 10**i) for i in range(n)], line
                    if header is not None and header[0] == "+":
                        assert header == ("+", a, b), line
            cols, sofar, carry, header, rems = [], "", 0, None, []
            last = r
            value_line = r
        elif m := MUL_HEAD.fullmatch(line):
            assert not cols and int(m.group(2)) % 10 == int(m.group(3)), line
            header = ("*", int(m.group(1)), int(m.group(3)))
        elif m := ADD_HEAD.fullmatch(line):
            assert not cols
            header = ("+", int(m.group(1)), int(m.group(2)))
        elif m := SHIFT.fullmatch(line):
            k, v = int(m.group(1)), int(m.group(2))
            assert k >= 1 and v == last * 10**k and m.group(2) == str(v), line
        elif m := STEP.fullmatch(line):
            assert not cols
            steps_seen.append((m.group(5), int(m.group(4)), int(m.group(6))))
            assert int(m.group(1)) == len(steps_seen), line
            if m.group(2):  # a restated clause is a clause of the question
                assert f" {m.group(2)} " in problem.question.replace(".", " "), line
            if m.group(3):  # a restated running total is the latest one, and the first operand
                assert int(m.group(3)) == running == int(m.group(4)), line
        elif problem.kind == "word" and (m := OPENING.fullmatch(line)):
            assert line == trace.split("\n")[0] and f" has {m.group(1)} " in problem.question, line
            assert m.group(1) == m.group(2), line
            running = int(m.group(2))
        elif m := NEGATE.fullmatch(line):
            a, b = int(m.group(1)), int(m.group(2))
            assert a < b and (int(m.group(3)), int(m.group(4))) == (b, a), line
        elif m := TOTAL.fullmatch(line):
            assert int(m.group(1)) == last, line  # the running total is the last result
            value_line = running = int(m.group(1))
        else:
            raise AssertionError(f"unparsed line {line!r}")
    last_line = trace.split("\n")[-1]
    assert value_line == problem.answer, (last_line, problem.answer)
    if problem.kind == "word":
        assert steps_seen == list(problem.ops)
        assert TOTAL.fullmatch(last_line)
    else:
        op, a, b = problem.ops[0]
        assert last_line == f"{a} {op} {b} = {problem.answer}"


def test_random_traces_are_consistent():
    rng = random.Random(7)
    n = 0
    for kind in KINDS:
        for digits in (1, 2, 3, 4):
            for _ in range(300 if kind != "mul" or digits < 4 else 100):
                steps = rng.randint(1, 4)
                p = sample_problem(rng, kind, digits, steps)
                check_trace(p, teacher_trace(p))
                n += 1
    assert n > 4000


def test_edge_operands():
    for a in (0, 1, 9, 10, 99, 100, 101, 999, 1000, 9999):
        for b in (0, 1, 9, 10, 99, 100, 101, 999, 1000, 9999):
            for kind in ("add", "sub", "mul"):
                p = P(kind, a, b)
                check_trace(p, teacher_trace(p))


# ------------------------------------------------------------------- sampling


def test_sample_problem_operands_and_questions():
    rng = random.Random(0)
    for kind, sym in (("add", "+"), ("sub", "-"), ("mul", "*")):
        for d in (1, 2, 3):
            lo, hi = (0 if d == 1 else 10 ** (d - 1)), 10**d - 1
            for _ in range(200):
                p = sample_problem(rng, kind, d)
                (op, a, b), = p.ops
                assert op == sym and lo <= a <= hi and lo <= b <= hi
                assert p.question == f"{a} {sym} {b}" and (p.kind, p.digits, p.steps) == (kind, d, 1)
                assert p.answer == {"+": a + b, "-": a - b, "*": a * b}[op]
    assert any(sample_problem(rng, "sub", 2).answer < 0 for _ in range(100))
    hash(sample_problem(rng, "word", 2, 3))
    with pytest.raises(ValueError):
        sample_problem(rng, "div", 2)
    with pytest.raises(ValueError):
        sample_problem(rng, "add", 0)


def test_word_problems_chain_and_stay_nonnegative():
    rng = random.Random(3)
    templates, kinds_of_ops = set(), set()
    for _ in range(3000):
        digits, steps = rng.choice((1, 2, 3)), rng.randint(1, 4)
        p = sample_problem(rng, "word", digits, steps)
        assert p.kind == "word" and p.steps == steps == len(p.ops) and p.digits == digits
        assert p.question.endswith(" have now?") and p.question.startswith(p.question.split()[0] + " has ")
        templates.add(p.question.split()[0])
        lo, hi = max(2, 0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
        start = re.match(r"\w+ has (\d+) \w+\. ", p.question)
        if start:
            total = int(start.group(1))
            assert lo <= total <= hi
        else:  # "Ann has 4 bags of 12 apples." sets the total with the first op
            m = re.match(r"\w+ has (\d) \w+ of (\d+) \w+\. ", p.question)
            assert m and p.ops[0] == ("*", int(m.group(2)), int(m.group(1))), p
            total = None
        pending = None
        for op, a, b in p.ops:
            kinds_of_ops.add(op)
            if op == "*":
                assert lo <= a <= hi and 2 <= b <= 9 and pending is None
                assert f"{b} " in p.question and f"of {a} " in p.question
                if total is None:
                    total = a * b  # "Ann has 4 bags of 12 apples."
                else:
                    pending = a * b
                continue
            assert a == total, p  # each op continues from the running total
            if pending is not None:
                assert (op, b) == ("+", pending), p
                pending = None
            else:
                assert lo <= b <= hi
            total = a + b if op == "+" else a - b
            assert total >= 0, p
        assert pending is None and total == p.answer >= 0
    assert len(templates) >= 6 and kinds_of_ops == {"+", "-", "*"}


def test_make_problems_deterministic_and_splits_differ():
    a = make_problems(200, seed=5)
    assert a == make_problems(200, seed=5)
    assert a != make_problems(200, seed=6)
    ev = make_problems(200, seed=5, split="eval")
    assert ev != a and sum(x == y for x, y in zip(a, ev)) < 20
    assert [p.kind for p in a[:8]] == list(KINDS) * 2
    assert {p.digits for p in a} == {1, 2}
    assert all(p.steps == (2 if p.kind == "word" else 1) for p in a)
    w = make_problems(60, seed=1, kinds=("word",), digits=(3,), steps=(2, 3, 4))
    assert {p.steps for p in w} == {2, 3, 4} and all(p.digits == 3 for p in w)
    with pytest.raises(ValueError):
        make_problems(3, 0, kinds=("add", "nope"))
    with pytest.raises(ValueError):
        make_problems(3, 0, split="test")


def test_eval_suite_cells():
    suite = eval_suite(per_cell=20)
    assert set(suite) == {(k, d, 2 if k == "word" else 1) for k in KINDS for d in (1, 2, 3)}
    for (kind, d, s), cell in suite.items():
        assert len(cell) == 20 and len(set(cell)) == 20
        assert all((p.kind, p.digits, p.steps) == (kind, d, s) for p in cell)
    assert suite == eval_suite(per_cell=20)
    assert eval_suite(seed=1, per_cell=20) != suite


# ------------------------------------------------------------------- answers


def test_extract_answer_and_verify():
    assert format_answer(85) == "Answer: 85" and format_answer(-9) == "Answer: -9"
    assert extract_answer("Answer: 85") == 85
    assert extract_answer("Answer:85") == 85
    assert extract_answer("Answer:   -12\n") == -12
    assert extract_answer("Answer: 1\nhmm\nAnswer: 2") == 2
    assert extract_answer("Answer: 1\nAnswer: oops") is None  # the LAST one counts
    assert extract_answer("Answer: 7.") == 7
    assert extract_answer("Answer: 7.5") is None
    assert extract_answer(r"so \boxed{42}") == 42
    assert extract_answer(r"\boxed{1} then \boxed{-3}") == -3
    assert extract_answer(r"Answer: 5 \boxed{6}") == 5
    assert extract_answer("85") is None
    assert extract_answer("") is None
    p = P("sub", 38, 47)
    assert verify(p, "x\nAnswer: -9") and not verify(p, "Answer: 9") and not verify(p, "-9")
    assert verify(p, chat_response(p, True)) and verify(p, chat_response(p, False))


# ----------------------------------------------------------------- documents


def test_prompts_and_documents():
    p = P("add", 47, 38)
    trace = EXACT[("add", 47, 38)]
    assert STEP_CUE == "Let's think step by step."
    assert text_prompt(p, "think") == "Problem: 47 + 38\nLet's think step by step.\n"
    assert text_prompt(p, "direct") == "Problem: 47 + 38\nAnswer: "
    assert pretrain_document(p, "think") == (
        "Problem: 47 + 38\nLet's think step by step.\n" + trace + "\nAnswer: 85")
    assert pretrain_document(p, "direct") == "Problem: 47 + 38\nAnswer: 85"
    for mode in ("think", "direct"):
        doc = pretrain_document(p, mode)
        assert doc.startswith(text_prompt(p, mode)) and verify(p, doc)
    assert pretrain_document(p, "direct")[len(text_prompt(p, "direct")):] == "85"
    assert chat_prompt(p) == "What is 47 + 38?"
    w = sample_problem(random.Random(0), "word", 2, 2)
    assert chat_prompt(w) == w.question
    assert chat_response(p, True) == f"<think>\n{trace}\n</think>\n\nAnswer: 85"
    assert chat_response(p, False) == "Answer: 85"
    with pytest.raises(ValueError):
        text_prompt(p, "fast")
    with pytest.raises(ValueError):
        pretrain_document(p, "fast")


# ----------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    from thinkfast.nano.tokenizer import build_tokenizer

    return build_tokenizer()


def test_tokenizer_round_trip(tok):
    texts = [" a  b\n\n c ", "Answer: -12", "\n", "  ", "tab\tand ünïcode ✓"]
    for p in make_problems(40, seed=2, digits=(1, 2, 3)):
        texts += [teacher_trace(p), pretrain_document(p, "think"), pretrain_document(p, "direct"),
                  chat_response(p, True)]
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert tok.decode(ids) == t
        assert tok.decode(ids, skip_special_tokens=True) == t
    # one token per digit, never merged with a neighbour; words carry their trailing space
    doc = pretrain_document(P("add", 47, 38), "think")
    pieces = tok.convert_ids_to_tokens(tok.encode(doc, add_special_tokens=False))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == [c for c in doc if c.isdigit()]
    assert "writeĠ" in pieces and "carryĠ" in pieces
    assert len(pieces) < 0.6 * len(doc)
    assert tok.encode("ab", add_special_tokens=True) == tok.encode("ab", add_special_tokens=False)


def test_tokenizer_ids_and_special_tokens(tok):
    from thinkfast.nano.tokenizer import NANO_TOKENIZER_ID_COUNT, build_tokenizer

    other = build_tokenizer()
    assert tok.get_vocab() == other.get_vocab() and len(tok) == len(other) == NANO_TOKENIZER_ID_COUNT
    assert tok.eos_token == "<|end_of_text|>" and tok.bos_token == "<|begin_of_text|>"
    assert tok.pad_token_id == tok.eos_token_id == 0 and tok.bos_token_id == 1
    assert tok.unk_token == "<|unk|>" and tok.unk_token_id not in tok.encode("\t\x00é", add_special_tokens=False)
    assert tok.padding_side == "left"
    for t in ("<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
              "<|eot_id|>", "<think>", "</think>"):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [t]
    special = set(tok.all_special_tokens)
    assert {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"} <= special
    assert "<think>" not in special and "</think>" not in special
    ids = tok.encode("<|eot_id|><think>\n1</think>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\n1</think>"
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2 and batch["attention_mask"][0] == [0, 0, 1, 1]
    assert tok.chat_template  # installed by thinkfast.toggle.install_chat_template


def test_tokenizer_chat_template_and_save(tok, tmp_path):
    from transformers import AutoTokenizer

    from thinkfast.nano.tokenizer import save_tokenizer

    p = P("mul", 9, 9)
    msgs = [{"role": "user", "content": chat_prompt(p)},
            {"role": "assistant", "content": chat_response(p, True)}]
    text = tok.apply_chat_template(msgs, tokenize=False, enable_thinking=True)
    assert text.startswith("<|begin_of_text|>") and chat_response(p, True) + "<|eot_id|>" in text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    save_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and loaded.padding_side == "left"
    assert loaded.pad_token == loaded.eos_token == "<|end_of_text|>"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("bad", [
    ("so far 85", "so far 58"),            # digit appended instead of prepended
    ("4+3: 4+3+1", "7+3: 4+3+1"),          # remaining operand restated wrong
    ("4+3+1=8", "4+3+0=7"),                # dropped carry
    ("47 + 38 = 85", "47 + 38 = 86"),      # wrong result
    ("7+8+0=15", "7+9+0=16"),              # wrong operand digit copied
])
def test_checker_rejects_corrupted_traces(bad):
    p = P("add", 47, 38)
    with pytest.raises(AssertionError):
        check_trace(p, EXACT[("add", 47, 38)].replace(*bad))


def test_fact_drills_are_correct_and_use_trace_syntax():
    from thinkfast.nano.tasks import fact_drill_document

    rng = random.Random(3)
    seen = set()
    for _ in range(200):
        doc = fact_drill_document(rng)
        head, *lines = doc.split("\n")
        assert head == "Facts:" and len(lines) == 24
        for line in lines:
            if mm := re.fullmatch(r"(\d)\*(\d)=(\d+), \+(\d)=(\d+)", line):  # the trace's product syntax
                assert int(mm[1]) * int(mm[2]) == int(mm[3]) and int(mm[3]) + int(mm[4]) == int(mm[5]), line
                seen.add("*")
                continue
            m = re.fullmatch(r"(\d+)([-+])(\d)([-+])(\d)=(\d+)", line)
            assert m, line
            x, op, y, op2, c, r = int(m[1]), m[2], int(m[3]), m[4], int(m[5]), int(m[6])
            value = {"+": x + y, "-": x - y, "*": x * y}[op] + (c if op2 == "+" else -c)
            assert value == r and r >= 0, line
            if op == "-":
                assert x < 10 or x - 10 - y - c < 0, line  # 1x only when the column borrows
            seen.add(op)
    assert seen == {"+", "-", "*"}


def test_copy_drills_repeat_their_text_and_mix_in_at_their_share(tok):
    from thinkfast.nano.corpus import documents
    from thinkfast.nano.tasks import copy_drill_document

    rng = random.Random(5)
    for _ in range(50):
        head, copy = copy_drill_document(rng).split("\n")
        assert head.startswith("Text: ") and copy == "Copy: " + head[len("Text: "):]
        assert re.search(r"\d", head)
        # the copy tokenises like the original, so the drill is a token-level repeat
        ids_a = tok.encode(" " + head[len("Text: "):], add_special_tokens=False)
        ids_b = tok.encode(" " + copy[len("Copy: "):], add_special_tokens=False)
        assert ids_a == ids_b
    docs = documents(random.Random(0), 2000, copy_fraction=0.1)
    share = sum(d.startswith("Text: ") for d in docs) / len(docs)
    assert 0.08 < share < 0.12
    # a zero share leaves the document stream exactly as before
    assert documents(random.Random(1), 50) == documents(random.Random(1), 50, copy_fraction=0.0)
    from thinkfast.data import DataConfig

    with pytest.raises(ValueError, match="copy_fraction"):
        DataConfig(copy_fraction=1.5)
    with pytest.raises(ValueError, match="fact_fraction \\+ copy_fraction"):
        DataConfig(copy_fraction=0.6, fact_fraction=0.6)


def test_worded_documents_keep_their_trace_and_long_documents_are_left_out(tok):
    """phrased_fraction words a share of the questions with a training template (never a held-out one) and leaves
    the worked trace as the canonical question's; a zero share leaves the stream as before. A document longer
    than a row (a worked 3-digit product) is left out of packed rows, never cut; a mix none of whose documents
    fits is an error, not a hang."""
    from thinkfast.nano import tasks
    from thinkfast.nano.corpus import documents, packed_rows

    docs = documents(random.Random(0), 3000, kinds=["add", "word"], digits=[1, 2], steps=[2], phrased_fraction=0.3)
    asked = [d.split("\n")[0][len("Problem: "):] for d in docs]
    names = tuple(t[0] + " has " for t in tasks._WORD_TEMPLATES)
    bare = [bool(re.fullmatch(r"\d+ \+ \d+", a)) or (a.startswith(names) and a.endswith("now?")) for a in asked]
    assert 0.25 < 1 - sum(bare) / len(bare) < 0.35
    held = [t.split("{q}")[0] for k in ("arith", "word") for t in tasks.PHRASINGS["held_out"][k]]
    assert not any(a.startswith(tuple(h for h in held if h)) for a in asked)
    p = tasks.Problem("word", 1, 2, "Ann has 4 pens. She buys 3 more pens. How many pens does Ann have now?", 7,
                      (("+", 4, 3),))
    doc = tasks.pretrain_document(p, "think", "Hey, Read carefully. {q} Thanks.")
    assert doc.startswith("Problem: Hey, Read carefully. Ann has 4 pens.") and tasks.teacher_trace(p) in doc
    assert documents(random.Random(1), 50) == documents(random.Random(1), 50, phrased_fraction=0.0)

    rows = packed_rows(tok, random.Random(0), 3, 512, kinds=["mul"], digits=[2, 3], steps=[2], think_fraction=1.0)
    for row in rows.tolist():
        text = tok.decode(row)
        assert not re.search(r"Problem: \d{3} \*", text)  # every worked 3-digit product (~770 tokens) left out
        assert "Problem: " in text
    with pytest.raises(ValueError, match="fits a row of 512"):
        packed_rows(tok, random.Random(0), 1, 512, kinds=["mul"], digits=[3], steps=[2], think_fraction=1.0)


def test_tokenizer_prompts_tokenise_as_inside_documents(tok):
    """A text prompt's tokens are a prefix of the tokens of the document that continues it, so the
    parent sees at evaluation exactly the token boundary it was trained on."""
    for p in make_problems(300, seed=4, digits=(1, 2, 3), steps=(1, 2, 3)):
        for mode in ("think", "direct"):
            prompt = tok.encode(text_prompt(p, mode), add_special_tokens=False)
            doc = tok.encode(pretrain_document(p, mode), add_special_tokens=False)
            assert doc[: len(prompt)] == prompt, (p, mode)


def test_tokenizer_build_is_deterministic_across_processes(tok):
    import subprocess
    import sys

    code = "from thinkfast.nano.tokenizer import build_tokenizer as b; import json; print(json.dumps(b().get_vocab(), sort_keys=True))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import json

    assert json.loads(out) == tok.get_vocab()
