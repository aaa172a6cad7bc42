"""A real parent's recipe data from files instead of the nano world (issue 27): the toggle in a ChatML template (no
new tokens, the assistant mask), a corpus of chat JSON lines beside plain text, GSM8K made into every stage's file
(disjoint parts, no IFEval test prompt; the real split under ../shared/data, skipped when absent), the periodic checks
on prompt files, and sft (a Llama-3 and a ChatML parent) / reward_model / rpo reading those files in the pipeline on
tiny random chat models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_eval_endpoint import tiny_chat_model

from thinkfast.config import ConfigError
from thinkfast.data import Corpus, DataConfig, DataError
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.stages import sft as sft_stage
from thinkfast.toggle import (CHATML_TEMPLATE, SYSTEM_OFF, SYSTEM_ON, has_toggle, install_chat_template,
                              messages_for, stop_token_ids, template_layout)
from thinkfast.train.sft import Example, tokenize_example

SHARED = Path(os.environ.get("THINKFAST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
GSM8K_TRAIN = SHARED / "gsm8k" / "train.jsonl"

# SmolLM2-135M-Instruct's own chat template: plain ChatML, no toggle
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ON = "<think>\n2 plus 2 is 4.\n</think>\n\n4"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ the toggle in ChatML


def chatml_tokenizer():
    """The nano tokenizer with ChatML's turn tokens as special tokens and SmolLM2's plain ChatML template."""
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = SMOL_TEMPLATE
    return tok


def test_a_chatml_template_gains_the_toggle_and_no_tokens():
    tok = chatml_tokenizer()
    assert template_layout(tok) == "chatml" and template_layout(build_tokenizer()) == "llama3"
    assert not has_toggle(tok)  # SmolLM2's template ignores enable_thinking
    vocab, n = dict(tok.get_vocab()), len(tok)
    assert install_chat_template(tok) == []
    assert tok.chat_template == CHATML_TEMPLATE and has_toggle(tok)
    assert len(tok) == n and tok.get_vocab() == vocab  # the vocabulary is untouched
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tok) and tok.eos_token_id in stop_token_ids(tok)

    user = [{"role": "user", "content": "What is 2+2?"}]

    def prompt(messages, **kw):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)

    tail = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt(user, enable_thinking=True) == "<|im_start|>system\ndetailed thinking on<|im_end|>\n" + tail
    assert prompt(user, enable_thinking=False) == "<|im_start|>system\ndetailed thinking off<|im_end|>\n" + tail
    assert prompt(user) == tail  # no flag, no system message: no system turn
    # a user's system message stays after the toggle line; the flag replaces a toggle line already there
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert prompt(own, enable_thinking=False) == ("<|im_start|>system\ndetailed thinking off\n\nBe brief.<|im_end|>\n"
                                                  + tail)
    legacy = [{"role": "system", "content": SYSTEM_ON + "\n\nBe brief."}, *user]
    assert prompt(legacy, enable_thinking=False) == prompt(own, enable_thinking=False)
    assert prompt([{"role": "system", "content": SYSTEM_OFF}, *user]) == prompt(user, enable_thinking=False)
    assert prompt(user, enable_thinking=False, prefill_empty_think=True).endswith("assistant\n<think>\n</think>\n\n")
    with pytest.raises(ValueError, match="layout='gemma'"):
        install_chat_template(chatml_tokenizer(), layout="gemma")


@pytest.mark.parametrize("thinking, response", [(True, ON), (False, "4")])
def test_the_chatml_assistant_mask_is_the_response_and_its_end(thinking, response):
    tok = chatml_tokenizer()
    install_chat_template(tok)
    messages = messages_for("What is 2+2?", thinking, response)
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    assert tok.decode(ids) == (f"<|im_start|>system\n{SYSTEM_ON if thinking else SYSTEM_OFF}<|im_end|>\n"
                               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                               f"<|im_start|>assistant\n{response}<|im_end|>\n")
    first, last = mask.index(1), len(mask) - 1 - mask[::-1].index(1)
    assert mask == [0] * first + [1] * (last + 1 - first) + [0] * (len(mask) - 1 - last)  # one span
    assert tok.decode(ids[first:last + 1]) == response + "<|im_end|>"
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n") and tok.decode(ids[last + 1:]) == "\n"
    assert tokenize_example(tok, Example(tuple(messages), thinking, "t")) == (ids, mask)
    # an earlier assistant turn is context: its think block dropped, nothing of it learned
    turns = (*messages, {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"})
    ids2, mask2 = tokenize_example(tok, Example(turns, thinking, "t"))
    assert tok.decode([i for i, m in zip(ids2, mask2) if m]) == "6<|im_end|>"
    assert "<think>" not in tok.decode(ids2)


# ------------------------------------------------------------------------------ chat lines beside plain text


TOK = build_tokenizer()


def test_a_corpus_of_chat_lines_and_plain_text_has_documents_of_both(tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                           {"role": "assistant", "content": f"{2 * i}"}]} for i in range(30)]
    chat = write_jsonl(tmp_path / "chat.jsonl", chats)
    paras = [f"Paragraph {i} of the sea and of the wind number {i}." for i in range(30)]
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(paras) + "\n")
    c = Corpus(DataConfig(files=[str(chat), str(text)], messages_field="messages", held_out=0.5), TOK)
    assert c.documents("train") + c.documents("held_out") == 60
    for split in ("train", "held_out"):
        files = {fi for fi, _ in c._index[split]}
        assert files == {0, 1}, split  # both files on both sides of the split (30 each, held out by hash)
    # a chat row is rendered with the template, then the document's end; a paragraph stays text
    want = TOK.apply_chat_template(chats[3]["messages"], tokenize=False)
    assert "<|start_header_id|>user<|end_header_id|>" in want
    end = [c.doc_eos] if c.doc_eos is not None else []
    assert c._tokens(0, 3) == TOK(want, add_special_tokens=False)["input_ids"] + end
    prose = TOK.decode(c._tokens(1, 3), skip_special_tokens=True)
    assert prose.strip() == paras[3] and "<|start_header_id|>" not in TOK.decode(c._tokens(1, 3))
    rows = "".join(TOK.decode(r) for split in ("train", "held_out") for r in c.rows(split, "k", 8, 64).tolist())
    assert "<|start_header_id|>assistant<|end_header_id|>" in rows and "of the sea" in rows


def test_a_bad_messages_row_beside_text_names_its_file_and_line(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(3)]
    bad = write_jsonl(tmp_path / "m.jsonl", rows[:2] + [{"messages": [{"role": "user"}]}] + rows[2:])
    text = tmp_path / "prose.txt"
    text.write_text("One paragraph.\n\nAnother one.\n")
    with pytest.raises(DataError, match=r"m.jsonl line 3: each message must have string 'role' and 'content'"):
        Corpus(DataConfig(files=[str(text), str(bad)], messages_field="messages", held_out=0.3), TOK)
    plain = write_jsonl(tmp_path / "t.jsonl", [{"text": "a chat file without messages"}] * 3)
    with pytest.raises(DataError, match=r"t.jsonl: no column 'messages'.*set data.messages_field"):
        Corpus(DataConfig(files=[str(text), str(plain)], messages_field="messages", held_out=0.3), TOK)


# ------------------------------------------------------------------------------ GSM8K as recipe data


def _gsm_row(i: int) -> dict:
    return {"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does Tom have?",
            "answer": f"Tom has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}


def test_gsm8k_recipe_rows_never_use_an_ifeval_test_prompt(tmp_path):
    """IFEval's test prompts (compared case- and whitespace-insensitively) are never sources of if.jsonl: with
    all but one of the would-be sources among them, every instruction prompt comes from the one left."""
    from thinkfast.tasks.gsm8k import read_gsm8k, recipe_rows, write_recipe_data

    src = tmp_path / "data"
    (src / "gsm8k").mkdir(parents=True)
    write_jsonl(src / "gsm8k" / "train.jsonl", [_gsm_row(i) for i in range(12)])
    counts = dict(grpo=3, if_sources=4, if_prompts=6)
    plain = recipe_rows(read_gsm8k(src / "gsm8k" / "train.jsonl"), **counts)
    questions = [_gsm_row(i)["question"] for i in range(12)]
    sources = sorted({q for q in questions for r in plain["if"] if r["prompt"].startswith(q + " ")})
    assert len(sources) == 4
    (src / "ifeval").mkdir()
    write_jsonl(src / "ifeval" / "input_data.jsonl", [{"key": k, "prompt": "  " + q.upper().replace(" ", "  ")}
                                                      for k, q in enumerate(sources[1:])])
    english = tmp_path / "english.txt"
    english.write_text("\n\n".join(f"A paragraph {i} " * 20 for i in range(3)) + "\n")
    out = tmp_path / "out"
    manifest = write_recipe_data(src, out, english=english, **counts)
    rows = {n: _read(out / f"{n}.jsonl") for n in ("text", "sft", "grpo", "if")}
    assert rows["if"] and all(r["prompt"].startswith(sources[0] + " ") for r in rows["if"])
    assert len({r["prompt"] for r in rows["if"]}) == len(rows["if"])  # new instructions each pass, no repeat
    assert manifest["source"]["ifeval_excluded"] == 3 and manifest["if.jsonl"] == len(rows["if"])
    assert manifest["text.txt"] == 3 and (out / "text.txt").read_text().count("A paragraph") == 60
    # the calculator annotations and the #### line are gone; the final answer is a sentence math-verify reads
    on = next(r for r in rows["sft"] if r["reasoning"] == "on")
    i = questions.index(on["input"])
    off = next(r for r in rows["sft"] if r["reasoning"] == "off" and r["input"] == on["input"])
    n = 2 * i + 2
    assert on["output"] == f"<think>\nTom has {i} + {i + 2} = {n} apples.\n</think>\n\nThe answer is {n}."
    assert off["output"] == f"The answer is {n}." and on["solution"] == off["solution"] == str(n)


def test_text_txt_reads_back_as_the_paragraphs_the_manifest_counts(tmp_path):
    from thinkfast.tasks.gsm8k import write_recipe_data

    src = tmp_path / "data"
    (src / "gsm8k").mkdir(parents=True)
    write_jsonl(src / "gsm8k" / "train.jsonl", [_gsm_row(i) for i in range(8)])
    english = tmp_path / "english.txt"
    english.write_text("\n\n".join(f"Speaker {i}:\nA short line, number {i}." for i in range(20)) + "\n")
    manifest = write_recipe_data(src, tmp_path / "out", english=english, grpo=2, if_sources=2, if_prompts=2)
    c = Corpus(DataConfig(files=[str(tmp_path / "out" / "text.txt")], held_out=0.5), TOK)
    assert manifest["text.txt"] < 20  # short paragraphs joined up to 200 characters
    assert c.documents("train") + c.documents("held_out") == manifest["text.txt"]


@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory):
    """The recipe's files from ../shared/data, small counts, written by `thinkfast gsm8k`."""
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"{GSM8K_TRAIN} is absent (../shared/data/SOURCES.md)")
    from thinkfast.cli import main

    out = tmp_path_factory.mktemp("gsm8k") / "out"
    assert main(["gsm8k", "--source", str(SHARED), "--out", str(out), "--grpo", "20", "--if-sources", "20",
                 "--if-prompts", "30"]) == 0
    return out


def _read(path: Path) -> list[dict]:
    """JSON lines; split on newlines only (the files are written with ensure_ascii=False, and a GSM8K question
    holds U+2028, a line break to str.splitlines)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_gsm8k_parts_are_disjoint_and_free_of_ifeval(gsm8k):
    from thinkfast.tasks.instructions import ifeval_test_prompts

    train = _read(GSM8K_TRAIN)
    questions = [r["question"].strip() for r in train]
    sft, grpo, ifp = _read(gsm8k / "sft.jsonl"), _read(gsm8k / "grpo.jsonl"), _read(gsm8k / "if.jsonl")
    text = _read(gsm8k / "text.jsonl")
    manifest = json.loads((gsm8k / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "source"} == {
        "text.jsonl": len(train), "sft.jsonl": 2 * (len(train) - 40), "grpo.jsonl": 20, "if.jsonl": 30,
        "text.txt": manifest["text.txt"]}
    assert manifest["text.txt"] > 1000 and manifest["source"]["seed"] == 0  # tinyshakespeare's paragraphs
    assert (len(text), len(sft), len(grpo), len(ifp)) == (len(train), 2 * (len(train) - 40), 20, 30)
    assert [r["messages"][0]["content"] for r in text] == questions
    sft_q = {r["input"] for r in sft}
    grpo_q = {r["prompt"] for r in grpo}
    by_len = sorted(set(questions), key=len, reverse=True)  # the longest question a prompt starts with is its source
    if_q = {next(q for q in by_len if r["prompt"].startswith(q)) for r in ifp}
    assert len(sft_q) == len(train) - 40 and len(grpo_q) == 20 and 1 <= len(if_q) <= 20
    assert not sft_q & grpo_q and not sft_q & if_q and not grpo_q & if_q
    gold = {r["question"].strip(): r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in train}
    assert all(r["solution"] == gold[r["prompt"]] for r in grpo)
    assert all(r["solution"] == gold[q] for r, q in zip(ifp, [next(q for q in by_len if r["prompt"].startswith(q))
                                                              for r in ifp]))
    if manifest["source"]["ifeval_excluded"]:
        test_prompts = [" ".join(p.casefold().split())
                        for p in ifeval_test_prompts(SHARED / "ifeval" / "input_data.jsonl")]
        assert len(test_prompts) == manifest["source"]["ifeval_excluded"]
        for r in ifp:
            mine = " ".join(r["prompt"].casefold().split())
            assert not any(t == mine or t in mine or mine in t for t in test_prompts), r["prompt"]


def test_every_gsm8k_row_is_read_by_its_stage(gsm8k):
    from thinkfast.rl.prompts import read_prompts
    from thinkfast.toggle import THINK_CLOSE, THINK_OPEN
    from thinkfast.train.sft import read_examples

    examples, skipped = read_examples([str(gsm8k / "sft.jsonl")])
    rows = _read(gsm8k / "sft.jsonl")
    assert skipped == [] and len(examples) == len(rows)
    assert [e.thinking for e in examples] == [r["reasoning"] == "on" for r in rows] == [True, False] * (len(rows) // 2)
    for e in examples:
        out = e.messages[-1]["content"]
        n = 1 if e.thinking else 0
        assert out.count(THINK_OPEN) == out.count(THINK_CLOSE) == n
    for name in ("grpo", "if"):
        prompts, skipped = read_prompts([str(gsm8k / f"{name}.jsonl")])
        assert skipped == [] and len(prompts) == len(_read(gsm8k / f"{name}.jsonl"))
        assert all(p.thinking is None and p.columns["solution"] for p in prompts)
    ifp, _ = read_prompts([str(gsm8k / "if.jsonl")])
    assert all(1 <= len(p.columns["instruction_id_list"]) == len(p.columns["kwargs"]) <= 2 for p in ifp)


def test_the_gsm8k_command_names_a_missing_source(tmp_path, capsys):
    from thinkfast.cli import main

    # exit code 2: a mistake in what was asked
    assert main(["gsm8k", "--source", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "gsm8k/train.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the checks on prompt files


class Scripted:
    """A generation backend answering ``on`` to prompts in the "on" mode and ``off`` to the others."""

    def __init__(self, tok, on: str, off: str):
        self.tok, self.on, self.off = tok, on, off

    def generate(self, prompts, params, *, hook=None, progress=False):
        from thinkfast.generation import Completion

        out = []
        for p in prompts:
            text = self.on if SYSTEM_ON in self.tok.decode(p) else self.off
            out.append(Completion(self.tok(text, add_special_tokens=False)["input_ids"] + [params.stop_token_ids[-1]],
                                  "stop"))
        return out

    def sync(self, model):
        raise AssertionError("a check never syncs")


class LengthScorer:
    def score_ids(self, sequences):
        return [float(len(s)) for s in sequences]


IF_MESSAGES = [[{"role": "user", "content": f"What is {a}+{a}? Do not use any commas in your reply."}] for a in (2, 3)]
IF_COLUMNS = {"instruction_id_list": [["punctuation:no_comma"]] * 2, "kwargs": [[{}]] * 2, "solution": ["4", "6"]}


def test_the_prompt_checks_grade_the_answer_after_the_think_block():
    from thinkfast.evaluation.checks import prompt_if_check, prompt_toggle_check

    backend = Scripted(TOK, "<think>\nTwo, and two.\n</think>\n\nThe answer is 4.", "Well, the answer is 4.")
    out = prompt_if_check(backend, TOK, IF_MESSAGES, IF_COLUMNS, max_new_tokens=8, scorer=LengthScorer())
    on, off = out["on"], out["off"]
    # the commas are in the think block only
    assert (on["if_strict"], on["accuracy"], on["format_ok"], on["no_answer"]) == (1.0, 0.5, 1.0, 0.0)
    assert (off["if_strict"], off["accuracy"], off["format_ok"]) == (0.0, 0.5, 1.0)
    assert on["rm_score"] > off["rm_score"] > 0  # the scorer reads prompt + response
    out = prompt_toggle_check(Scripted(TOK, "<think>\nx\n</think>\n\n4", "<think>\nx\n</think>\n\n4"), TOK,
                              IF_MESSAGES, ["4", None], max_new_tokens=8)
    assert out["on"]["accuracy"] == out["off"]["accuracy"] == 1.0  # only prompts with a solution are graded
    assert (out["on"]["format_ok"], out["off"]["format_ok"], out["collapsed"]) == (1.0, 0.0, ["off"])
    assert out["on"]["truncated"] == 0.0


@pytest.mark.parametrize("columns", [{"solution": ["4", "6"]},
                                     {**IF_COLUMNS, "instruction_id_list": [["punctuation:no_comma"], None],
                                      "kwargs": [[{}], None]}])
def test_the_if_check_takes_prompts_without_instructions(columns):
    from thinkfast.evaluation.checks import prompt_if_check

    out = prompt_if_check(Scripted(TOK, "The answer is 4.", "The answer is 4."), TOK, IF_MESSAGES, columns,
                          max_new_tokens=8)
    assert out["on"]["accuracy"] == 0.5
    # instruction following is scored over the prompts that name instructions only (none: no score)
    assert (out["on"]["if_strict"] is None) == ("instruction_id_list" not in columns)


# ------------------------------------------------------------------------------ the stages on files


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("policy") / "model")


def _questions(n: int, start: int = 0) -> list[str]:
    return [f"What is {i} plus {i + 1}, in a few words?" for i in range(start, start + n)]


def sft_rows(n: int) -> list[dict]:
    """Llama-Nemotron's schema: per question an "on" and an "off" example."""
    out = []
    for i, q in enumerate(_questions(n)):
        out.append({"input": q, "reasoning": "on", "output": f"<think>\n{i} + {i + 1}\n</think>\n\n{2 * i + 1}"})
        out.append({"input": q, "reasoning": "off", "output": str(2 * i + 1)})
    return out


def if_rows(n: int, start: int = 0) -> list[dict]:
    """IFEval's schema with a gold solution."""
    return [{"key": i, "prompt": q + " Do not use any commas in your reply.", "instruction_id_list":
             ["punctuation:no_comma"], "kwargs": [{}], "solution": str(2 * i + 1)}
            for i, q in enumerate(_questions(n, start), start)]


def _sft_pipe(run, policy, *extra):
    return load_pipeline(default_config_path("smoke"), [
        f"run_dir={run}", "stages=[parent,sft]", f"parent.path={policy}", "sft.batch_size=2", "sft.seq_len=128",
        "sft.lr=0.01", "sft.warmup_steps=1", "sft.epochs=1", "sft.held_out_rows=2", "sft.eval_problems=2",
        "sft.eval_every=100", "sft.eval_max_new_tokens=6", "sft.device=cpu", *extra])


def test_sft_on_files_holds_out_whole_prompts_and_checks_the_toggle_on_prompt_files(tmp_path, policy, monkeypatch):
    from thinkfast.pipeline import status
    from thinkfast.rundir import RunDir

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(6))
    checks = write_jsonl(tmp_path / "checks.jsonl", [{"prompt": q, "solution": str(2 * i + 1)}
                                                     for i, q in enumerate(_questions(3, 100), 100)])
    run = tmp_path / "run"
    pipe = _sft_pipe(run, policy, f"sft.files=[{data}]", f"sft.eval_files=[{checks}]")
    run_stage(pipe, "parent")
    seen = []  # the user turn of every example tokenized: first the trained ones, then the held-out ones

    def recording(tokenizer, example):
        seen.append((next(m["content"] for m in example.messages if m["role"] == "user"), example.thinking))
        return tokenize_example(tokenizer, example)

    monkeypatch.setattr(sft_stage, "tokenize_example", recording)
    m, _ = run_stage(pipe, "sft")
    start = next(e for e in map(json.loads, (run / "sft" / "log.jsonl").read_text().splitlines())
                 if e["event"] == "start")
    assert m["examples"] == start["examples"] == 10 and m["on_examples"] == start["on"] == 5
    trained, held = seen[:10], seen[10:]
    assert len(held) == 2 and held[0][0] == held[1][0] and {t for _, t in held} == {True, False}  # one whole prompt
    assert held[0][0] not in {q for q, _ in trained} and len({q for q, _ in trained}) == 5
    curve = json.loads((run / "sft" / "curve.json").read_text())["points"]
    assert [p["step"] for p in curve] == [0, m["steps"]]  # before the first step and at the end
    for p in curve:
        for mode in ("on", "off"):
            assert set(p[mode]) == {"accuracy", "format_ok", "mean_tokens", "truncated"}
            assert 0 <= p[mode]["accuracy"] <= 1 and 0 <= p[mode]["format_ok"] <= 1
        assert "collapsed" in p
    assert "collapsed" in m and {"accuracy_on", "format_ok_off"} <= set(m)
    trained_w = load_file(run / "sft" / "model" / "model.safetensors")
    assert not torch.equal(trained_w["model.embed_tokens.weight"],
                           load_file(policy / "model.safetensors")["model.embed_tokens.weight"])

    with RunDir(run) as rd:
        assert status(pipe, rd, "sft")[0] == "complete"
    write_jsonl(checks, [{"prompt": q, "solution": "0"} for q in _questions(3, 100)])  # the check's answers change
    with RunDir(run) as rd:
        state, reasons = status(pipe, rd, "sft")
    assert state == "stale" and any("eval_files" in r for r in reasons), reasons

    with pytest.raises(ConfigError, match="eval_files.*give files too"):
        _sft_pipe(tmp_path / "x", policy, f"sft.eval_files=[{checks}]")


def tiny_chatml_model(path: Path) -> Path:
    """A random nemotron-nas model whose tokenizer speaks plain ChatML (SmolLM2's template), saved as a chat model."""
    from test_modeling import hetero_config

    from thinkfast.artifacts import write_model_sidecar
    from thinkfast.modeling import DeciLMForCausalLM

    tok = chatml_tokenizer()
    cfg = hetero_config()
    cfg.vocab_size, cfg.max_position_embeddings = len(tok), 1024
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    DeciLMForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    write_model_sidecar(path, prompting="chat", made_by="test")
    return path


def test_sft_of_a_chatml_parent_keeps_its_turns_and_vocabulary(tmp_path):
    from transformers import AutoTokenizer

    parent = tiny_chatml_model(tmp_path / "parent")
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(3))
    checks = write_jsonl(tmp_path / "checks.jsonl", [{"prompt": "What is 1 plus 1?", "solution": "2"}])
    run = tmp_path / "run"
    pipe = _sft_pipe(run, parent, f"sft.files=[{data}]", f"sft.eval_files=[{checks}]", "sft.eval_problems=1",
                     "sft.eval_max_new_tokens=4")
    run_stage(pipe, "parent")
    m, _ = run_stage(pipe, "sft")
    assert m["examples"] == 4  # 3 questions x 2 modes, one question held out
    start = next(e for e in map(json.loads, (run / "sft" / "log.jsonl").read_text().splitlines())
                 if e["event"] == "start")
    assert start["added_tokens"] == []
    out = run / "sft" / "model"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHATML_TEMPLATE and has_toggle(tok) and len(tok) == len(chatml_tokenizer())
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].shape[0] == len(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok)


RM = ["reward_model.prompts=4", "reward_model.samples=4", "reward_model.max_new_tokens=12", "reward_model.batch_size=4",
      # at temperature 0.3 some of the tiny random policy's samples end early (and some obey "off"): pairs by length
      # and by obedience; at 1.0 every sample runs to max_new_tokens and no two rank apart
      "reward_model.temperature=0.3", "reward_model.train_steps=2", "reward_model.checkpoint_every=2",
      "reward_model.eval_every=2", "reward_model.held_out=0.25", "reward_model.lr=0.003", "reward_model.device=cpu"]


def _rm_pipe(run, policy, *extra, stages="[parent,reward_model]"):
    return load_pipeline(default_config_path("smoke"), [
        f"run_dir={run}", f"stages={stages}", f"parent.path={policy}", *RM, *extra])


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, policy):
    """parent and reward_model (its pairs from a prompt file) in one run directory; the prompt file."""
    tmp = tmp_path_factory.mktemp("rm")
    prompts = write_jsonl(tmp / "if.jsonl", if_rows(8))
    run = tmp / "run"
    pipe = _rm_pipe(run, policy, f"reward_model.prompt_files=[{prompts}]")
    run_stage(pipe, "parent")
    m, _ = run_stage(pipe, "reward_model")
    return run, prompts, m


def test_the_reward_model_ranks_samples_of_a_prompt_file(ranked, policy, tmp_path):
    run, prompts, m = ranked
    pairs = _read(run / "reward_model" / "pairs.jsonl")
    assert pairs and len(pairs) == m["pairs"] == m["train_pairs"] + m["held_out_pairs"] and m["steps"] == 2
    # the first `prompts` rows of the file, `samples` responses each; no teacher response and no nano problem
    assert m["nano"]["prompts"] == 4 and m["nano"]["samples"] == 16
    asked = {json.dumps(p["prompt"]) for p in pairs}
    firsts = [r["prompt"] for r in if_rows(4)]
    assert all(any(f in a for f in firsts) for a in asked)
    assert not any(r["prompt"] in a for r in if_rows(4, 4) for a in asked)
    rules = {p.get("rule") for p in pairs}
    assert rules <= {"correct", "obeyed", "shorter"} and "shorter" in rules
    assert "teacher_ranked_first" not in m["nano"]
    marker = json.loads((run / "reward_model" / "COMPLETE.json").read_text())
    assert list(marker["inputs"]["files.prompt_files"]) == ["0:if.jsonl"]
    got = load_file(run / "reward_model" / "reward_model" / "model.safetensors")
    assert not torch.equal(got["model.embed_tokens.weight"],
                           load_file(policy / "model.safetensors")["model.embed_tokens.weight"])
    with pytest.raises(ConfigError, match="pairs.*prompt_files.*not both"):
        _rm_pipe(tmp_path / "x", policy, f"reward_model.prompt_files=[{prompts}]", f"reward_model.pairs=[{prompts}]")


def _rpo_pipe(run, policy, rm_prompts, *extra):
    """parent, reward_model (as ``ranked`` ran it) and rpo."""
    return _rm_pipe(run, policy, f"reward_model.prompt_files=[{rm_prompts}]", "rpo.iterations=2",
                    "rpo.steps_per_iteration=1", "rpo.prompts_per_step=2", "rpo.max_new_tokens=8",
                    "rpo.eval_problems=2", "rpo.eval_max_new_tokens=8", "rpo.device=cpu", *extra,
                    stages="[parent,reward_model,rpo]")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def test_online_rpo_on_a_prompt_file(ranked, policy, tmp_path):
    from thinkfast.pipeline import status
    from thinkfast.rundir import RunDir

    rows = if_rows(6, 20)
    prompts = write_jsonl(tmp_path / "rpo.jsonl", rows)
    run = _copy(ranked[0], tmp_path / "run")
    m, _ = run_stage(_rpo_pipe(run, policy, ranked[1], f"rpo.prompt_files=[{prompts}]"), "rpo")
    assert m["mode"] == "online" and m["steps"] == 2
    curve = json.loads((run / "rpo" / "curve.json").read_text())["points"]
    assert [p["round"] for p in curve] == [0, 1, 2]
    for p in curve:
        for mode in ("on", "off"):
            assert {"if_strict", "accuracy", "rm_score", "format_ok"} <= set(p[mode])
            assert 0 <= p[mode]["if_strict"] <= 1 and 0 <= p[mode]["accuracy"] <= 1
            assert isinstance(p[mode]["rm_score"], float)
    rounds = [e for e in map(json.loads, (run / "rpo" / "log.jsonl").read_text().splitlines()) if e["event"] == "round"]
    assert [r["pairs"] for r in rounds] == [2, 2]  # 6 rows: 2 held out, 2 per round
    marker = json.loads((run / "rpo" / "COMPLETE.json").read_text())
    assert list(marker["inputs"]["files.prompt_files"]) == ["0:rpo.jsonl"] and marker["inputs"]["files"] == {}
    assert marker["inputs"]["reward_model"]["stage"] == "reward_model"
    pipe = _rpo_pipe(run, policy, ranked[1], f"rpo.prompt_files=[{prompts}]")
    with RunDir(run) as rd:
        assert status(pipe, rd, "rpo")[0] == "complete"
    write_jsonl(prompts, if_rows(7, 20))  # one prompt more: the stage is out of date
    with RunDir(run) as rd:
        state, reasons = status(pipe, rd, "rpo")
    assert state == "stale" and any("prompt_files" in r for r in reasons), reasons
    write_jsonl(prompts, rows)

    with pytest.raises(ConfigError, match="prompt_files are for mode: online"):
        _rpo_pipe(tmp_path / "x", policy, ranked[1], f"rpo.prompt_files=[{prompts}]", "rpo.mode=offline")
    few = _copy(ranked[0], tmp_path / "few")
    with pytest.raises(DataError, match=r"4 prompts after eval_problems=2 held out, 6 needed"):
        run_stage(_rpo_pipe(few, policy, ranked[1], f"rpo.prompt_files=[{prompts}]", "rpo.prompts_per_step=3"), "rpo")
