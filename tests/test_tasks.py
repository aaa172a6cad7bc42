"""One grader per task, reused as its reward (thinkfast.tasks): evaluation's grading and GRPO's reward are the
same check, fed the same strings here, including those on which the two math graders disagreed before."""

from __future__ import annotations

import pytest

from thinkfast.evaluation import grade as nano_eval_grade
from thinkfast.nano.tasks import Problem
from thinkfast.rl.rewards import BUILTIN, RewardRunner
from thinkfast.tasks import ifeval
from thinkfast.tasks.completion import final_answer
from thinkfast.tasks.math import MathGrader, math_accuracy
from thinkfast.toggle import format_ok, parse_response

# (gold, response, right). The first ten split the old graders: evaluation graded the answer with
# math-verify's default parse (as now), GRPO's reward with TRL's accuracy_reward extraction (LaTeX only,
# boxed first, an anchor required, first match only)
MATH = [
    ("$18$", "Janet sells 9 eggs at $2 each: 9 * 2 = 18 dollars. The answer is 18.", True),
    ("$4$", "<think>\n2+2\n</think>\n\n4", True),
    ("$\\frac{1}{2}$", "\\frac{1}{2}", True),
    ("$\\frac{1}{2}$", "Answer: 1/2", True),
    ("$12$", "It costs 12 dollars.", True),
    ("$5$", "$5$", True),
    ("$3$", "$\\boxed{4}$. So the final answer is $3$", True),
    ("$4$", "$\\boxed{4}$. So the final answer is $3$", False),
    ("$4$", "First $\\boxed{4}$, then $\\boxed{}$", True),
    ("$2$", "I think $2$ is right. $\\boxed{}$", True),
    # agreed before and still: think blocks, several boxes, symbolic equality, units, wrong or no answers
    ("$4$", "<think>\nmaybe $\\boxed{4}$\n</think>\n\n$\\boxed{5}$", False),
    ("$4$", "<think>\nso it is $\\boxed{4}$", False),
    ("$4$", "<think>\nwork\n</think>\n\nThe answer is $\\boxed{4}$.", True),
    ("$4$", "First $\\boxed{3}$, then finally $\\boxed{4}$", True),
    ("$\\sqrt{8}$", "$\\boxed{2\\sqrt{2}}$", True),
    ("$(x+1)^2$", "$\\boxed{x^2+2x+1}$", True),
    ("$\\{1,2\\}$", "$\\boxed{\\{2, 1\\}}$", True),
    ("$0.5$", "$\\boxed{50\\%}$", True),
    ("$12$", "It costs $\\boxed{12\\text{ dollars}}$", True),
    ("$1234$", "So she has $\\boxed{1,234}$ apples.", True),
    ("$7$", "The answer is $\\boxed{8}$", False),
    ("$5$", "I do not know.", False),
]
DISAGREED = 10


def _old_reward(gold: str, response: str) -> float:
    """GRPO's math reward before thinkfast.tasks (TRL's accuracy_reward extraction on the final answer)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True), boxed_match_priority=0,
                                    try_extract_without_anchor=False)]
    final = parse_response(response).answer
    if final is None:
        return 0.0
    return float(verify(parse(gold), parse(final, extraction_config=config, extraction_mode="first_match")))


def test_evaluation_math_grading_and_the_grpo_math_reward_agree_on_tricky_strings():
    golds, texts, want = [g for g, _, _ in MATH], [t for _, t, _ in MATH], [w for _, _, w in MATH]
    # evaluation's path (evaluation.evaluate_items): the answer after the think block, graded in workers
    with MathGrader(workers=2) as grader:
        evaluated = grader.grade(golds, [final_answer(t) for t in texts])
    # GRPO's path: the built-in reward by name, in the runner's thread (math-verify's timeouts off) ...
    total, parts, errors = RewardRunner([("math_accuracy", BUILTIN["math_accuracy"], 1.0)])(
        [[{"role": "assistant", "content": t}] for t in texts], [False] * len(texts), {"solution": golds})
    assert not errors
    # ... and called in the main thread, on plain-text completions
    direct = math_accuracy(texts, golds)
    assert evaluated == want
    assert parts["math_accuracy"] == total == direct == [float(w) for w in want]
    # the strings are tricky: the old reward disagreed with evaluation on the first ten, agreed on the rest
    old = [_old_reward(g, t) for g, t in zip(golds, texts)]
    assert [o != w for o, w in zip(old, want)] == [True] * DISAGREED + [False] * (len(MATH) - DISAGREED)


def test_a_gold_that_does_not_parse_is_unscorable_for_the_reward_and_wrong_for_evaluation():
    assert math_accuracy(["$\\boxed{4}$", "4"], ["not math at all", "$4$"]) == [None, 1.0]
    with MathGrader(workers=1) as grader:
        assert grader.grade(["not math at all"], ["4"]) == [False]


PROBLEM = Problem("add", 1, 1, "2 + 3", 5, (("+", 2, 3),))
NANO = ["<think>\nx\n</think>\n\nAnswer: 5", "<think>Answer: 5", "Answer: 5\nAnswer: 6", "so \\boxed{5}",
        "<think>\nAnswer: 5\n</think>\n\nAnswer: 4", "5", "Answer: 5", "a</think>Answer: 5"]


def test_nano_grading_and_reward_agree():
    evaluated = [nano_eval_grade(PROBLEM, t, "chat", "on")["correct"] for t in NANO]
    assert evaluated == [True, False, False, True, False, False, True, False]
    assert BUILTIN["nano_accuracy"](NANO, [5] * len(NANO)) == [float(x) for x in evaluated]


THINK = ["<think>\nx\n</think>\n\n4", "<think>\n</think>\n\n4", "4", "<think>x", "<think>a</think>b<think>c</think>d"]


@pytest.mark.parametrize("thinking", [True, False])
def test_think_format_grading_and_reward_agree(thinking):
    evaluated = [format_ok(t, thinking=thinking) for t in THINK]
    assert evaluated == ([True, False, False, False, False] if thinking else [False, False, True, False, False])
    assert BUILTIN["think_format"](THINK, [thinking] * len(THINK)) == [float(x) for x in evaluated]


IDS = ["punctuation:no_comma", "startend:end_checker"]
KW = [{}, {"end_phrase": "Any other questions?"}]
IFEVAL = ["<think>\nHmm, fine\n</think>\n\nAll good. Any other questions?",  # comma in the thinking only
          "All good, right? Any other questions?",  # a comma
          "**All good. Any other questions?**",  # strict: ends with **; loose: without the asterisks
          "All good. Any other questions?\nP.S. bye",  # loose: without the last line
          "<think>\nAll good. Any other questions?",  # unclosed: no answer
          "All good."]


def test_ifeval_grading_and_rewards_agree_strict_and_loose():
    item = ifeval.IFEvalItem(1, "Say it.", tuple(IDS), tuple(KW))
    # evaluation's path (evaluation.evaluate_ifeval): the answer after the think block, "" for none
    graded = [ifeval.grade(item, parse_response(t).answer or "") for t in IFEVAL]
    strict, loose = [float(all(g["strict"])) for g in graded], [float(all(g["loose"])) for g in graded]
    assert strict == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0] and loose == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    columns = {"instruction_id_list": [IDS] * len(IFEVAL), "kwargs": [KW] * len(IFEVAL),
               "prompts": [[{"role": "user", "content": "Say it."}]] * len(IFEVAL)}
    completions = [[{"role": "assistant", "content": t}] for t in IFEVAL]
    assert BUILTIN["ifeval_strict"](completions, **columns) == strict
    assert BUILTIN["ifeval_loose"](completions, **columns) == loose
    # the Hugging Face copy's shapes: kwargs as JSON text, unused keys filled with None
    hf = ['[{"end_phrase": null}, {"end_phrase": "Any other questions?", "num_words": null}]'] * len(IFEVAL)
    assert BUILTIN["ifeval_loose"](completions, [IDS] * len(IFEVAL), hf) == loose


def test_the_ifeval_reward_fails_closed_on_an_unknown_instruction():
    with pytest.raises(ValueError, match="unknown IFEval instruction id.*no:such"):
        ifeval.ifeval_strict(["fine"], [["no:such"]], [[{}]])
    # through the runner: an error naming the reward, and 0, never a pass
    total, _, errors = RewardRunner([("ifeval_strict", ifeval.ifeval_strict, 1.0)])(
        ["fine"], [False], {"instruction_id_list": [["no:such"]], "kwargs": [[{}]]})
    assert total == [0.0] and [e.reward for e in errors] == ["ifeval_strict"]


def test_ifeval_rows_are_rl_prompt_rows_for_the_ifeval_reward():
    """A row of IFEval's data (Google's or the Hugging Face copy, with None-filled kwargs) is a GRPO prompt row
    as it is: ``prompt`` is the prompt, ``instruction_id_list`` and ``kwargs`` reach the reward as columns."""
    from thinkfast.rl.prompts import row_to_prompt
    from thinkfast.rl.rewards import missing_columns

    row = {"key": 7, "prompt": "Answer without commas and end with 'Bye.'",
           "instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
           "kwargs": [{"end_phrase": None}, {"end_phrase": "Bye.", "num_words": None}]}
    r = row_to_prompt(row)
    assert r.messages == ({"role": "user", "content": row["prompt"]},) and set(r.columns) == {
        "key", "instruction_id_list", "kwargs"}
    columns = {k: [v] * 3 for k, v in r.columns.items()}
    for name in ("ifeval_strict", "ifeval_loose"):
        assert missing_columns(BUILTIN[name], columns) == []
    texts = ["<think>\nok, so\n</think>\n\nFine. Bye.", "Fine, Bye.", "<think>\nFine. Bye."]
    assert BUILTIN["ifeval_strict"](texts, prompts=[list(r.messages)] * 3, **columns) == [1.0, 0.0, 0.0]
