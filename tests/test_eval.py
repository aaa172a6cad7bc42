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


def test_real_suite_metrics_by_hand(tok):
    """pass@1 over samples, pass@k, maj@n, no-answer and format rates, from canned responses."""
    from thinkfast.evaluation import harness as evaluation
    from thinkfast.generation import Completion
    from thinkfast.tasks.math import MathGrader
    from thinkfast.evaluation.suites import Item

    items = [Item("s/0", "What is 1/2 + 1/4?", "\\frac{3}{4}"), Item("s/1", "What is 2+2?", "4")]
    on = ["<think>\nadd\n</think>\n\n$\\boxed{0.75}$", "<think>\nhm\n</think>\n\n$\\boxed{3/4}$",
          "<think>\nno\n</think>\n\n$\\boxed{1}$", "<think>\nnever closed $\\boxed{3/4}$",  # item 0: 2 of 4 right
          "<think>\nx\n</think>\n\nThe answer is $\\boxed{5}$", "<think>\nx\n</think>\n\n$\\boxed{5}$",
          "<think>\nx\n</think>\n\n$\\boxed{4}$", "I think it is $\\boxed{4}$"]  # item 1: 2 of 4 (1 format miss)
    off = ["$\\boxed{\\frac{3}{4}}$", "I do not know"]
    replies = iter([on, off])

    class Scripted:  # a generation backend that answers from the script
        def generate(self, prompts, params, *, hook=None, progress=False):
            texts = next(replies)
            assert len(prompts) == len(texts)
            return [Completion(tok.encode(t, add_special_tokens=False), "stop", []) for t in texts]

        def sync(self, model):
            raise AssertionError("evaluation never syncs")

    cfg = EvalConfig(samples=4, pass_k=[1, 2, 4], save_samples=1)
    with MathGrader(workers=1) as grader:
        m, kept = evaluation.evaluate_items(Scripted(), tok, items, "chat", cfg, grader)
    assert m["on"]["pass@1"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert m["on"]["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(n-c, 2) / C(4, 2) with c = 2 for both
    assert m["on"]["pass@4"] == 1.0
    # maj@4: item 0 votes 0.75 / 3/4 / 1 (the unclosed one has no answer): a tie, the first seen (0.75) wins,
    # right; item 1 votes 5, 5, 4, 4: tie, 5 first, wrong
    assert m["on"]["maj@4"] == 0.5
    assert m["on"]["no_answer"] == pytest.approx(1 / 8) and m["on"]["format_ok"] == pytest.approx(6 / 8)
    assert m["off"]["pass@1"] == 0.5 and m["off"]["maj@1"] == 0.5 and m["off"]["no_answer"] == 0.5
    assert m["off"]["format_ok"] == 1.0 and [k["mode"] for k in kept] == ["on", "off"]
    assert "pass@2" not in m["off"]  # k above the samples is not reported


def test_eval_stage_on_a_real_suite(tmp_path):
    from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
    from thinkfast.evaluation.suites import SUITES, data_root

    if not (data_root() / SUITES["gsm8k"][0]).is_file():
        pytest.skip(f"{data_root()} has no gsm8k")
    pipe = load_pipeline(default_config_path("smoke"), [
        f"run_dir={tmp_path / 'run'}", "stages=[pretrain,sft,eval]", "pretrain.train_steps=2",
        "sft.nano_prompts=4", "sft.batch_size=2", "sft.seq_len=256", "sft.eval_problems=0", "sft.digits=[1]",
        "sft.steps=[1]", "eval.suites=[nano,gsm8k]", "eval.suite_limit=3", "eval.samples=2", "eval.pass_k=[2]",
        "eval.max_new_tokens=8", "eval.per_cell=1", "eval.digits=[1]"])
    for stage in ("pretrain", "sft", "eval"):
        run_stage(pipe, stage)
    m = json.loads((tmp_path / "run" / "eval" / "sft" / "metrics.json").read_text())
    gsm = m["suites"]["gsm8k"]
    assert gsm["on"]["n"] == 3 and gsm["on"]["samples"] == 2 and {"pass@1", "pass@2", "maj@2"} <= set(gsm["on"])
    assert "modes" in m and "gsm8k" in (tmp_path / "run" / "eval" / "table.txt").read_text()


def pipe_overrides(tmp_path):
    return [f"run_dir={tmp_path / 'run'}", "stages=[pretrain,sft,eval]", "pretrain.train_steps=2",
            "sft.nano_prompts=4", "sft.batch_size=2", "sft.seq_len=256", "sft.eval_problems=0", "sft.digits=[1]",
            "sft.steps=[1]", "eval.max_new_tokens=4", "eval.per_cell=1", "eval.digits=[1]",
            "eval.throughput_batches=[1,2]", "eval.throughput_prefill=8", "eval.throughput_context=8",
            "eval.throughput_rounds=2"]


def test_eval_measures_every_models_throughput_side_by_side(tmp_path):
    from thinkfast.pipeline import default_config_path, load_pipeline, run_stage

    pipe = load_pipeline(default_config_path("smoke"), pipe_overrides(tmp_path))
    for stage in ("pretrain", "sft", "eval"):
        run_stage(pipe, stage)
    t = json.loads((tmp_path / "run" / "eval" / "throughput.json").read_text())
    assert list(t["models"]) == ["pretrain", "sft"]
    first = t["models"]["pretrain"]
    assert {"prefill_tok_s@1", "decode_tok_s@2", "x_decode_tok_s@1"} <= set(first) and first["x_prefill_tok_s@2"] == 1
    assert all(v > 0 for v in t["models"]["sft"].values())
    assert "throughput on" in (tmp_path / "run" / "eval" / "table.txt").read_text()
    # eval.skip leaves a stage's model out (and the others' evaluations are reused, not redone)
    skipping = load_pipeline(default_config_path("smoke"), [*pipe_overrides(tmp_path), "eval.skip=[pretrain]"])
    m, _ = run_stage(skipping, "eval")
    assert list(m["models"]) == ["sft"]
    with pytest.raises(ValueError, match=r"eval.skip: \['fuse'\] made no model"):
        run_stage(load_pipeline(default_config_path("smoke"), [*pipe_overrides(tmp_path), "eval.skip=[fuse]"]),
                  "eval")


def test_eval_stage_on_ifeval(tmp_path):
    """IFEval through the eval harness: strict / loose metrics per mode, samples kept with what was followed."""
    from test_eval_endpoint import tiny_chat_model

    from thinkfast.stages.eval import evaluate_folder
    from thinkfast.evaluation.suites import IFEVAL_FILE, data_root

    if not (data_root() / IFEVAL_FILE).is_file():
        pytest.skip(f"{data_root()} has no ifeval")
    folder = tiny_chat_model(tmp_path / "model")
    m = evaluate_folder(EvalConfig(suites=["ifeval"], suite_limit=3, max_new_tokens=8, samples=2, device="cpu"),
                        folder, tmp_path / "out")
    for mode in ("on", "off"):
        r = m["suites"]["ifeval"][mode]
        assert r["n_prompts"] == 3 * r["samples"] and r["pass@1"] == r["prompt_level_strict"]
        assert 0 <= r["prompt_level_strict"] <= r["prompt_level_loose"] <= 1 and r["instruction_level_loose"] <= 1
    assert m["suites"]["ifeval"]["on"]["samples"] == 2
    kept = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {k["suite"] for k in kept} == {"ifeval"} and all("followed" in k for k in kept)
    assert "ifeval" in (tmp_path / "out" / "table.txt").read_text()


def test_eval_chat_modes_sample_on_and_greedy_off(run):
    from helpers import smoke

    from thinkfast.pipeline import run_stage

    pipe = smoke(run, "stages=[pretrain,eval]", "eval.prompting=chat", "eval.samples=2")
    metrics, _ = run_stage(pipe, "eval")
    m = metrics["models"]["pretrain"]
    assert m["prompting"] == "chat" and set(m["modes"]) == {"on", "off"}
    assert m["modes"]["on"]["cells"]["add/1d"]["n"] == 8  # per_cell x samples
    assert m["modes"]["off"]["cells"]["add/1d"]["n"] == 4  # greedy: one sample
    samples = [json.loads(x) for x in (run / "eval" / "pretrain" / "samples.jsonl").read_text().splitlines()]
    assert {s["mode"] for s in samples} == {"on", "off"}



def test_phrasings_train_and_held_out_are_disjoint_and_each_holds_the_question_once():
    for kind in ("arith", "word"):
        train, held = set(tasks.PHRASINGS["train"][kind]), set(tasks.PHRASINGS["held_out"][kind])
        assert len(train) >= 100 and len(held) >= 5 and not train & held
        for template in train | held:
            assert template.count("{q}") == 1
        for word in ("please", "solve", "how much", "tell me", "evaluate", "quick", "help", "teacher", "try"):
            assert not any(word in t.lower() for t in train), word  # held-out wordings share no distinctive word
    assert "{q}" in tasks.PHRASINGS["train"]["arith"] and "{q}" in tasks.PHRASINGS["train"]["word"]  # the bare question
    assert tasks.chat_prompt(PROBLEM) == tasks.chat_prompt(PROBLEM, "What is {q}?") == "What is 47 + 38?"
    with pytest.raises(ValueError, match="phrasing split"):
        tasks.phrasing(PROBLEM, __import__("random").Random(0), "test")


def test_eval_stage_on_held_out_phrasings(tmp_path):
    """nano_phrased: the nano suite's problems, each worded by a held-out template, in both modes, with accuracy,
    format compliance and the template kept with each sample; a text-prompted model skips it with a note."""
    from test_eval_endpoint import tiny_chat_model

    from thinkfast.stages.eval import evaluate_folder

    folder = tiny_chat_model(tmp_path / "model")
    cfg = EvalConfig(suites=["nano", "nano_phrased"], kinds=["add", "word"], digits=[1, 3], per_cell=2,
                     max_new_tokens=8, device="cpu")
    m = evaluate_folder(cfg, folder, tmp_path / "out")
    for mode in ("on", "off"):
        r = m["suites"]["nano_phrased"][mode]
        assert r["pass@1"] == r["accuracy"] and 0 <= r["format_ok"] <= 1
        assert set(r["cells"]) == set(m["modes"][mode]["cells"]) == {"add/1d", "add/3d", "word/1d/2s", "word/3d/2s"}
    kept = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    phrased = [k for k in kept if k.get("suite") == "nano_phrased"]
    held = set(tasks.PHRASINGS["held_out"]["arith"]) | set(tasks.PHRASINGS["held_out"]["word"])
    assert phrased and all(k["template"] in held for k in phrased)
    assert "nano_phrased" in (tmp_path / "out" / "table.txt").read_text()
    text = evaluate_folder(EvalConfig(suites=["nano", "nano_phrased"], kinds=["add"], digits=[1], per_cell=1,
                                      max_new_tokens=4, prompting="text", device="cpu"), folder, tmp_path / "out2")
    assert "suites" not in text and any("nano_phrased skipped" in n for n in text["notes"])
