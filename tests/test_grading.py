"""Grading and estimators against the reference implementations: math-verify's own verify(parse(gold),
parse(pred)), GSM8K's #### convention, pass@k by enumeration."""

from __future__ import annotations

import itertools
import time
from math import comb

import pytest

from thinkfast.evaluation.estimators import maj_at_n, pass_at_k
from thinkfast.tasks.completion import final_answer
from thinkfast.tasks.math import MathGrader, gsm8k_gold

# (gold, response): units, commas, fractions, LaTeX, several boxed answers, answers inside the think block,
# unclosed think blocks, plain final numbers
CASES = [
    ("$\\frac{1}{2}$", "The answer is $\\boxed{0.5}$."),
    ("1234", "So she has $\\boxed{1,234}$ apples."),
    ("12", "It costs $\\boxed{12\\text{ dollars}}$"),
    ("4", "First $\\boxed{3}$, then finally $\\boxed{4}$"),
    ("3", "First $\\boxed{3}$, then finally $\\boxed{4}$"),
    ("$\\sqrt{8}$", "$\\boxed{2\\sqrt{2}}$"),
    ("$(x+1)^2$", "$\\boxed{x^2+2x+1}$"),
    ("18", "Janet makes 16 - 3 - 4 = 9 eggs... 9 * 2 = 18 dollars. The answer is 18."),
    ("7", "The answer is $\\boxed{8}$"),
    ("5", "I do not know."),
    ("4", "<think>\nmaybe $\\boxed{4}$\n</think>\n\n$\\boxed{5}$"),
    ("4", "<think>\nso it is $\\boxed{4}$"),
    ("4", "<think>\nwork\n</think>\n\nThe answer is $\\boxed{4}$."),
    ("$\\{1,2\\}$", "$\\boxed{\\{2, 1\\}}$"),
    ("$-\\infty$", "$\\boxed{-\\infty}$"),
    ("0.25", "$\\boxed{\\frac{1}{4}}$"),
]


def test_pass_at_k_equals_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                right = [1] * c + [0] * (n - c)
                subsets = list(itertools.combinations(range(n), k))
                want = sum(any(right[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_vote():
    assert maj_at_n(["a", "b", "b"], [True, False, False]) is False
    assert maj_at_n([None, "a", None, None], [False, True, False, False]) is True


def test_gsm8k_gold_and_final_answer():
    assert gsm8k_gold("So 3 + 4 = <<3+4=7>>7.\n#### 7") == "7"
    assert gsm8k_gold("#### -1,000.5") == "-1000.5"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker")
    assert final_answer("<think>\nx\n</think>\n\n42") == "42" and final_answer("<think>\nx") is None


def test_grader_matches_math_verify_on_tricky_strings():
    from math_verify import parse, verify

    preds = [final_answer(r) for _, r in CASES]
    want = [p is not None and bool(verify(parse(g), parse(p))) for (g, _), p in zip(CASES, preds)]
    with MathGrader(workers=2) as grader:
        got = grader.grade([g for g, _ in CASES], preds)
    assert got == want
    # the cases are not trivial: some right, some wrong, and the think block decides three of them
    assert got[:3] == [True] * 3 and got[8:12] == [False] * 4 and got[12] is True


def slow_check(gold: str, pred: str) -> bool:
    if pred == "hang":
        time.sleep(60)
    return gold == pred


def test_a_hanging_answer_is_wrong_and_the_rest_are_graded():
    t = time.perf_counter()
    with MathGrader(workers=2, timeout=3, check="test_grading:slow_check") as grader:
        got = grader.grade(["1", "2", "3", "4", "5"], ["1", "hang", "3", None, "x"])
        assert grader.timeouts == 1
        assert grader.grade(["6"], ["6"]) == [True]  # the pool was replaced and works
    assert got == [True, False, True, False, False]
    assert time.perf_counter() - t < 40


SUITE_SIZES = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30}


@pytest.mark.parametrize("name", sorted(SUITE_SIZES))
def test_real_suites_load_from_the_shared_data(name):
    from thinkfast.evaluation.suites import SUITES, data_root, load_suite

    if not (data_root() / SUITES[name][0]).is_file():
        pytest.skip(f"{data_root()} has no {name}")
    items = load_suite(name)
    assert len(items) == SUITE_SIZES[name] and len({i.id for i in items}) == len(items)
    assert all(i.prompt.endswith("put your final answer within \\boxed{}.") and i.gold for i in items)
    if name == "gsm8k":
        assert items[0].gold == "18"  # Janet's ducks
    # every gold parses under math-verify (a gold that does not would make its item ungradable)
    from math_verify import parse

    assert all(parse(i.math_gold) for i in items)


def test_unknown_or_missing_suite(tmp_path):
    from thinkfast.evaluation.suites import load_suite

    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("nope")
    with pytest.raises(FileNotFoundError, match="gsm8k"):
        load_suite("gsm8k", root=tmp_path)
