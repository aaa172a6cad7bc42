"""Evaluation helpers: prompts per mode, grading with malformed think blocks, prompting detection."""

import json

import pytest

from thinkfast.nano import tasks
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.evaluation import build_prompt, format_table, grade, resolve_prompting
from thinkfast.stages.eval import EvalConfig

PROBLEM = tasks.Problem(kind="add", digits=2, steps=1, question="47 + 38", answer=85, ops=(("+", 47, 38),))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_text_prompts(tok):
    think = tok.decode(build_prompt(tok, PROBLEM, "text", "think"))
    direct = tok.decode(build_prompt(tok, PROBLEM, "text", "direct"))
    assert think == "Problem: 47 + 38\nLet's think step by step.\n"
    assert direct == "Problem: 47 + 38\nAnswer: "


def test_chat_prompts_carry_the_toggle(tok):
    on = tok.decode(build_prompt(tok, PROBLEM, "chat", "on"))
    off = tok.decode(build_prompt(tok, PROBLEM, "chat", "off"))
    assert "<|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on<|eot_id|>" in on
    assert "detailed thinking off" in off and "detailed thinking on" not in off
    for text in (on, off):
        assert "What is 47 + 38?<|eot_id|>" in text
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("prompting,mode,text,correct,fmt", [
    ("text", "think", "7+8+0=15, write 5 carry 1, so far 5\n47 + 38 = 85\nAnswer: 85", True, True),
    ("text", "direct", "84", False, True),
    ("text", "direct", "85", True, True),  # the prompt ends with "Answer: "
    ("text", "think", "47 + 38 = 85", False, True),  # no answer line
    ("chat", "on", "<think>\n47 + 38 = 85\n</think>\n\nAnswer: 85", True, True),
    ("chat", "on", "<think>\n47 + 38 = 85\nAnswer: 85", False, False),  # unclosed: no answer, no guessing
    ("chat", "on", "Answer: 85", True, False),  # right, but did not think
    ("chat", "off", "Answer: 85", True, True),
    ("chat", "off", "<think>\nhmm\n</think>\n\nAnswer: 85", True, False),  # thought when told not to
    ("chat", "off", "<think>a</think>Answer: 1<think>b</think>Answer: 85", False, False),  # repeated blocks
])
def test_grade(prompting, mode, text, correct, fmt):
    assert grade(PROBLEM, text, prompting, mode) == {"correct": correct, "format_ok": fmt}


def test_resolve_prompting(tmp_path, tok):
    assert resolve_prompting(tmp_path, tok, "auto") == "chat"  # nano tokenizer ships a chat template
    (tmp_path / "thinkfast.json").write_text(json.dumps({"prompting": "text"}))
    assert resolve_prompting(tmp_path, tok, "auto") == "text"
    assert resolve_prompting(tmp_path, tok, "chat") == "chat"


def test_format_table():
    cell = {"accuracy": 0.5, "mean_tokens": 10.0, "format_ok": 1.0, "truncated": 0.0, "n": 2}
    metrics = {"modes": {m: {"accuracy": 0.5, "mean_tokens": 10.0, "cells": {"add/2d": cell}} for m in ("on", "off")}}
    lines = format_table(metrics).splitlines()
    assert lines[0].split() == ["cell", "on", "acc", "on", "tok", "off", "acc", "off", "tok"]
    assert lines[2].split() == ["add/2d", "0.500", "10.0", "0.500", "10.0"]
    assert lines[3].split()[0] == "all"


def test_eval_config_validation():
    with pytest.raises(ValueError, match="unknown kind"):
        EvalConfig(kinds=["add", "pow"])
    with pytest.raises(ValueError, match="per_cell"):
        EvalConfig(per_cell=0)
