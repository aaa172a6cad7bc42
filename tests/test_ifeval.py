"""IFEval grading (thinkfast.tasks.ifeval) against the semantics of Google's reference checker: for each of the 25
instructions a following and a failing response, the expectations of Google's instructions_test.py (our own
texts), punkt's sentence splits, the loose variants, scoring and the data loader."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from thinkfast.tasks import ifeval
from thinkfast.tasks.ifeval import INSTRUCTIONS, IFEvalItem, capital_words, count_sentences, count_words, grade
from thinkfast.tasks.ifeval import check_instructions, load_ifeval, read_if_prompts, score, split_sentences

LESS, AT_LEAST = "less than", "at least"
LANGUAGE_IDS = {"language:response_language", "change_case:english_capital", "change_case:english_lowercase"}

PARAGRAPHS_STARS = "\n  paragraph 1\n  ***\n  paragraph 2\n  ***\n  paragraph 3"
BULLETS_MIXED = """
  Markdown bullets start a line with an asterisk (*). For example:
  * a bullet.
  *(no space needed)another bullet.
  * (no newline at the end)a third bullet.
  a line that mentions * inline is no bullet, nor is **bold** at a line start:
  **Bold start** is not a bullet."""
BULLETS_DASHES = "\n  Three dash bullets:\n  - one\n  - two\n  -three"
HIGHLIGHTS = """
  Highlight a word with *stars*, like *this*, or make it bold with **two stars**.
  *an unclosed star
  *also unclosed"""
PS_TEXT = "\n  Body of the letter.\n\n  P.S. I hope this helps."
PPS_TEXT = "\n  Body first.\n\n  P.P.S. One more thing.\n\n  Any questions?"
NTH_PARAGRAPHS = "Wow this is long.\n\nI can't believe it.\n\n\"Really?! more than three? No way!\"\n\nYes.\n\nHaha."

# (instruction id, kwargs, response, followed)
CASES = [
    # keywords
    ("keywords:existence", {"keywords": ["romantic", "river", "Mona Lisa"]},
     "The ROMANTIC river Seine flows past the Louvre, where the Mona Lisa hangs.", True),
    ("keywords:existence", {"keywords": ["romantic", "river", "Mona Lisa"]},
     "Paris has romantic river cruises and the Louvre museum.", False),
    ("keywords:existence", {"keywords": ["cat"]}, "Concatenate them.", True),  # a regex search, no word bounds
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 4, "relation": LESS},
     "\n  keyword, Keyword, KEYWORD\n", True),
    ("keywords:frequency", {"keyword": "  keyword ", "frequency": 3, "relation": AT_LEAST},
     "\n  keyword, Keyword, KEYWORD\n", True),
    ("keywords:frequency", {"keyword": "KEYWORD", "frequency": 4, "relation": AT_LEAST},
     "\n  *keyword\n  *Keyword\n  *KEYWORD\n", False),
    ("keywords:frequency", {"keyword": "keyword", "frequency": 3, "relation": LESS}, "keyword keywords KEYWORD",
     False),
    ("keywords:forbidden_words", {"forbidden_words": ["HOUSE", "POWER", "BECOME"]},
     "The party came to power in 1933 and soon took control.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["HOUSE", "POWER", "BECOME"]},
     "Dinosaurs ruled the Earth; their powerful jaws became legend.", True),  # whole words only
    ("keywords:forbidden_words", {"forbidden_words": ["GOOGLE", "TEXT"]}, "Models of text and code.", False),
    ("keywords:forbidden_words", {"forbidden_words": ["GENE", "TRANSFORM"]}, "Generative transformers.", True),
    ("keywords:letter_frequency", {"letter": "T", "let_frequency": 4, "let_relation": AT_LEAST},
     "\n  There is the T. Four T's.\n", True),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 4, "let_relation": LESS}, "asdfghjkl!!aA", True),
    ("keywords:letter_frequency", {"letter": "p", "let_frequency": 4, "let_relation": AT_LEAST}, "asdfghjkl!!aA",
     False),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 4, "let_relation": AT_LEAST},
     "#one #two #three #four", True),  # any single character, as Google's current code allows
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 4, "let_relation": AT_LEAST},
     "#one #two #three", False),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 2, "let_relation": LESS}, "Banana", False),
    # language
    ("language:response_language", {"language": "en"}, "The response is English", True),
    ("language:response_language", {"language": "es"}, "Desayunamos en McDonald's hoy", True),
    ("language:response_language", {"language": "en"}, "Today we visit the Louvre", True),
    ("language:response_language", {"language": "de"}, "This answer is written in plain English, not German.", False),
    ("language:response_language", {"language": "fr"}, "12345 !!! ???", True),  # undetectable counts as followed
    # length constraints
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": LESS}, "xx,x. xx,x! xx/x. x{x}x?", False),
    ("length_constraints:number_sentences", {"num_sentences": 5, "relation": LESS}, "xxxx. xx,x! xxxx. x(x)x?", True),
    ("length_constraints:number_sentences", {"num_sentences": 4, "relation": AT_LEAST},
     "xxxx. xx,x! xx|x. x&x x?", True),
    ("length_constraints:number_sentences", {"num_sentences": 5, "relation": AT_LEAST},
     "xx-x. xx,x! xx}x. x,xx?", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, PARAGRAPHS_STARS, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "\n          ***\n  paragraph 1\n          ***\n      paragraph 2\n          ***\n      paragraph 3", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "\n  paragraph 1\n          ***\n      paragraph 2\n          ***\n      paragraph 3\n          ***", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "\n  paragraph 1\n          ***\n      paragraph 2\n          ***\n          ***", False),  # empty middle
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "one\n\ntwo\n\nthree", False),  # *** only
    ("length_constraints:number_words", {"num_words": 8, "relation": LESS},
     "\n  d3sCRi7 lArge lAnguagE M0del w1tH 20 w0RdS.", True),
    ("length_constraints:number_words", {"num_words": 16, "relation": LESS},
     "L4RGE L4NGU4GE M0DEL: AI syst3m th4t und3rstands, g3n3r4tes, or tr4nsforms\nl4ngu4g3 b4s3d on pr3vious "
     "l3arning & d4t4.", False),
    ("length_constraints:number_words", {"num_words": 16, "relation": AT_LEAST},
     "L4RGE L4NGU4GE M0DEL: AI syst3m th4t und3rstands, g3n3r4tes, or tr4nsforms\nl4ngu4g3 b4s3d on pr3vious "
     "l3arning & d4t4.", True),
    ("length_constraints:number_words", {"num_words": 3, "relation": AT_LEAST}, "don't-stop", True),  # \w+: 3
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"},
     "\n  paragraph 1\n\n  I paragraph 2\n\n  paragraph 3", True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"},
     "\n  paragraph 1\n\n  I paragraph 2", False),  # two paragraphs
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "I"},
     "\n  paragraph 1\n\n  fail paragraph 2\n\n  paragraph 3", False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 5, "nth_paragraph": 5, "first_word": "haha"},
     NTH_PARAGRAPHS, True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"}, NTH_PARAGRAPHS, True),  # quote, ?! cut
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 5, "nth_paragraph": 3, "first_word": "Really"}, NTH_PARAGRAPHS.replace("Really", "Rea!lly"),
     False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "b"},
     "a\n\n\n\nb", False),  # the raw split's 2nd part is empty, as in Google's code
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "b"},
     "a\n*** \nb", False),  # *** does not separate these paragraphs
    # detectable content
    ("detectable_content:number_placeholders", {"num_placeholders": 5},
     "Sure, a template with 5 placeholders:\n[Name]\n[Email]\n[Phone]\n[Address]\n[Website]\nUse it for lists.", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 7},
     "My [adjective] [noun] is [adjective] [noun]. I [verb] and [verb].", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, PS_TEXT, True),
    ("detectable_content:postscript", {"postscript_marker": "PS:"}, PS_TEXT, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, PPS_TEXT, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, PS_TEXT, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "A radius of 1. (no new line) P.S. a joke!", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Area one.\n  p.p.s what if lowercase?\n", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Space.\n  P. S. Spaces between P. and S..", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "No postscript here, PS.", False),
    # detectable format
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_MIXED, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, BULLETS_DASHES, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 1},
     "\n  Paragraph 1\n  ***\n  Paragraph 2\n  ***\n  Paragraph 3\n  * only one bullet point\n  ", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n- two\n* three", False),  # exactly
    ("detectable_format:constrained_response", {}, "\n My answer is no.\n", True),
    ("detectable_format:constrained_response", {}, "My answer is no.   ", True),
    ("detectable_format:constrained_response", {}, "\n  My answer is maybe. I am still learning.", True),
    ("detectable_format:constrained_response", {}, "My answer is yes", False),  # the period is part of it
    ("detectable_format:number_highlighted_sections", {"num_highlights": 3}, HIGHLIGHTS, True),  # 2 * + 1 **
    ("detectable_format:number_highlighted_sections", {"num_highlights": 4}, HIGHLIGHTS, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 4},
     "\n  *Two different* highlights *in one* line. **Bold counts** for **double highlights.**\n", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "\n  Methods:\n  *Finite difference methods\n  *Finite element methods*\n  *Boundary methods\n  Done.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "** ** and * *", False),  # empty
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 3},
     "\n  Mark each section with \"Section X\", such as:\n  Section 1\n  [content 1]\n  Section 2\n  [content 2]",
     False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\n  [content of section 1]\n  SECTION 2\n  [content of section 2]", True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "SECTION 1\n  one\n  SECTION 2\n  two", False),  # case-sensitive
    ("detectable_format:json_format", {}, '```json\n{"a": 1, "b": [2, 3]}\n```', True),
    ("detectable_format:json_format", {}, '  ```JSON\n{"a": 1}```  ', True),
    ("detectable_format:json_format", {}, '```\n["x"]\n```', True),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n```json\n{"a": 1}\n```', False),
    ("detectable_format:json_format", {}, "{'a': 1}", False),
    ("detectable_format:title", {}, "\n  <<Song of Joy>>\n  La la la. Happy song.\n", True),
    ("detectable_format:title", {}, "\n  Is a title at the end fine?\n  <<This is the title>>\n", True),
    ("detectable_format:title", {}, "\n  << >>\n  There is no title.\n", False),
    ("detectable_format:title", {}, "\n  <<This is not a title.\n  This is a paragraph.>>\n", False),
    # combination
    ("combination:two_responses", {}, "\n  This is response 1.\n  ******\n  This is response 2.\n  ", True),
    ("combination:two_responses", {}, "\n  This is response 1.\n  ******\n  This is response 1.\n  ", False),
    ("combination:two_responses", {}, "\n  Response 1.\n  ******\n  Response 2.\n  ******\n  Response 3.\n", False),
    ("combination:two_responses", {}, "\n  ******\n  Response 1.\n  ******\n  ******\n  Response 2.\n  ******\n",
     False),
    ("combination:two_responses", {}, "\n  ******\n  Response 1\n  ******\n  Response 2\n  ******\n  ", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a CL description."},
     "Write a CL description. Hi, Le and TJ, please\n  check this out. Thanks.\n", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a CL description."},
     "Hi, Le and TJ. Write a CL description. Thanks.\n", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a CL description."},
     "  WRITE A CL DESCRIPTION. Done.", True),  # case-insensitive, leading whitespace ignored
    # start/end
    ("startend:end_checker", {"end_phrase": "\n  Any more questions?\n  "},
     "\n  The answer is 7. Any more questions?\n  ", True),
    ("startend:end_checker", {"end_phrase": "This is the end."},
     "\n  I am required to say that this is the end.\n  ", True),
    ("startend:end_checker", {"end_phrase": "Is there anything else?"}, '"Is there anything else?"  \n', True),
    ("startend:end_checker", {"end_phrase": "This will fail."}, "\n  This will fail. Paris is cool.\n  ", False),
    ("startend:quotation", {}, '\n  "This entire message is wrapped in double quotation marks."\n  ', True),
    ("startend:quotation", {}, '\n  "This message is wrapped in double quotation marks." But not all.\n', False),
    ("startend:quotation", {}, '"', False),
    # change case
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": AT_LEAST},
     "\n  HERE there are THREE FUlly CAPITAL words.\n  ", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 5, "capital_relation": LESS},
     "\n  THERE are Four FULLY CAPITAL WORDS. Many Others Are Only Partially So.\n  ", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": LESS},
     "\n  THERE are Four FULLY CAPITAL WORDS. Many Others Are Only Partially So.\n  ", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AT_LEAST},
     "I DON'T know.", True),  # I, DO, N'T
    ("change_case:english_capital", {}, "\n  THIS IS AN ENGLISH SENTENCE. EVERY LETTER IS CAPITALIZED!!! AMAZING.\n",
     True),
    ("change_case:english_capital", {}, "\n  Every Word Is Capitalized.\n  ", False),
    ("change_case:english_lowercase", {}, "\n  every letter is lowercase.\n  ", True),
    ("change_case:english_lowercase", {}, "\n  Almost every letter is lowercase.\n  ", False),
    ("change_case:english_lowercase", {}, "ceci est une phrase entièrement écrite en français, sans majuscules.",
     False),
    # punctuation
    ("punctuation:no_comma", {}, "\n  Every sentence is short. There is no need for a comma.\n  ", True),
    ("punctuation:no_comma", {}, "\n  Since the start of time, people have found a way to punctuate.\n  ", False),
]


def test_the_25_instructions():
    assert len(INSTRUCTIONS) == 25
    assert {iid.split(":")[0] for iid in INSTRUCTIONS} == {
        "keywords", "language", "length_constraints", "detectable_content", "detectable_format", "combination",
        "startend", "change_case", "punctuation"}
    covered = {(iid, ok) for iid, _, _, ok in CASES}
    assert {iid for iid, _ in covered} == set(INSTRUCTIONS)
    assert all((iid, True) in covered and (iid, False) in covered for iid in INSTRUCTIONS)


@pytest.mark.parametrize("iid, kwargs, response, expected", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker(iid, kwargs, response, expected):
    if iid in LANGUAGE_IDS:
        pytest.importorskip("langdetect")
    assert INSTRUCTIONS[iid](response, kwargs, "a prompt") is expected


# (text, sentences) as NLTK's punkt English model splits them
SENTENCES = [
    ("", []),
    ("   \n ", []),
    ("One sentence without a period", ["One sentence without a period"]),
    ("Mr. Smith went to the U.S. yesterday. He left.", ["Mr. Smith went to the U.S. yesterday.", "He left."]),
    ("He was in the U.S. The end.", ["He was in the U.S.", "The end."]),
    ("He was in the U.S. Government.", ["He was in the U.S. Government."]),
    ("Dr. Jones met Mrs. Brown at 5 p.m. yesterday.", ["Dr. Jones met Mrs. Brown at 5 p.m. yesterday."]),
    ("Pi is 3.14 exactly. Yes.", ["Pi is 3.14 exactly.", "Yes."]),
    ("I like fruits, e.g. apples. Ok.", ["I like fruits, e.g.", "apples.", "Ok."]),  # no e.g in punkt's model
    ("Apples, pears, etc. and more.", ["Apples, pears, etc.", "and more."]),
    ("Wait... what? No!! Really.", ["Wait... what?", "No!!", "Really."]),
    ("Wait... The end.", ["Wait...", "The end."]),
    ("Wait... Paris is nice.", ["Wait... Paris is nice."]),
    ("Really?! Yes.", ["Really?!", "Yes."]),
    ('He said "Hi." he left.', ['He said "Hi."', "he left."]),
    ('"Hi!" she said.', ['"Hi!"', "she said."]),
    ("See (this.) Then", ["See (this.)", "Then"]),
    ("Hello.)", ["Hello.)"]),
    ("1. First item\n2. Second item", ["1.", "First item\n2.", "Second item"]),
    ("It was 1999. the end", ["It was 1999. the end"]),
    ("Plan B. Then go.", ["Plan B.", "Then go."]),
    ("Vitamin C. Then go.", ["Vitamin C. Then go."]),
    ("J. Smith is here.", ["J. Smith is here."]),
    ("It is a cat's. Files", ["It is a cat's.", "Files"]),
    ("Hi.\n\n* a.\n* b", ["Hi.", "* a.", "* b"]),
    ("**Bold end.**", ["**Bold end.", "**"]),
    ("Hello.World and 3.5 are one.", ["Hello.World and 3.5 are one."]),
    (". . .", [".", ".", "."]),
]


@pytest.mark.parametrize("text, expected", SENTENCES)
def test_sentences_as_punkt_splits_them(text, expected):
    assert split_sentences(text) == expected
    assert count_sentences(text) == len(expected)


def test_words_and_capital_words():
    assert count_words("Hello, world! It's 3.14 -- don't_stop") == 8  # ... 3, 14, don, t_stop
    assert count_words("") == 0
    assert capital_words("HERE there are THREE FUlly CAPITAL words.") == ["HERE", "THREE", "CAPITAL"]
    assert capital_words("DON'T STOP, AI's I'M") == ["DO", "N'T", "STOP", "AI", "I", "'M"]
    assert capital_words("**BOLD** *x*Y AT&T HELLO...WORLD HELLO--world COVID-19 U.S. CANNOT") == [
        "BOLD", "Y", "AT", "T", "HELLO", "WORLD", "HELLO", "COVID-19", "U.S", "CAN", "NOT"]
    assert capital_words("mailbox='INBOX' AND/OR DON’T 3D 42") == ["INBOX", "AND/OR", "DON", "T", "3D"]


def test_kwargs_none_ignored_and_bad_kwargs():
    ok = INSTRUCTIONS["length_constraints:number_words"]
    assert ok("one two", {"num_words": 3, "relation": LESS, "keyword": None, "letter": None}, "")
    with pytest.raises(ValueError, match="num_words"):
        ok("one two", {"relation": LESS}, "")
    with pytest.raises(ValueError, match="relation"):
        ok("one two", {"num_words": 3, "relation": "at most"}, "")
    with pytest.raises(ValueError, match="single"):
        INSTRUCTIONS["keywords:letter_frequency"]("a", {"letter": "ab", "let_frequency": 1, "let_relation": LESS}, "")
    with pytest.raises(ValueError, match="prompt_to_repeat"):
        INSTRUCTIONS["combination:repeat_prompt"]("x", {}, "x")
    # a keyword that is no valid regular expression is matched literally
    assert INSTRUCTIONS["keywords:existence"]("I code in C++ daily", {"keywords": ["C++"]}, "")
    assert not INSTRUCTIONS["keywords:forbidden_words"]("see a(b here", {"forbidden_words": ["a(b"]}, "")


def test_language_needs_langdetect(monkeypatch):
    monkeypatch.setattr(ifeval, "_langdetect", None)
    monkeypatch.setitem(sys.modules, "langdetect", None)  # makes `import langdetect` fail
    assert INSTRUCTIONS["punctuation:no_comma"]("fine", {}, "")
    with pytest.raises(ImportError, match="pip install langdetect"):
        INSTRUCTIONS["language:response_language"]("Hello there", {"language": "en"}, "")


def test_language_detection_is_seeded():
    pytest.importorskip("langdetect")
    INSTRUCTIONS["language:response_language"]("Bonjour tout le monde", {"language": "fr"}, "")
    import langdetect
    assert langdetect.DetectorFactory.seed == 0


def _item(ids, kwargs, prompt="Write something.", key=1):
    return IFEvalItem(key, prompt, tuple(ids), tuple(kwargs))


def test_grade_empty_response_follows_nothing():
    item = _item(["punctuation:no_comma", "keywords:forbidden_words", "length_constraints:number_words"],
                 [{}, {"forbidden_words": ["x"]}, {"num_words": 5, "relation": LESS}])
    for response in ("", "  \n\t "):
        assert grade(item, response) == {"strict": [False] * 3, "loose": [False] * 3}


def test_grade_loose_variants():
    quote = _item(["startend:quotation"], [{}])
    assert grade(quote, 'Sure, here it is:\n"The whole answer."') == {"strict": [False], "loose": [True]}
    assert grade(quote, '"The whole answer."\nHope it helps!') == {"strict": [False], "loose": [True]}
    assert grade(quote, 'Sure:\n"A quote."\nBye!') == {"strict": [False], "loose": [True]}  # both lines cut
    assert grade(quote, "No quotes at all.") == {"strict": [False], "loose": [False]}
    end = _item(["startend:end_checker"], [{"end_phrase": "Any other questions?"}])
    assert grade(end, "Done. **Any other questions?**") == {"strict": [False], "loose": [True]}  # stars removed
    title = _item(["detectable_format:title"], [{}])
    assert grade(title, "<<My Title>>\nbody") == {"strict": [True], "loose": [True]}
    repeat = _item(["combination:repeat_prompt"], [{"prompt_to_repeat": "Say hi."}], prompt="Say hi. Then repeat.")
    assert grade(repeat, "Here you go:\nSay hi. Hi!") == {"strict": [False], "loose": [True]}
    # a one-line response: every cut variant is empty, and empty variants never count
    lower = _item(["change_case:english_lowercase"], [{}])
    assert grade(lower, "Hello") == {"strict": [False], "loose": [False]}


def test_score_on_three_items():
    items = [
        _item(["punctuation:no_comma", "detectable_format:title"], [{}, {}], key=1),
        _item(["startend:quotation"], [{}], key=2),
        _item(["length_constraints:number_words", "keywords:existence", "detectable_format:json_format"],
              [{"num_words": 3, "relation": AT_LEAST}, {"keywords": ["apple"]}, {}], key=3),
    ]
    responses = [
        "<<Fruit>>\nApples and pears",  # both followed
        'Sure:\n"Quoted answer"',  # loose only
        "**Banana** bread is great",  # words yes; apple no; json no
    ]
    graded = [grade(i, r) for i, r in zip(items, responses)]
    assert graded == [
        {"strict": [True, True], "loose": [True, True]},
        {"strict": [False], "loose": [True]},
        {"strict": [True, False, False], "loose": [True, False, False]},
    ]
    assert score(graded) == {
        "prompt_level_strict": 1 / 3, "prompt_level_loose": 2 / 3,
        "instruction_level_strict": 3 / 6, "instruction_level_loose": 4 / 6,
        "n_prompts": 3, "n_instructions": 6,
    }
    assert score([]) == {"prompt_level_strict": 0.0, "prompt_level_loose": 0.0, "instruction_level_strict": 0.0,
                         "instruction_level_loose": 0.0, "n_prompts": 0, "n_instructions": 0}


def _data_file() -> Path:
    root = os.environ.get("THINKFAST_DATA") or Path.cwd().parent / "shared" / "data"
    return Path(root) / "ifeval" / "input_data.jsonl"


def test_load_real_data():
    path = _data_file()
    if not path.is_file():
        pytest.skip(f"IFEval data not present at {path}")
    items = load_ifeval(path)
    assert len(items) == 541
    assert len({i.key for i in items}) == 541
    assert {iid for i in items for iid in i.instruction_ids} == set(INSTRUCTIONS)
    assert sum(len(i.instruction_ids) for i in items) == 834
    assert all(len(i.instruction_ids) == len(i.kwargs) and i.prompt for i in items)
    assert [i.key for i in load_ifeval(path, limit=3)] == [i.key for i in items[:3]]
    graded = [grade(i, "") for i in items]  # an empty response follows nothing, and every row's kwargs check
    assert all(not any(g["strict"]) and not any(g["loose"]) for g in graded)
    assert score(graded)["n_instructions"] == 834


def test_grade_real_prompts():
    """Each prompt graded as its own response runs every checker on the real kwargs."""
    path = _data_file()
    if not path.is_file():
        pytest.skip(f"IFEval data not present at {path}")
    pytest.importorskip("langdetect")
    items = load_ifeval(path)
    for item in items:
        g = grade(item, item.prompt)
        assert len(g["strict"]) == len(item.instruction_ids)
        assert all(s <= lo for s, lo in zip(g["strict"], g["loose"]))  # loose never below strict


def _write(tmp_path, rows) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"key": 7, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ({k: v for k, v in GOOD.items() if k != "kwargs"}, "missing field"),
    ({**GOOD, "instruction_id_list": ["keywords:nonsense"]}, "unknown IFEval instruction id"),
    ({**GOOD, "kwargs": [{}, {}]}, "2 kwargs for 1 instructions"),
    ({**GOOD, "instruction_id_list": []}, "non-empty list"),
    ({**GOOD, "key": "7"}, "key must be an integer"),
    ("[1, 2]", "JSON object"),
])
def test_load_bad_rows_name_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, "", bad])
    with pytest.raises(ValueError, match=message) as err:
        load_ifeval(path)
    assert f"{path}:3:" in str(err.value)


def test_load_good_rows_and_missing_file(tmp_path):
    row = {**GOOD, "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
           "kwargs": [{"num_words": None}, {"num_words": 3, "relation": "less than", "letter": None}]}
    items = load_ifeval(_write(tmp_path, [row, GOOD, GOOD]), limit=2)
    assert len(items) == 2
    assert items[0] == IFEvalItem(7, "Say hi.", ("punctuation:no_comma", "length_constraints:number_words"),
                                  ({}, {"num_words": 3, "relation": "less than"}))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_ifeval(tmp_path / "nowhere.jsonl")


# ------------------------------------------------------------------------------- instruction arguments


def test_every_instruction_has_its_arguments_and_the_cases_pass_them():
    assert set(ifeval.KWARGS) == set(INSTRUCTIONS)
    for iid, kwargs, _, _ in CASES:  # every hand case's arguments are valid ones
        assert check_instructions([iid], [kwargs]) == ((iid,), (kwargs,))


@pytest.mark.parametrize("ids, kwargs, message", [
    (["no:such"], [{}], "unknown IFEval instruction id.*no:such"),
    (["punctuation:no_comma"], [{}, {}], "2 kwargs for 1 instructions"),
    (["punctuation:no_comma"], {}, "list of objects"),
    ("punctuation:no_comma", [{}], "non-empty list"),
    ([], [], "non-empty list"),
    (["length_constraints:number_words"], [{"num_words": 5}], "number_words: missing argument.*'relation'"),
    (["keywords:existence"], [{}], "keywords:existence: missing argument.*'keywords'"),
    (["length_constraints:number_words"], [{"num_words": -1, "relation": "less than"}],
     "number_words: argument 'num_words' must be an integer >= 0"),
    (["length_constraints:number_words"], [{"num_words": 5, "relation": "at most"}],
     "number_words: argument 'relation' must be one of"),
    (["length_constraints:number_words"], [{"num_words": "5", "relation": "less than"}], "'num_words' must be"),
    (["length_constraints:number_words"], [{"num_words": True, "relation": "less than"}], "'num_words' must be"),
    (["length_constraints:number_words"], [{"num_words": 2.5, "relation": "less than"}], "'num_words' must be"),
    (["startend:end_checker"], [{"end_phrase": 3}], "end_checker: argument 'end_phrase' must be a non-empty string"),
    (["startend:end_checker"], [{"end_phrase": "  "}], "'end_phrase' must be a non-empty string"),
    (["keywords:letter_frequency"], [{"letter": "ab", "let_frequency": 2, "let_relation": "at least"}],
     "'letter' must be a single"),
    (["keywords:forbidden_words"], [{"forbidden_words": "word"}], "'forbidden_words' must be a non-empty list"),
    (["keywords:existence"], [{"keywords": []}], "'keywords' must be a non-empty list"),
    (["length_constraints:number_paragraphs"], [{"num_paragraphs": 0}], "'num_paragraphs' must be an integer >= 1"),
    (["length_constraints:nth_paragraph_first_word"], [{"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"}],
     "'nth_paragraph' 3 is beyond num_paragraphs 2"),
    (["punctuation:no_comma"], [{"end_phrase": "Bye."}], "no_comma: unexpected argument 'end_phrase'"),
    (["startend:end_checker"], [{"end_phrase": "Bye.", "keyword": "x"}], "end_checker: unexpected argument 'keyword'"),
    (["punctuation:no_comma"], "[{oops", "no valid JSON"),
])
def test_check_instructions_names_the_instruction_and_the_key(ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_instructions(ids, kwargs)


def test_check_instructions_normalises():
    hf = '[{"end_phrase": null, "num_words": 30.0, "relation": "less than"}, {"end_phrase": "Bye."}]'
    ids, kws = check_instructions(["length_constraints:number_words", "startend:end_checker"], hf)
    assert ids == ("length_constraints:number_words", "startend:end_checker")
    assert kws == ({"num_words": 30, "relation": "less than"}, {"end_phrase": "Bye."})
    assert type(kws[0]["num_words"]) is int


def test_the_real_ifeval_rows_are_all_valid_also_none_filled():
    path = _data_file()
    if not path.is_file():
        pytest.skip(f"IFEval data not present at {path}")
    keys = sorted({k for spec in ifeval.KWARGS.values() for k in spec})
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 541
    for row in rows:
        ids, kws = check_instructions(row["instruction_id_list"], row["kwargs"])
        assert kws == tuple(row["kwargs"])
        hf = [{k: kw.get(k) for k in keys} for kw in row["kwargs"]]  # the Hugging Face copy's shape
        assert check_instructions(row["instruction_id_list"], json.dumps(hf)) == (ids, kws)


def test_read_if_prompts_key_optional_and_bad_rows_named(tmp_path):
    rows = [{"prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {**GOOD, "key": 9}]
    items = read_if_prompts(_write(tmp_path, rows))
    assert [(i.key, i.prompt, i.instruction_ids) for i in items] == [
        (1, "Say hi.", ("punctuation:no_comma",)), (9, "Say hi.", ("punctuation:no_comma",))]
    bad = {**GOOD, "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": 5}]}
    path = _write(tmp_path, [GOOD, "", bad])
    with pytest.raises(ValueError, match=r"data.jsonl:3: .*startend:end_checker: argument 'end_phrase'"):
        read_if_prompts(path)
    with pytest.raises(ValueError, match=r"data.jsonl:3: .*unexpected argument 'num_words'"):
        read_if_prompts(_write(tmp_path, [GOOD, "", {**GOOD, "kwargs": [{"num_words": 3}]}]))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_if_prompts(tmp_path / "nowhere.jsonl")


# --------------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("reward", [ifeval.ifeval_strict, ifeval.ifeval_loose, ifeval.ifeval_share])
def test_rewards_fail_closed_on_bad_kwargs(reward):
    from thinkfast.rl.rewards import RewardRunner

    ok = ['"fine"']
    assert reward(ok, [["startend:quotation"]], [[{}]]) == [1.0]
    for ids, kws in [(["startend:quotation"], [{"end_phrase": "Bye."}]),  # unexpected: never a pass
                     (["startend:end_checker"], [{}]), (["startend:end_checker"], [{"end_phrase": 7}]),
                     (["length_constraints:number_words"], [{"num_words": -3, "relation": "less than"}]),
                     (["startend:quotation", "punctuation:no_comma"], [{}])]:
        with pytest.raises(ValueError, match="so no reward"):
            reward(ok, [ids], [kws])
        total, _, errors = RewardRunner([("r", reward, 1.0)])(ok, [False], {"instruction_id_list": [ids],
                                                                           "kwargs": [kws]})
        assert total == [0.0] and [e.reward for e in errors] == ["r"]


def test_ifeval_share_on_hand_examples():
    ids = ["punctuation:no_comma", "startend:quotation", "detectable_format:title"]
    kws = [{}, {}, {}]
    completions = ['<think>\nHmm, a comma\n</think>\n\n"<<T>> fine"',  # 3 of 3 (the think block is stripped)
                   '"<<T>> fine, ok"',  # 2 of 3
                   '<<T>> fine, ok',  # 1 of 3
                   'fine, ok',  # 0 of 3
                   '<think>\n"<<T>> fine"',  # unclosed: nothing
                   '<think>a</think>"<<T>>"<think>b</think>"x"',  # malformed: nothing
                   [{"role": "assistant", "content": '"<<T>> fine"'}]]  # TRL's conversational format
    shares = ifeval.ifeval_share(completions, [ids] * 7, [kws] * 7)
    assert [round(s, 3) for s in shares] == [1.0, 0.667, 0.333, 0.0, 0.0, 0.0, 1.0]
    assert ifeval.ifeval_strict(completions, [ids] * 7, [kws] * 7) == [1.0, 0, 0, 0, 0, 0, 1.0]
    assert "ifeval_share" in ifeval.__all__
