"""Verifiable instruction-following prompts: IFEval's instructions (Zhou et al. 2023, arXiv:2311.07911) added to
nano problems and to your own prompts, graded by :mod:`thinkfast.tasks.ifeval` (issue 25).

* Nano: :func:`nano_if_items` puts 1-3 of :data:`NANO_INSTRUCTIONS` after a nano problem; :func:`comply` rewrites
  the teacher's ``Answer: N`` so that it follows them and the nano verifier still reads ``N``;
  :func:`if_response` is the SFT teacher's whole reply.
* Files: :func:`generate_if_prompts` adds instructions to source prompts (IFEval's schema out), never emitting a
  prompt of IFEval's test set (:func:`ifeval_test_prompts`): a source that equals, contains or is contained in
  a test prompt, compared case- and whitespace-insensitively, is skipped. ``thinkfast ifgen`` is its command.

Departures from IFEval: the instruction sentences are written here (several phrasings each, after Google's
``build_description``); arguments are drawn from small word pools rather than Google's generators; combinations
that cannot all be followed are never drawn (:func:`sample_instructions` lists the rules).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..nano.tasks import Problem, chat_prompt, extract_answer, format_answer, make_problems, teacher_trace
from .ifeval import INSTRUCTIONS, check_instructions

__all__ = ["GENERAL_INSTRUCTIONS", "NANO_INSTRUCTIONS", "IFItem", "comply", "describe", "generate_if_prompts",
           "if_response", "ifeval_test_file", "ifeval_test_prompts", "nano_if_items", "read_prompt_texts",
           "sample_instructions"]

LOWER, CAPITAL = "change_case:english_lowercase", "change_case:english_capital"
JSON, QUOTE, TITLE = "detectable_format:json_format", "startend:quotation", "detectable_format:title"
END, WORDS, PARAS = "startend:end_checker", "length_constraints:number_words", "length_constraints:number_paragraphs"
KEYWORDS, FORBIDDEN, NO_COMMA = "keywords:existence", "keywords:forbidden_words", "punctuation:no_comma"
REPEAT, LANGUAGE = "combination:repeat_prompt", "language:response_language"

# The instructions a correct nano answer can follow, each checked by the project's own checker (tested).
NANO_INSTRUCTIONS: tuple[str, ...] = (LOWER, CAPITAL, END, QUOTE, JSON, WORDS, KEYWORDS, FORBIDDEN, NO_COMMA,
                                      TITLE, PARAS)
# Instructions that apply to any question (constrained_response wants a yes/no question).
GENERAL_INSTRUCTIONS: tuple[str, ...] = tuple(i for i in INSTRUCTIONS
                                              if i != "detectable_format:constrained_response")

# ------------------------------------------------------------------------------------------ compatibility

# At most one instruction of each group: the case of the whole text; the layout of the whole response.
_EXCLUSIVE = (
    frozenset({LOWER, CAPITAL, "change_case:capital_word_frequency", LANGUAGE}),
    frozenset({JSON, PARAS, "length_constraints:nth_paragraph_first_word", "detectable_format:multiple_sections",
               "combination:two_responses", REPEAT, "detectable_format:constrained_response"}),
)
_CONFLICTS = {  # pairs that cannot both be followed (or only by a contortion)
    JSON: {QUOTE, END, "detectable_content:postscript", "detectable_format:number_bullet_lists",
           "length_constraints:number_sentences"},
    REPEAT: {QUOTE, NO_COMMA, WORDS, "length_constraints:number_sentences", "keywords:frequency",
             "keywords:letter_frequency", LANGUAGE, "change_case:capital_word_frequency"},
    LANGUAGE: {KEYWORDS, "keywords:frequency", END, "length_constraints:nth_paragraph_first_word",
               "detectable_format:multiple_sections"},
    "detectable_format:multiple_sections": {LOWER, CAPITAL, "change_case:capital_word_frequency"},
}
_CONSTRAINED_OK = {NO_COMMA, QUOTE, END, TITLE, "detectable_content:postscript"}


def _compatible(a: str, b: str) -> bool:
    if any(a in g and b in g for g in _EXCLUSIVE):
        return False
    if b in _CONFLICTS.get(a, ()) or a in _CONFLICTS.get(b, ()):
        return False
    constrained = "detectable_format:constrained_response"
    return not ((a == constrained and b not in _CONSTRAINED_OK) or (b == constrained and a not in _CONSTRAINED_OK))


# ------------------------------------------------------------------------------------------ argument pools

NANO_KEYWORDS = ("result", "number", "total", "value", "final", "solution", "computed", "reply")
GENERAL_KEYWORDS = ("important", "reason", "example", "summary", "detail", "step", "careful", "clear", "result",
                    "explain", "conclusion", "overall")
# Never written by comply, never in an end phrase, keyword, first word or section marker.
FORBIDDEN_POOL = ("simply", "obviously", "basically", "guess", "easy", "maybe", "probably", "roughly",
                  "approximately", "trivial", "honestly", "literally", "just", "very")
FREQUENCY_WORDS = ("because", "therefore", "first", "then", "finally", "which", "also")
END_PHRASES = ("Is there anything else I can help with?", "Any other questions?", "Hope this helps.",
               "Let me know if you have additional questions.", "That is all.", "Thank you for reading.")
FIRST_WORDS = ("first", "next", "then", "overall", "in", "to", "the", "this")
SPLITTERS = ("Section", "SECTION", "Part", "PART", "Chapter")
LANGUAGES = {"es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese", "ru": "Russian",
             "ja": "Japanese", "ko": "Korean", "hi": "Hindi", "ar": "Arabic", "fi": "Finnish", "sw": "Swahili",
             "bn": "Bengali", "th": "Thai", "vi": "Vietnamese", "pl": "Polish", "en": "English"}
_RARE_LETTERS = "qzxjk"  # "less than" counts only of letters English can do without
_WORD_LIMITS = (5, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100)


def _nano_words(spec: dict) -> int:
    """The most words :func:`comply` writes for ``spec`` (without number_words), whatever lead it picks."""
    return max(len(re.findall(r"\w+", _render("Answer: 0", spec, lead)))
               for lead in range(len(_LEADS) if (LOWER in spec or CAPITAL in spec) else 1))


def _draw_kwargs(rng: random.Random, iid: str, spec: dict, text: str | None) -> dict:
    """Arguments for ``iid`` given those drawn so far (``spec``); ``text`` the source prompt (``None``: a nano
    answer, so only what :func:`comply` can follow)."""
    nano = text is None
    rel = rng.choice(("less than", "at least"))
    if iid == KEYWORDS:
        return {"keywords": rng.sample(NANO_KEYWORDS if nano else GENERAL_KEYWORDS, rng.randint(1, 2 if nano else 3))}
    if iid == FORBIDDEN:
        used = " ".join([text or ""] + [str(v) for kw in spec.values() for v in kw.values()]).lower()
        pool = [w for w in FORBIDDEN_POOL if not re.search(rf"\b{w}\b", used)]
        return {"forbidden_words": rng.sample(pool, min(len(pool), rng.randint(1, 3)))}
    if iid == "keywords:frequency":
        return {"keyword": rng.choice(FREQUENCY_WORDS), "relation": rel,
                "frequency": rng.randint(1, 4) if rel == "at least" else rng.randint(2, 5)}
    if iid == "keywords:letter_frequency":
        if rel == "less than":
            return {"letter": rng.choice(_RARE_LETTERS), "let_relation": rel, "let_frequency": rng.randint(3, 10)}
        return {"letter": chr(rng.randint(97, 122)), "let_relation": rel, "let_frequency": rng.randint(2, 12)}
    if iid == LANGUAGE:
        return {"language": rng.choice([c for c in LANGUAGES if c != "en"])}
    if iid == "length_constraints:number_sentences":
        return {"relation": rel, "num_sentences": rng.randint(2, 8) if rel == "at least" else rng.randint(4, 12)}
    if iid == PARAS:
        return {"num_paragraphs": rng.randint(2, 4 if nano else 5)}
    if iid == WORDS:
        if nano:
            need = _nano_words(spec)
            return {"relation": "less than", "num_words": rng.choice([t for t in _WORD_LIMITS if t > need])}
        return {"relation": rel, "num_words": rng.choice((50, 100, 150, 200, 300, 400) if rel == "less than"
                                                         else (20, 50, 100, 150, 200, 300))}
    if iid == "length_constraints:nth_paragraph_first_word":
        n = rng.randint(2, 5)
        return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": rng.choice(FIRST_WORDS)}
    if iid == "detectable_content:number_placeholders":
        return {"num_placeholders": rng.randint(1, 4)}
    if iid == "detectable_content:postscript":
        return {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}
    if iid == "detectable_format:number_bullet_lists":
        return {"num_bullets": rng.randint(2, 5)}
    if iid == "detectable_format:number_highlighted_sections":
        return {"num_highlights": rng.randint(1, 4)}
    if iid == "detectable_format:multiple_sections":
        return {"section_spliter": rng.choice(SPLITTERS), "num_sections": rng.randint(2, 5)}
    if iid == REPEAT:
        return {"prompt_to_repeat": text}
    if iid == END:
        return {"end_phrase": rng.choice(END_PHRASES)}
    if iid == "change_case:capital_word_frequency":
        return {"capital_relation": rel, "capital_frequency": rng.randint(2, 8) if rel == "at least"
                else rng.randint(3, 10)}
    return {}


def _structures(spec: dict) -> int:
    """The most parts (paragraphs, sections, bullets, responses) ``spec`` asks for."""
    counts = [kw.get(k, 0) for kw in spec.values() for k in ("num_paragraphs", "num_sections", "num_bullets")]
    return max(counts + [2 if "combination:two_responses" in spec else 0])


def sample_instructions(rng: random.Random, k: int, allowed: Sequence[str] = NANO_INSTRUCTIONS, *,
                        text: str | None = None) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """``k`` distinct instructions of ``allowed`` with random arguments, checked by
    :func:`~thinkfast.tasks.ifeval.check_instructions`. ``text``: the source prompt the instructions follow
    (``None``: a nano problem, and the arguments are ones :func:`comply` can follow: keywords from
    :data:`NANO_KEYWORDS`, 2-4 paragraphs, a ``less than`` word limit above the words comply writes).

    Never drawn together (they cannot all be followed, or only by a contortion):

    * two of: all lowercase, all capitals, a capital-word count, a response language;
    * two whole-response layouts: JSON, ``***`` paragraphs, ``\\n\\n`` paragraphs with a first word, sections,
      two responses, repeating the prompt, a constrained yes/no answer;
    * JSON with quotation marks, an end phrase, a postscript, bullets or a sentence count;
    * repeating the prompt with quotation marks, no commas, word / sentence / keyword / letter counts, a
      language or a capital-word count (the prompt itself may break them);
    * a non-English language with English keywords, an end phrase, a first word or section markers; sections
      (``Section 1``: case-sensitive) with a change of case;
    * a constrained answer with anything but no commas, quotation, an end phrase, a title or a postscript;
    * a forbidden word that is a keyword, an end phrase's word, another argument's word or a word of ``text``
      (keyword, frequency and forbidden words come from disjoint pools);
    * a ``less than`` sentence count not above the paragraphs / sections / bullets asked for plus one.

    >>> sample_instructions(random.Random(0), 2)
    (('keywords:existence', 'length_constraints:number_paragraphs'), ({'keywords': ['total', 'computed']}, \
{'num_paragraphs': 4}))
    """
    allowed = tuple(dict.fromkeys(allowed))
    unknown = [i for i in allowed if i not in INSTRUCTIONS]
    if unknown:
        raise ValueError(f"unknown IFEval instruction id(s) {', '.join(unknown)}")
    pool = [i for i in allowed if i != REPEAT or (text or "").strip()]  # nothing to repeat without a text
    if not 1 <= k <= len(pool):
        raise ValueError(f"cannot draw {k} instructions from {len(pool)} allowed ones ({', '.join(pool)})")
    for _ in range(20):
        chosen: list[str] = []
        for iid in rng.sample(pool, len(pool)):
            if len(chosen) < k and all(_compatible(iid, c) for c in chosen):
                chosen.append(iid)
        if len(chosen) == k:
            break
    else:
        raise ValueError(f"cannot draw {k} compatible instructions from {', '.join(pool)}")
    spec: dict[str, dict] = {}
    for iid in sorted(chosen, key=lambda i: i == WORDS):  # the nano word limit counts what the others add
        spec[iid] = _draw_kwargs(rng, iid, spec, text)
    sentences = spec.get("length_constraints:number_sentences")
    if sentences and sentences["relation"] == "less than":
        sentences["num_sentences"] = max(sentences["num_sentences"], _structures(spec) + 2)
    return check_instructions(chosen, [spec[i] for i in chosen])


# -------------------------------------------------------------------------------------------- sentences


def _quoted(words) -> str:
    q = [f'"{w}"' for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


_PHRASES: dict[str, tuple[str, ...]] = {
    "keywords:existence": ("Include the keywords {keywords} in the response.",
                           "Make sure your response contains {keywords_phrase}.",
                           "Your reply must mention {keywords}."),
    "keywords:frequency": ('In your response, the word "{keyword}" should appear {relation} {frequency} times.',
                           'Use the word "{keyword}" {relation} {frequency} times in your reply.'),
    FORBIDDEN: ("Do not include the keywords {forbidden_words} in the response.",
                "Avoid {forbidden_words_phrase} in your reply.",
                "Never use {forbidden_words_phrase}."),
    "keywords:letter_frequency": ('In your response, the letter "{letter}" should appear {let_relation} '
                                  '{let_frequency} times.',
                                  'Use the letter "{letter}" {let_relation} {let_frequency} times.'),
    LANGUAGE: ("Your ENTIRE response should be in {language} language, no other language is allowed.",
               "Respond only in {language}; no other language is allowed."),
    "length_constraints:number_sentences": ("Your response should contain {relation} {num_sentences} sentences.",
                                            "Answer in {relation} {num_sentences} sentences."),
    PARAS: ("There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***",
            "Write exactly {num_paragraphs} paragraphs, separated from each other by the markdown divider ***."),
    WORDS: ("Answer with {relation} {num_words} words.", "Your response should contain {relation} {num_words} words.",
            "Keep your reply to {relation} {num_words} words."),
    "length_constraints:nth_paragraph_first_word": (
        "There should be {num_paragraphs} paragraphs. Paragraphs and only paragraphs are separated with each other "
        "by two new lines. Paragraph {nth_paragraph} must start with the word {first_word}.",
        "Write {num_paragraphs} paragraphs separated by blank lines; paragraph {nth_paragraph} must begin with the "
        'word "{first_word}".'),
    "detectable_content:number_placeholders": (
        "The response must contain at least {num_placeholders} placeholders represented by square brackets, such "
        "as [address].",
        "Include at least {num_placeholders} placeholders in square brackets, like [name]."),
    "detectable_content:postscript": ("At the end of your response, please explicitly add a postscript starting "
                                      "with {postscript_marker}",
                                      "End with a postscript that starts with {postscript_marker}"),
    "detectable_format:number_bullet_lists": (
        "Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet points such as:\n"
        "* This is point 1.\n* This is point 2",
        "Use exactly {num_bullets} markdown bullet points (lines starting with *)."),
    "detectable_format:constrained_response": ("Answer with one of the following options: ('My answer is yes.', "
                                               "'My answer is no.', 'My answer is maybe.')",),
    "detectable_format:number_highlighted_sections": (
        "Highlight at least {num_highlights} sections in your answer with markdown, i.e. *highlighted section*.",
        "Use markdown to highlight at least {num_highlights} sections, like *this one*."),
    "detectable_format:multiple_sections": (
        "Your response must have {num_sections} sections. Mark the beginning of each section with "
        "{section_spliter} X, such as:\n{section_spliter} 1\n[content of section 1]\n{section_spliter} 2\n"
        "[content of section 2]",
        "Split your reply into {num_sections} sections, each starting with {section_spliter} X (X its number)."),
    JSON: ("Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
           "Wrap your entire response in JSON format.",
           "Give the whole reply as JSON."),
    TITLE: ("Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
            "Include a title in double angular brackets, like <<my title>>."),
    "combination:two_responses": ("Give two different responses. Responses and only responses should be separated "
                                  "by 6 asterisk symbols: ******.",
                                  "Write two different answers separated by ******."),
    REPEAT: ("First repeat the request word for word without change, then give your answer (1. do not say any "
             "words or characters before repeating the request; 2. the request you need to repeat does not include "
             "this sentence)",),
    END: ("Finish your response with this exact phrase: {end_phrase} No other words should follow this phrase.",
          'End your reply with the exact phrase "{end_phrase}" and nothing after it.'),
    QUOTE: ("Wrap your entire response with double quotation marks.",
            "Put your whole reply inside double quotation marks."),
    "change_case:capital_word_frequency": ("In your response, words with all capital letters should appear "
                                           "{capital_relation} {capital_frequency} times.",
                                           "Use {capital_relation} {capital_frequency} words in ALL CAPITALS."),
    CAPITAL: ("Your entire response should be in English, and in all capital letters.",
              "Your whole reply must be in English and in CAPITAL LETTERS only.",
              "Write your entire answer in English using only capital letters."),
    LOWER: ("Your entire response should be in English, and in all lowercase letters. No capital letters are "
            "allowed.",
            "Reply in English, all in lowercase letters; no capital letters are allowed.",
            "Your whole answer must be in English and in lowercase only."),
    NO_COMMA: ("In your entire response, refrain from the use of any commas.",
               "Do not use any commas in your reply.",
               "Avoid commas entirely."),
}


def describe(ids: Sequence[str], kwargs: Sequence[Mapping], rng: random.Random | None = None) -> str:
    """The instructions as sentences in IFEval's manner, one phrasing each (the first, or one drawn by ``rng``).

    >>> describe(["change_case:english_lowercase", "keywords:existence"], [{}, {"keywords": ["sum", "total"]}])
    'Your entire response should be in English, and in all lowercase letters. No capital letters are allowed. \
Include the keywords "sum" and "total" in the response.'
    """
    ids, kwargs = check_instructions(ids, kwargs)
    out = []
    for iid, kw in zip(ids, kwargs):
        fields = {k: _quoted(v) if isinstance(v, list) else v for k, v in kw.items()}
        fields.update({f"{k}_phrase": ("the word " if len(v) == 1 else "the words ") + _quoted(v)
                       for k, v in kw.items() if isinstance(v, list)})
        if iid == LANGUAGE:
            fields["language"] = LANGUAGES.get(kw["language"], kw["language"])
        phrases = _PHRASES[iid]
        out.append((rng.choice(phrases) if rng is not None else phrases[0]).format(**fields))
    # a sentence that ends in a marker (***, P.S.) is followed by a new line, not glued to the next one
    return "".join(s + ("" if i == len(out) - 1 else " " if s[-1] in '.?!)"' else "\n") for i, s in enumerate(out))


# ------------------------------------------------------------------------------------------------ comply

# Leading sentences for all-lowercase / all-capital replies: langdetect calls a bare "answer: 42" Afrikaans or
# Somali; comply takes the first that the checkers accept.
_LEADS = ("Here is my final answer to the question.", "I worked out the problem and here is the result.",
          "The final answer is written here.")
_FILLERS = ("I read the question carefully.", "Then I worked through it step by step.", "Here is what I found.")
_TITLE = "<<Final Result>>"


def _render(answer: str, spec: Mapping[str, Mapping], lead: int = 0) -> str:
    paragraphs = [[f] for f in _FILLERS[:spec[PARAS]["num_paragraphs"] - 1]] if PARAS in spec else []
    last: list[str] = []
    if KEYWORDS in spec:
        words = spec[KEYWORDS]["keywords"]
        last.append(f"This reply uses the word{'s' if len(words) > 1 else ''} {' and '.join(words)}.")
    if LOWER in spec or CAPITAL in spec:
        last.append(_LEADS[lead])
    last.append(answer.strip())
    if END in spec:
        last.append(spec[END]["end_phrase"].strip())
    paragraphs.append(last)
    if TITLE in spec:
        paragraphs[0].insert(0, _TITLE)
    sep = " " if JSON in spec else "\n"  # an escaped newline in a JSON string would be a lowercase n
    text = "\n***\n".join(sep.join(p) for p in paragraphs)
    text = text.lower() if LOWER in spec else text.upper() if CAPITAL in spec else text
    if JSON in spec:
        text = '{"%s": %s}' % ("ANSWER" if CAPITAL in spec else "answer", json.dumps(text))
    if QUOTE in spec:
        text = f'"{text}"'
    return text


def _failed(text: str, ids, kwargs) -> list[str]:
    return [i for i, kw in zip(ids, kwargs) if not INSTRUCTIONS[i](text, kw, "")]


def comply(answer: str, ids: Sequence[str], kwargs: Sequence[Mapping]) -> str:
    """``answer`` (the teacher's final answer, ``Answer: 42``) rewritten to follow every instruction of
    :data:`NANO_INSTRUCTIONS` given, its ``Answer: N`` still read by :func:`~thinkfast.nano.tasks.extract_answer`
    (JSON keeps it inside the one string value; ``answer:`` / ``ANSWER:`` in a changed case). Checked with the
    graders before it is returned: arguments no reply can follow (``at least`` 50 words) are a ``ValueError``.

    >>> print(comply("Answer: 42", ["change_case:english_lowercase", "startend:end_checker"],
    ...              [{}, {"end_phrase": "Any other questions?"}]))
    here is my final answer to the question.
    answer: 42
    any other questions?
    >>> comply("Answer: 42", ["detectable_format:json_format", "detectable_format:title"], [{}, {}])
    '{"answer": "<<Final Result>> Answer: 42"}'
    """
    ids, kwargs = check_instructions(ids, kwargs)
    other = [i for i in ids if i not in NANO_INSTRUCTIONS]
    if other:
        raise ValueError(f"comply follows only NANO_INSTRUCTIONS, not {', '.join(other)}")
    spec = dict(zip(ids, kwargs))
    bad = [a for a in ids for b in ids if a < b and not _compatible(a, b)]
    if bad:
        raise ValueError(f"instructions {list(ids)} cannot all be followed")
    leads = range(len(_LEADS)) if (LOWER in spec or CAPITAL in spec) else range(1)
    for lead in leads:
        text = _render(answer, spec, lead)
        failed = _failed(text, ids, kwargs)
        if not failed:
            if extract_answer(text) != extract_answer(answer):
                raise ValueError(f"comply lost the answer of {answer!r} in {text!r}")
            return text
    raise ValueError(f"cannot follow {', '.join(failed)} with arguments {[spec[i] for i in failed]}")


# ------------------------------------------------------------------------------------------------- nano


@dataclass(frozen=True)
class IFItem:
    """A nano problem with instructions: ``prompt`` is the user message (the problem, then the instructions),
    ``thinking`` the mode it is asked in."""

    problem: Problem
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict, ...]
    thinking: bool


def _rng(key: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))


def _half(problem: Problem) -> int:
    """0 (train) or 1 (eval): a hash of the problem, so the two splits never share one."""
    return hashlib.sha256(f"{problem.kind}:{problem.question}".encode()).digest()[0] & 1


def _split_problems(n: int, seed: int, kinds, digits, steps, split: str) -> list[Problem]:
    want = {"train": 0, "eval": 1}.get(split)
    if want is None:
        raise ValueError(f"unknown split {split!r}; expected train or eval")
    queues: dict[str, list[Problem]] = {k: [] for k in kinds}
    out: list[Problem] = []
    drawn, m = 0, 2 * n + 16
    while len(out) < n:
        if m > 1000 * n + 10_000:
            raise ValueError(f"too few {split} problems for kinds {kinds}, digits {digits}, steps {steps}")
        for p in make_problems(m, seed, kinds, digits, steps, split=split)[drawn:]:
            if _half(p) == want:
                queues[p.kind].append(p)
        drawn, m = m, 2 * m
        while len(out) < n and queues[kinds[len(out) % len(kinds)]]:
            out.append(queues[kinds[len(out) % len(kinds)]].pop(0))
    return out


def nano_if_items(n: int, *, seed: int, kinds=("add", "sub", "mul", "word"), digits=(1, 2), steps=(2,),
                  split: str = "train", instructions=(1, 3), thinking: str = "both") -> list[IFItem]:
    """``n`` nano problems, each with ``instructions`` = (min, max) of :data:`NANO_INSTRUCTIONS`, deterministic in
    ``seed``. Problems come from :func:`~thinkfast.nano.tasks.make_problems` of ``split`` (kinds in turn) and are
    kept only in their split's half of a hash partition, so train and eval items never share a problem; the
    instructions and phrasings from a stream keyed on (seed, split). ``thinking``: "on", "off" or "both"
    (alternating, on first)."""
    kinds = tuple(kinds)
    if thinking not in ("on", "off", "both"):
        raise ValueError(f"thinking must be on, off or both, got {thinking!r}")
    lo, hi = instructions
    if not 1 <= lo <= hi <= len(NANO_INSTRUCTIONS):
        raise ValueError(f"instructions={instructions}: need 1 <= min <= max <= {len(NANO_INSTRUCTIONS)}")
    if not kinds:
        raise ValueError("kinds must be non-empty")
    problems = _split_problems(n, seed, kinds, tuple(digits), tuple(steps), split)
    rng = _rng(f"instructions:{split}:{seed}")
    items = []
    for i, p in enumerate(problems):
        ids, kws = sample_instructions(rng, rng.randint(lo, hi))
        items.append(IFItem(p, f"{chat_prompt(p)}\n{describe(ids, kws, rng)}", ids, kws,
                            thinking == "on" or (thinking == "both" and i % 2 == 0)))
    return items


def if_response(item: IFItem) -> str:
    """The teacher's reply to ``item`` in its mode: the worked trace in a think block when thinking, then the
    answer rewritten by :func:`comply`."""
    answer = comply(format_answer(item.problem.answer), item.instruction_id_list, item.kwargs)
    return f"<think>\n{teacher_trace(item.problem)}\n</think>\n\n{answer}" if item.thinking else answer


# ------------------------------------------------------------------------------------------ prompt files


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def ifeval_test_file() -> Path:
    """Where IFEval's test prompts are expected: ``shared/data/ifeval/input_data.jsonl`` beside the repository."""
    return Path(__file__).resolve().parents[3].parent / "shared/data/ifeval/input_data.jsonl"


def _json_lines(path: Path):
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row must be a JSON object")
            yield lineno, row


def ifeval_test_prompts(path: str | Path | None = None) -> set[str]:
    """The prompts of IFEval's test file (default: ``shared/data/ifeval/input_data.jsonl`` beside the
    repository); the empty set when the default file is absent (a given ``path`` must exist)."""
    if path is None:
        path = ifeval_test_file()
        if not path.is_file():
            return set()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IFEval prompts file not found: {path}")
    out = set()
    for lineno, row in _json_lines(path):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: no string field 'prompt'")
        out.add(row["prompt"])
    return out


def read_prompt_texts(path: str | Path, field: str | None = None, keep: Sequence[str] = ()
                      ) -> list[str] | tuple[list[str], list[dict]]:
    """The prompt of each JSON line of ``path``: its ``field``, else the first of ``prompt``, ``question`` and
    ``input`` it has; a bad line is a ``ValueError`` naming the file and the line. With ``keep`` (field names),
    also each row's fields of those names (every row must have them): ``(texts, kept)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    out, kept = [], []
    for lineno, row in _json_lines(path):
        names = (field,) if field else ("prompt", "question", "input")
        name = next((k for k in names if k in row), None)
        if name is None or not isinstance(row[name], str):
            raise ValueError(f"{path}:{lineno}: no string field {' / '.join(map(repr, names))}")
        lacking = [k for k in keep if k not in row]
        if lacking:
            raise ValueError(f"{path}:{lineno}: no field {', '.join(map(repr, lacking))} to keep")
        out.append(row[name])
        kept.append({k: row[k] for k in keep})
    return (out, kept) if keep else out


def _clashes(text: str, exclude: list[str]) -> bool:
    return any(text in e or e in text for e in exclude)


def generate_if_prompts(texts: Sequence[str], n: int, *, seed: int, instructions=(1, 3),
                        allowed: Sequence[str] = GENERAL_INSTRUCTIONS, exclude: Iterable[str] = (),
                        stats: dict | None = None, extra: Sequence[dict] | None = None) -> list[dict]:
    """Up to ``n`` rows in IFEval's schema (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``): a source
    text, then (min, max) = ``instructions`` of ``allowed`` as sentences (:func:`sample_instructions`,
    :func:`describe`), deterministic in ``seed``. Sources are taken in a seeded order, again (with new
    instructions) when ``n`` exceeds them, until ``n`` rows or no new prompt. Empty sources are skipped, and
    so is a source (or a prompt made) whose text, compared case- and whitespace-insensitively, equals, contains or
    is contained in an ``exclude`` prompt; ``stats`` (if given) gets ``sources``, ``excluded`` and ``empty``.
    ``extra[i]`` (optional): fields copied into every row made from ``texts[i]`` (e.g. a gold answer for another
    reward); they may not be named like the schema's four.

    >>> rows = generate_if_prompts(["What is 2 + 2?", "Name a colour."], 2, seed=0, exclude=["name a colour."])
    >>> [r["prompt"].split("?")[0] for r in rows], rows[0]["prompt"] != rows[1]["prompt"]
    (['What is 2 + 2', 'What is 2 + 2'], True)
    """
    lo, hi = instructions
    if not 1 <= lo <= hi:
        raise ValueError(f"instructions={instructions}: need 1 <= min <= max")
    excl = [e for e in map(_norm, exclude) if e]
    if extra is not None:
        if len(extra) != len(texts):
            raise ValueError(f"extra has {len(extra)} entries for {len(texts)} texts")
        clash = sorted({k for e in extra for k in e} & {"key", "prompt", "instruction_id_list", "kwargs"})
        if clash:
            raise ValueError(f"extra fields {clash} would overwrite the IFEval schema's own")
    usable, excluded, empty = [], 0, 0
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"source prompts must be strings, got {type(t).__name__}")
        nt = _norm(t)
        if not nt:
            empty += 1
        elif _clashes(nt, excl):
            excluded += 1
        else:
            usable.append((t.strip(), i))
    rng = _rng(f"ifgen:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < n and usable:
        before = len(rows)
        for t, i in rng.sample(usable, len(usable)):
            if len(rows) == n:
                break
            ids, kws = sample_instructions(rng, rng.randint(lo, hi), allowed, text=t)
            prompt = t + ("\n\n" if "\n" in t else " ") + describe(ids, kws, rng)
            if prompt in seen or _clashes(_norm(prompt), excl):
                continue
            seen.add(prompt)
            rows.append({"key": len(rows), "prompt": prompt, "instruction_id_list": list(ids),
                         "kwargs": [dict(k) for k in kws], **(extra[i] if extra is not None else {})})
        if len(rows) == before:
            break
    if stats is not None:
        stats.update(sources=len(texts), excluded=excluded, empty=empty)
    return rows
