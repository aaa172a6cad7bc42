"""Instruction-following prompts (thinkfast.tasks.instructions): nano items and their teacher (every compliant
answer follows its instructions by IFEval's own checkers and stays correct for the nano grader), the sampling
rules, the sentences, and the prompt-file generator that never emits an IFEval test prompt (also through the CLI)."""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import pytest

from thinkfast.nano.tasks import extract_answer, format_answer
from thinkfast.tasks import instructions as ins
from thinkfast.tasks.ifeval import INSTRUCTIONS, IFEvalItem, check_instructions, grade, ifeval_share, ifeval_strict
from thinkfast.tasks.instructions import (GENERAL_INSTRUCTIONS, NANO_INSTRUCTIONS, IFItem, comply, describe,
                                          generate_if_prompts, if_response, ifeval_test_prompts, nano_if_items,
                                          sample_instructions)
from thinkfast.tasks.nano import nano_accuracy

pytest.importorskip("langdetect")

LOWER, CAPITAL = "change_case:english_lowercase", "change_case:english_capital"
JSON, QUOTE = "detectable_format:json_format", "startend:quotation"
KEYWORDS, FORBIDDEN = "keywords:existence", "keywords:forbidden_words"
# what a bare "Answer: N" must break (the rest, a word limit, forbidden words and no commas, it follows)
BARE_FAILS = {LOWER, CAPITAL, "startend:end_checker", QUOTE, JSON, KEYWORDS, "detectable_format:title",
              "length_constraints:number_paragraphs"}


def _data(*parts) -> Path:
    root = os.environ.get("THINKFAST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(root, *parts)


def _assert_consistent(ids, kwargs):
    """Never contradictory: the rules of sample_instructions, and the named pairs checked by hand."""
    assert len(set(ids)) == len(ids)
    assert check_instructions(ids, kwargs) == (tuple(ids), tuple(kwargs))
    assert all(ins._compatible(a, b) for a, b in itertools.combinations(ids, 2))
    s = set(ids)
    assert not {LOWER, CAPITAL} <= s and not {QUOTE, JSON} <= s and not {JSON, "startend:end_checker"} <= s
    spec = dict(zip(ids, kwargs))
    if KEYWORDS in spec and FORBIDDEN in spec:
        assert not set(spec[KEYWORDS]["keywords"]) & set(spec[FORBIDDEN]["forbidden_words"])


def test_nano_instructions():
    assert set(NANO_INSTRUCTIONS) == {
        LOWER, CAPITAL, "startend:end_checker", QUOTE, JSON, "length_constraints:number_words", KEYWORDS,
        FORBIDDEN, "punctuation:no_comma", "detectable_format:title", "length_constraints:number_paragraphs"}
    assert set(GENERAL_INSTRUCTIONS) == set(INSTRUCTIONS) - {"detectable_format:constrained_response"}


def test_the_bare_answer_is_not_english_to_langdetect_but_comply_is():
    """Why comply leads an all-lowercase / all-capital answer with an English sentence."""
    assert not INSTRUCTIONS[LOWER]("answer: 42", {}, "")  # langdetect: Afrikaans
    assert not INSTRUCTIONS[CAPITAL]("ANSWER: 42", {}, "")  # langdetect: Somali
    for n in (0, 7, -42, 1234, 99999):
        for iid in (LOWER, CAPITAL):
            text = comply(format_answer(n), [iid], [{}])
            assert INSTRUCTIONS[iid](text, {}, "") and extract_answer(text) == n


def test_nano_items_are_deterministic_and_drawn_as_asked():
    a = nano_if_items(60, seed=3)
    assert a == nano_if_items(60, seed=3)
    assert a != nano_if_items(60, seed=4)
    assert [i.thinking for i in a] == [i % 2 == 0 for i in range(60)]
    assert [i.problem.kind for i in a[:8]] == ["add", "sub", "mul", "word"] * 2
    assert all(i.thinking for i in nano_if_items(10, seed=3, thinking="on"))
    assert not any(i.thinking for i in nano_if_items(10, seed=3, thinking="off"))
    counts = {len(i.instruction_id_list) for i in nano_if_items(200, seed=0, instructions=(2, 4))}
    assert counts == {2, 3, 4}
    assert {len(i.instruction_id_list) for i in nano_if_items(30, seed=0, instructions=(1, 1))} == {1}
    for item in a:
        assert isinstance(item, IFItem)
        assert item.prompt.startswith(item.problem.question if item.problem.kind == "word"
                                      else f"What is {item.problem.question}?\n")
        assert item.prompt.endswith(item.prompt.split("\n", 1)[1])
    with pytest.raises(ValueError, match="thinking"):
        nano_if_items(2, seed=0, thinking="maybe")
    with pytest.raises(ValueError, match="instructions"):
        nano_if_items(2, seed=0, instructions=(3, 2))
    with pytest.raises(ValueError, match="split"):
        nano_if_items(2, seed=0, split="test")


def test_train_and_eval_items_share_no_problem():
    train = nano_if_items(400, seed=0, digits=(1,))
    held = nano_if_items(400, seed=0, digits=(1,), split="eval")
    assert {i.problem for i in train}.isdisjoint({i.problem for i in held})
    assert len({i.problem for i in held}) > 50  # many distinct ones all the same
    assert {i.problem for i in train}.isdisjoint({i.problem for i in nano_if_items(400, seed=1, split="eval")})


def test_every_nano_item_is_followed_by_its_teacher_and_still_correct():
    items = nano_if_items(300, seed=0, digits=(1, 2, 3), instructions=(1, 4))
    items += nano_if_items(100, seed=1, split="eval")
    assert {i for it in items for i in it.instruction_id_list} == set(NANO_INSTRUCTIONS)
    responses = [if_response(it) for it in items]
    ids = [list(it.instruction_id_list) for it in items]
    kws = [list(it.kwargs) for it in items]
    answers = [it.problem.answer for it in items]
    assert ifeval_strict(responses, ids, kws) == [1.0] * len(items)
    assert nano_accuracy(responses, answers) == [1.0] * len(items)
    for it, r in zip(items, responses):
        _assert_consistent(it.instruction_id_list, it.kwargs)
        assert r.startswith("<think>\n") == it.thinking
        # the bare answer breaks every instruction it should
        bare = grade(IFEvalItem(0, it.prompt, it.instruction_id_list, it.kwargs), format_answer(it.problem.answer))
        for iid, ok in zip(it.instruction_id_list, bare["strict"]):
            assert ok == (iid not in BARE_FAILS), (iid, it.kwargs)
    bare = [format_answer(a) for a in answers]
    share = ifeval_share(bare, ids, kws)
    assert all(s < 1.0 for s, i in zip(share, ids) if set(i) & BARE_FAILS)
    assert nano_accuracy(bare, answers) == [1.0] * len(items)


def test_comply_on_every_compatible_combination():
    """Every compatible set of up to three nano instructions, with every end phrase, paragraph count and several
    keyword lists, across answers of several signs and lengths."""
    words = "length_constraints:number_words"
    choices = {"startend:end_checker": [{"end_phrase": p} for p in ins.END_PHRASES],
               "length_constraints:number_paragraphs": [{"num_paragraphs": p} for p in (2, 3, 4)],
               KEYWORDS: [{"keywords": list(k)} for k in (ins.NANO_KEYWORDS[:2], ins.NANO_KEYWORDS[-1:])]}
    rng = random.Random(0)
    n = 0
    for k in (1, 2, 3):
        for ids in itertools.combinations(NANO_INSTRUCTIONS, k):
            if not all(ins._compatible(a, b) for a, b in itertools.combinations(ids, 2)):
                continue
            for picked in itertools.product(*(choices.get(i, [None]) for i in ids)):
                spec = {i: dict(c) if c else ins._draw_kwargs(rng, i, {}, None)
                        for i, c in zip(ids, picked) if i != words}
                if words in ids:  # the word limit last, as the sampler draws it
                    spec[words] = ins._draw_kwargs(rng, words, spec, None)
                kws = [spec[i] for i in ids]
                answer = rng.choice((0, 5, -17, 408, 12345))
                text = comply(format_answer(answer), ids, kws)
                assert all(INSTRUCTIONS[i](text, kw, "") for i, kw in zip(ids, kws)), (ids, kws, text)
                assert extract_answer(text) == answer
                n += 1
    assert n > 300


def test_comply_never_writes_a_forbidden_or_answer_clashing_word():
    import re

    written = " ".join(ins._LEADS + ins._FILLERS + ins.END_PHRASES + ins.NANO_KEYWORDS + (ins._TITLE, "answer",
                       "This reply uses the words", "This reply uses the word"))
    for w in ins.FORBIDDEN_POOL:
        assert not re.search(rf"(?i)\b{w}\b", written), w
    assert not set(ins.FORBIDDEN_POOL) & set(ins.NANO_KEYWORDS + ins.GENERAL_KEYWORDS + ins.FREQUENCY_WORDS)
    assert not any("answer" in w for w in ins.NANO_KEYWORDS)  # a keyword never mimics "Answer:"
    assert not any("," in p or "answer:" in p.lower() or re.search(r"\d", p)
                   for p in ins.END_PHRASES + ins._LEADS + ins._FILLERS)  # no comma, no second answer


def test_comply_refuses_what_it_cannot_follow():
    with pytest.raises(ValueError, match="only NANO_INSTRUCTIONS.*number_bullet_lists"):
        comply("Answer: 4", ["detectable_format:number_bullet_lists"], [{"num_bullets": 2}])
    with pytest.raises(ValueError, match="cannot follow length_constraints:number_words"):
        comply("Answer: 4", ["length_constraints:number_words"], [{"num_words": 50, "relation": "at least"}])
    with pytest.raises(ValueError, match="cannot all be followed"):
        comply("Answer: 4", [LOWER, CAPITAL], [{}, {}])
    with pytest.raises(ValueError, match="cannot follow keywords:forbidden_words"):
        comply("Answer: 4", [FORBIDDEN], [{"forbidden_words": ["answer"]}])


def test_comply_examples():
    assert comply("Answer: 42", [QUOTE, "punctuation:no_comma"], [{}, {}]) == '"Answer: 42"'
    assert comply("Answer: -3", [JSON, CAPITAL], [{}, {}]) == \
        '{"ANSWER": "HERE IS MY FINAL ANSWER TO THE QUESTION. ANSWER: -3"}'
    text = comply("Answer: 8", ["length_constraints:number_paragraphs", "detectable_format:title"],
                  [{"num_paragraphs": 2}, {}])
    assert text == "<<Final Result>>\nI read the question carefully.\n***\nAnswer: 8"
    item = nano_if_items(1, seed=0, thinking="off")[0]
    assert if_response(item) == comply(format_answer(item.problem.answer), item.instruction_id_list, item.kwargs)


def test_sample_instructions_rules_and_errors():
    rng = random.Random(1)
    for _ in range(500):
        ids, kws = sample_instructions(rng, rng.randint(1, 5))
        _assert_consistent(ids, kws)
        assert set(ids) <= set(NANO_INSTRUCTIONS)
        spec = dict(zip(ids, kws))
        if "length_constraints:number_words" in spec:
            assert spec["length_constraints:number_words"]["relation"] == "less than"
    text = "Why is the sky blue, simply put?"
    for _ in range(500):
        ids, kws = sample_instructions(rng, rng.randint(1, 5), GENERAL_INSTRUCTIONS, text=text)
        _assert_consistent(ids, kws)
        spec = dict(zip(ids, kws))
        assert "simply" not in spec.get(FORBIDDEN, {}).get("forbidden_words", [])  # a word of the text
        if "combination:repeat_prompt" in spec:
            assert spec["combination:repeat_prompt"] == {"prompt_to_repeat": text}
        sentences = spec.get("length_constraints:number_sentences")
        if sentences and sentences["relation"] == "less than":
            assert sentences["num_sentences"] >= ins._structures(spec) + 2
    assert sample_instructions(random.Random(5), 3) == sample_instructions(random.Random(5), 3)
    assert sample_instructions(random.Random(0), 1, ["combination:repeat_prompt", QUOTE])[0] == (QUOTE,)
    with pytest.raises(ValueError, match="unknown IFEval instruction id.*no:such"):
        sample_instructions(rng, 1, ["no:such"])
    with pytest.raises(ValueError, match="cannot draw 3"):
        sample_instructions(rng, 3, [LOWER, CAPITAL])
    with pytest.raises(ValueError, match="cannot draw 2 compatible"):
        sample_instructions(rng, 2, [LOWER, CAPITAL])


class _Fixed(random.Random):
    """An rng whose choice is always ``value`` (picks one phrasing)."""

    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def choice(self, seq):
        assert self.value in seq
        return self.value


def test_describe():
    assert describe([LOWER], [{}]) == ("Your entire response should be in English, and in all lowercase letters. "
                                       "No capital letters are allowed.")
    assert describe([FORBIDDEN, "startend:end_checker"],
                    [{"forbidden_words": ["a", "b", "c"]}, {"end_phrase": "Bye."}]) == (
        'Do not include the keywords "a", "b" and "c" in the response. Finish your response with this exact '
        "phrase: Bye. No other words should follow this phrase.")
    assert describe(["language:response_language"], [{"language": "fr"}]).startswith(
        "Your ENTIRE response should be in French language")
    # a sentence ending in a marker is followed by a new line
    assert "***\nAnswer with" in describe(["length_constraints:number_paragraphs", "length_constraints:number_words"],
                                          [{"num_paragraphs": 2}, {"num_words": 9, "relation": "less than"}])
    rng = random.Random(0)
    assert len({describe([LOWER], [{}], rng) for _ in range(30)}) == 3  # several phrasings
    with pytest.raises(ValueError, match="missing argument"):
        describe(["keywords:existence"], [{}])
    one, two = ({"forbidden_words": ["easy"]},), ({"forbidden_words": ["easy", "guess"]},)
    assert describe([FORBIDDEN], one, _Fixed(ins._PHRASES[FORBIDDEN][1])) == 'Avoid the word "easy" in your reply.'
    assert describe([FORBIDDEN], two, _Fixed(ins._PHRASES[FORBIDDEN][2])) == 'Never use the words "easy" and "guess".'
    rng = random.Random(2)
    for iid in GENERAL_INSTRUCTIONS:  # every instruction has sentences, each naming its arguments
        ids, kws = sample_instructions(rng, 1, [iid], text="Tell me about rivers.")
        for phrase in ins._PHRASES[iid]:
            text = describe(ids, kws, _Fixed(phrase))
            for v in kws[0].values():
                if iid not in ("language:response_language", "combination:repeat_prompt"):
                    assert str(v[0] if isinstance(v, list) else v) in text, (iid, phrase)


# ------------------------------------------------------------------------------------------ generator


def _clash(a: str, b: str) -> bool:
    a, b = " ".join(a.lower().split()), " ".join(b.lower().split())
    return a in b or b in a


def test_generator_rows_are_valid_deterministic_and_excluded_by_text():
    texts = [f"Question {i}: how many apples are left after eating {i} of them?" for i in range(40)]
    texts += ["", "   ", "Write a haiku about rivers.", "WRITE   a haiku\nabout rivers. Use no commas.", "haiku"]
    exclude = ["Write a haiku about rivers. Use no commas."]
    stats: dict = {}
    rows = generate_if_prompts(texts, 100, seed=0, instructions=(1, 4), exclude=exclude, stats=stats)
    assert stats == {"sources": 45, "excluded": 3, "empty": 2}  # equal, contained in, containing (case, spaces)
    assert rows == generate_if_prompts(texts, 100, seed=0, instructions=(1, 4), exclude=exclude)
    assert rows != generate_if_prompts(texts, 100, seed=1, instructions=(1, 4), exclude=exclude)
    assert len(rows) == 100 and [r["key"] for r in rows] == list(range(100))
    assert len({r["prompt"] for r in rows}) == 100
    for r in rows:
        assert set(r) == {"key", "prompt", "instruction_id_list", "kwargs"}
        assert 1 <= len(r["instruction_id_list"]) <= 4
        _assert_consistent(r["instruction_id_list"], r["kwargs"])
        assert any(r["prompt"].startswith(t) for t in texts[:40])
        assert not any(_clash(r["prompt"], e) for e in exclude)
    # more rows than sources: sources again with new instructions, until a pass makes no new prompt
    few = [r["prompt"] for r in generate_if_prompts(texts[:3], 50, seed=0, instructions=(1, 1), allowed=[LOWER])]
    assert 3 < len(few) <= 9 and len(set(few)) == len(few)  # 3 sources x 3 phrasings at most


def test_generator_from_gsm8k_never_emits_an_ifeval_prompt():
    gsm8k, ifeval_file = _data("gsm8k", "train.jsonl"), _data("ifeval", "input_data.jsonl")
    if not gsm8k.is_file() or not ifeval_file.is_file():
        pytest.skip("GSM8K train or IFEval data not present")
    test_prompts = ifeval_test_prompts(ifeval_file)
    assert len(test_prompts) == 541
    questions = ins.read_prompt_texts(gsm8k)
    stats: dict = {}
    rows = generate_if_prompts(questions, 400, seed=0, exclude=test_prompts, stats=stats)
    assert len(rows) == 400 and stats["excluded"] == 0
    seen = {i for r in rows for i in r["instruction_id_list"]}
    assert seen == set(GENERAL_INSTRUCTIONS)
    norm = [" ".join(p.lower().split()) for p in test_prompts]
    for r in rows:
        check_instructions(r["instruction_id_list"], r["kwargs"])
        p = " ".join(r["prompt"].lower().split())
        assert not any(p in t or t in p for t in norm)
    # IFEval's own prompts as sources: every one is excluded, nothing is made
    stats = {}
    assert generate_if_prompts(sorted(test_prompts), 50, seed=0, exclude=test_prompts, stats=stats) == []
    assert stats["excluded"] == 541
    # and the default exclusion is that file
    if ins.ifeval_test_file().resolve() == ifeval_file.resolve():
        assert ifeval_test_prompts() == test_prompts


def test_ifeval_test_prompts_missing_and_bad(tmp_path):
    with pytest.raises(FileNotFoundError):
        ifeval_test_prompts(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: no string field 'prompt'"):
        ifeval_test_prompts(bad)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_ifgen_end_to_end(tmp_path, capsys):
    from thinkfast.cli import main

    src = tmp_path / "prompts.jsonl"
    questions = [f"Tom has {i} marbles and finds {i + 3} more. How many marbles does he have?" for i in range(30)]
    src.write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n" for q in questions),
                   encoding="utf-8")
    excl = tmp_path / "ifeval.jsonl"
    excl.write_text(json.dumps({"key": 1, "prompt": questions[0], "instruction_id_list": [], "kwargs": []}) + "\n",
                    encoding="utf-8")
    out = tmp_path / "out" / "if.jsonl"
    assert main(["ifgen", "--prompts", str(src), "--n", "20", "--seed", "3", "--out", str(out),
                 "--exclude", str(excl)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 20 rows" in printed and "excluded 1" in printed
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20 and not any(r["prompt"].startswith(questions[0] + " ") for r in rows)
    from thinkfast.tasks.ifeval import read_if_prompts
    assert [i.prompt for i in read_if_prompts(out)] == [r["prompt"] for r in rows]
    # --keep: the source's other fields travel with each row (for a reward that reads them)
    assert main(["ifgen", "--prompts", str(src), "--n", "5", "--out", str(out), "--exclude", str(excl),
                 "--keep", "answer"]) == 0
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(r["answer"] == "#### 1" for r in kept) and len(read_if_prompts(out)) == 5
    assert main(["ifgen", "--prompts", str(src), "--n", "1", "--out", str(out), "--keep", "solution"]) == 2
    assert "no field 'solution' to keep" in capsys.readouterr().err
    # --field; a bad line names file and line (exit 2)
    assert main(["ifgen", "--prompts", str(src), "--field", "answer", "--n", "1", "--out", str(out),
                 "--exclude", str(excl)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["prompt"].startswith("#### 1")
    src.write_text(json.dumps({"question": "ok?"}) + "\n{broken\n", encoding="utf-8")
    assert main(["ifgen", "--prompts", str(src), "--n", "1", "--out", str(out), "--exclude", str(excl)]) == 2
    assert f"{src}:2: invalid JSON" in capsys.readouterr().err
    src.write_text(json.dumps({"question": "ok?"}) + "\n" + json.dumps({"text": "no field"}) + "\n", encoding="utf-8")
    assert main(["ifgen", "--prompts", str(src), "--n", "1", "--out", str(out), "--exclude", str(excl)]) == 2
    assert f"{src}:2: no string field" in capsys.readouterr().err
