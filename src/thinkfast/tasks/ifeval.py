"""IFEval grading: the 25 verifiable instructions of Zhou et al. 2023, "Instruction-Following Evaluation for
Large Language Models" (arXiv:2311.07911), with the semantics of Google's reference checker
(google-research/instruction_following_eval: instructions.py, evaluation_lib.py), written anew here.

* :data:`INSTRUCTIONS`: instruction id -> checker ``(response, kwargs, prompt) -> bool``; ``None`` values in
  kwargs are ignored (the Hugging Face copy of the data fills every unused key with ``None``).
* :data:`KWARGS` / :func:`check_instructions`: each instruction's arguments (Google's ``build_description``'s)
  and their check: an unknown id, a missing, mistyped, out-of-range or unexpected argument is a ``ValueError``
  naming the instruction and the key, before anything is graded.
* :func:`load_ifeval`: the ``input_data.jsonl`` rows as :class:`IFEvalItem`; :func:`read_if_prompts`: your own
  rows in the same schema (``key`` optional); a bad row is a ``ValueError`` that names the file and the line.
* :func:`grade`: per instruction, ``strict`` (the checker on the response; an empty or all-whitespace response
  follows nothing) and ``loose`` (any of eight non-empty variants passes: the response itself, without its
  first line, without its last line, without both, and each of those four with every ``*`` removed), as
  Google's ``test_instruction_following_strict`` / ``_loose`` do.
* :func:`score`: prompt-level (every instruction of a prompt followed) and instruction-level accuracy.
* :func:`ifeval_strict` / :func:`ifeval_loose`: the same grading as RL rewards (TRL's signature; columns
  ``instruction_id_list`` and ``kwargs`` as in IFEval's data): 1.0 when the answer after the think block
  follows every instruction of its row (prompt-level, all or nothing), as evaluation grades it;
  :func:`ifeval_share` the share of them it follows (strict). They strip the thinking first and fail closed
  (REFERENCE.md section 6): an unclosed think block follows nothing, bad instructions (:func:`check_instructions`)
  are an error, never a pass.

Departures from the reference, all documented here:

* Sentences: Google counts them with NLTK's punkt English model, whose data cannot be fetched offline.
  :func:`split_sentences` re-creates punkt's decisions (current NLTK) with rules and short word lists:
  a candidate break is a ``.``, ``?`` or ``!`` followed by whitespace and a token, or by a quote, bracket or
  ``*:;@!?`` (of a run of candidates without whitespace only the last counts, so ``?!`` and ``!!!`` end one
  sentence); ``?``/``!`` always break; a period after an ordinary word always breaks (punkt's English model
  has no ``e.g``, ``i.e`` or ``etc`` abbreviation, so it breaks after those too); after one of its
  abbreviations (``Mr.``, ``Dr.``, ``U.S.``, ``a.m.``, ``Inc.`` ...) or an ellipsis it breaks only before a
  capitalised sentence starter (``The``, ``However``, ``This`` ...: punkt's list plus the frequent words its
  orthographic table marks so); after a number (``1.``) it breaks unless a lowercase word follows; after a
  lone initial, unless a lowercase word or a capitalised word never seen in lowercase (a name) follows;
  ``3.14`` and ``a.b`` never break; closing quotes and brackets after a break stay with their sentence.
  punkt's full orthographic table (thousands of words) and its collocations are not reproduced, so rare
  words after an initial, an abbreviation or an ellipsis can make the two disagree.
* Capital words (``change_case:capital_word_frequency``): Google counts ``nltk.word_tokenize`` tokens that are
  ``str.isupper()``; :func:`capital_words` splits as NLTK's word tokenizer does where it matters for case
  (whitespace, ``,;:@#$%&?!*()[]{}<>"`` and curly quotes, ``--``, ``...``, dashes, the clitics ``n't 's 'm 'd
  're 've 'll`` and ``cannot``/``gonna``/``gotta``/``wanna``/``gimme``/``lemme``), so ``DON'T`` is two capital
  words and ``AI's`` one; ``,``/``:`` between digits are split too (harmless: digits have no case).
* Words: ``re.findall(r"\\w+")``, exactly what NLTK's ``RegexpTokenizer(r"\\w+")`` returns; no NLTK needed.
* Language (``language:response_language``, ``change_case:english_capital``/``english_lowercase``):
  ``langdetect`` as in Google's code, seeded (``DetectorFactory.seed = 0``) as Google's current code is;
  it is imported only when such an instruction is graded (ImportError with the fix when it is missing).
  A text langdetect cannot classify counts as followed, as in Google's code.
* Missing, invalid or unexpected kwargs raise ``ValueError`` where Google's code would draw random values (an
  ``nth_paragraph`` beyond the paragraphs found is simply not followed); a keyword or forbidden word that is
  not a valid regular expression is matched literally (Google's code would crash); ``keywords:letter_frequency``
  counts any single character (``#``, ``!``), as Google's current code does (older code drew a random letter);
  ``combination:repeat_prompt`` needs ``prompt_to_repeat`` (the full prompt is never used in its place).
* :func:`score` of no graded items is all zeros rather than a division by zero.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .completion import completion_text, final_answer

__all__ = ["INSTRUCTIONS", "KWARGS", "IFEvalItem", "capital_words", "check_instructions", "count_sentences",
           "count_words", "grade", "ifeval_loose", "ifeval_share", "ifeval_strict", "load_ifeval", "read_if_prompts",
           "score", "split_sentences"]

Checker = Callable[[str, Mapping, str], bool]

# ---------------------------------------------------------------------------------------------- text units


def count_words(text: str) -> int:
    """Words as NLTK's ``RegexpTokenizer(r"\\w+")`` finds them.

    >>> count_words("d3sCRi7 lArge lAnguagE M0del w1tH 20 w0RdS.")
    7
    """
    return len(re.findall(r"\w+", text))


# Abbreviations of punkt's English model (lowercase, without the final period) that ordinary text meets.
_ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof sr jr st messrs rep reps sen gen col lt maj adm gov ft
    co corp inc ltd bros cie vs v ok mg yr ave
    jan feb aug sep sept oct nov dec wed tues fri
    a.m p.m ph.d u.s u.k u.n u.s.a u.s.s.r d.c n.y l.a m.b.a
    ala ariz calif colo conn fla ga ill kan ky mich minn nev okla ore pa tenn va vt wash wis
    c d e f g h k l m n p r s t w
""".split())
# Capitalised, these start a sentence after an abbreviation or an ellipsis in punkt's English model (its
# sentence starters, and frequent words it saw lowercase but never capitalised inside a sentence).
_STARTERS = frozenset("""
    above according afterwards almost although always among anyone anything anyway being besides between both
    but certainly check choose consider despite does doing either else especially even eventually finally
    following furthermore he her here hers herself him himself however i if imagine importantly in including
    indeed instead it many meanwhile moreover most myself naturally nevertheless nonetheless nor note nothing
    okay otherwise ours ourselves overall please possibly remember sales separately similarly since so some
    someone sometimes soon still such surely thank thanks the them themselves there therefore these they this
    though through thus together try ultimately under unfortunately unless unlike upon us very were when
    whenever whereas whether which while whom within without yes yet your yourself
""".split())
# Words punkt has seen in lowercase (capitalised after an initial, they start a sentence), beyond those the
# text itself uses in lowercase: frequent ones that a text may only use capitalised.
_COMMON = _STARTERS.union("""
    a about across actually add after again against all also an and another any are as at be because before
    below by can clearly could definitely did do during each every everyone everything first for from further
    generally good great had has have his how is its just keep later let like likely make may maybe me might
    more mostly much must my new next no none not now of often on once one only or other our out over perhaps
    plus rather really second she should something sure than that their then third those to today too try use
    usually was we well what whatever where who whose why will with would you
""".split()) - {"i"}
_NW = r"[)\";}\]*:@'({\[\u2018\u2019\u201c\u201d\xab\xbb!?]"  # punkt's characters that end a word
_MULTI = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"  # dashes and ellipses: one token each
# punkt's tokens: a dash or ellipsis run; a word (not starting with one of ("`{[:;&#*@)}]-,) up to whitespace,
# a word-ending character, a dash/ellipsis run or a final comma; else a single character.
_TOKEN = re.compile(rf"{_MULTI}|(?=[^(\"`{{\[:;&#*@)}}\]\-,])\S+?(?=\s|$|{_NW}|{_MULTI}|,(?=$|\s|{_NW}|{_MULTI}))|\S")
_CANDIDATE = re.compile(rf"[.?!](?=({_NW})|\s+(\S+))")
_NUMBER = re.compile(r"-?[.,]?\d[\d,.-]*\.?")
_CLOSERS = re.compile(r"[\"')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|(?=--)|$)", re.MULTILINE)
_SPACE = re.compile(r"[ \t\n\r\x0b\x0c]")  # punkt finds a word's start by ASCII whitespace


def _token_breaks(tok: str, nxt: str, lowercase: set[str]) -> bool:
    """Whether punkt ends a sentence after token ``tok`` followed by token ``nxt``, ``lowercase`` the words
    known in lowercase."""
    if tok in (".", "?", "!"):
        return True
    starter = nxt[:1].isupper() and nxt.rstrip(".").lower() in _STARTERS
    if re.fullmatch(r"\.\.+", tok):  # an ellipsis
        return starter
    if not tok.endswith("."):
        return False
    typ = tok[:-1].lower()
    initial = re.fullmatch(r"[^\W\d]\.", tok) is not None
    abbreviation = typ in _ABBREVIATIONS or typ.split("-")[-1] in _ABBREVIATIONS
    if abbreviation and not initial:
        return starter
    if initial or _NUMBER.fullmatch(tok):
        if nxt[:1].islower() or nxt in ";:,.!?":
            return False  # a lowercase word or punctuation follows
        if initial and nxt[:1].isupper() and nxt.rstrip(".").lower() not in lowercase:
            return False  # a name follows an initial
    return not abbreviation


def split_sentences(text: str) -> list[str]:
    """Sentences as NLTK's punkt English model splits them (approximated by rules; see the module docstring).

    >>> split_sentences('Mr. Smith went to the U.S. yesterday. He paid $3.14, e.g. for tea! "Yes." Wait... ok')
    ['Mr. Smith went to the U.S. yesterday.', 'He paid $3.14, e.g.', 'for tea!', '"Yes."', 'Wait... ok']
    """
    spaces = [m.start() for m in _SPACE.finditer(text)]
    matches = list(_CANDIDATE.finditer(text))
    lowercase = _COMMON.union(w.lower() for w in re.findall(r"[^\W\d_][\w'-]*", text) if w[0].islower())
    spans, begin = [], 0
    for i, m in enumerate(matches):
        p = m.start()
        k = bisect.bisect_left(spaces, p)
        word_start = spaces[k - 1] + 1 if k else 0
        if word_start < p and i + 1 < len(matches) and not (k < len(spaces) and spaces[k] < matches[i + 1].start()):
            continue  # of a run of candidates without whitespace between them only the last counts
        toks = _TOKEN.findall(text[word_start:m.end()] + (m.group(1) or text[p + 1:m.end(2)]))
        if any(_token_breaks(t, n, lowercase) for t, n in zip(toks, toks[1:])):
            spans.append([begin, p + 1])
            begin = m.start(2) if m.group(2) else p + 1
    spans.append([begin, len(text.rstrip())])
    for a, b in zip(spans, spans[1:]):  # closing quotes and brackets stay with the sentence they close
        m = _CLOSERS.match(text, b[0], b[1])
        if m:
            a[1] = b[0] + len(m.group(0).rstrip())
            b[0] = m.end()
    return [text[a:b] for a, b in spans if b > a]


def count_sentences(text: str) -> int:
    """The number of :func:`split_sentences` sentences."""
    return len(split_sentences(text))


_CLITIC = re.compile(r"(?<=[^' ])('s|'S|'m|'M|'d|'D|'ll|'LL|'re|'RE|'ve|'VE|n't|N'T|')$")
_OPENING_QUOTE = re.compile(r"(?i)(?<!\w)'(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)")
_FUSED = re.compile(r"(?i)^(can)(not)$|^(gim)(me)$|^(gon)(na)$|^(got)(ta)$|^(lem)(me)$|^(wan)(na)$")


def capital_words(text: str) -> list[str]:
    """The tokens of ``text`` that are all capitals, as ``nltk.word_tokenize`` would give them.

    >>> capital_words("HERE there are THREE FUlly CAPITAL words. DON'T say AI's name, AT&T, I said.")
    ['HERE', 'THREE', 'CAPITAL', 'DO', "N'T", 'AI', 'AT', 'T', 'I']
    """
    text = re.sub(r"--|\.{2,}|[,;:@#$%&?!*()\[\]{}<>\"`«»“”‘’„\u2012-\u2015]", " ", text)
    text = _OPENING_QUOTE.sub("' ", text)
    out = []
    for tok in text.split():
        tok = tok.rstrip(".")  # NLTK splits a sentence's final period off (abbreviations keep theirs: same case)
        m = _CLITIC.search(tok)
        parts = [tok[:m.start()], m.group(1)] if m else [tok]
        for part in parts:
            fused = _FUSED.match(part)
            out.extend([g for g in fused.groups() if g] if fused else [part])
    return [t for t in out if t.isupper()]


# ------------------------------------------------------------------------------------------------- checkers

_RELATIONS = ("less than", "at least")


def _arg(kwargs: Mapping, name: str):
    value = kwargs.get(name)
    if value is None:
        raise ValueError(f"IFEval instruction needs the argument {name!r}, got {dict(kwargs)}")
    return value


def _num(kwargs: Mapping, name: str) -> int:
    value = _arg(kwargs, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"IFEval argument {name!r} must be a non-negative integer, got {value!r}")
    return value


def _compare(count: int, kwargs: Mapping, relation_key: str, threshold_key: str) -> bool:
    relation, threshold = _arg(kwargs, relation_key), _num(kwargs, threshold_key)
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"IFEval relation must be one of {_RELATIONS}, got {relation!r}")


def _search(keyword: str, text: str, whole_word: bool = False) -> list[str]:
    """Case-insensitive ``re.findall`` of ``keyword`` as a regular expression, as Google's code does (literally
    where it is no valid one), between word boundaries if ``whole_word``."""
    try:
        re.compile(keyword)
    except re.error:
        keyword = re.escape(keyword)
    return re.findall(rf"\b{keyword}\b" if whole_word else keyword, text, flags=re.IGNORECASE)


_langdetect = None


def _language(text: str) -> str | None:
    """langdetect's language code for ``text``, ``None`` where it cannot tell."""
    global _langdetect
    if _langdetect is None:
        try:
            import langdetect
        except ImportError as e:
            raise ImportError("IFEval's language instructions need the langdetect package: "
                              "pip install langdetect") from e
        langdetect.DetectorFactory.seed = 0
        _langdetect = langdetect
    try:
        return _langdetect.detect(text)
    except _langdetect.LangDetectException:
        return None


def _is_language(text: str, code: str) -> bool:
    found = _language(text)
    return found is None or found == code  # undetectable counts as followed, as in Google's code


def _keywords_exist(r, kw, p):
    return all(_search(k, r) for k in _arg(kw, "keywords"))


def _keyword_frequency(r, kw, p):
    return _compare(len(_search(_arg(kw, "keyword").strip(), r)), kw, "relation", "frequency")


def _forbidden_words(r, kw, p):
    return not any(_search(w, r, whole_word=True) for w in _arg(kw, "forbidden_words"))


def _letter_frequency(r, kw, p):
    letter = _arg(kw, "letter").strip().lower()
    if len(letter) != 1:
        raise ValueError(f"IFEval letter must be a single non-whitespace character, got {kw['letter']!r}")
    return _compare(Counter(r.lower())[letter], kw, "let_relation", "let_frequency")


def _response_language(r, kw, p):
    return _is_language(r, _arg(kw, "language"))


def _number_sentences(r, kw, p):
    return _compare(count_sentences(r), kw, "relation", "num_sentences")


def _number_paragraphs(r, kw, p):
    parts = re.split(r"\s?\*\*\*\s?", r)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if 0 < i < len(parts) - 1:
                return False  # an empty paragraph between two dividers
            count -= 1
    return count == _num(kw, "num_paragraphs")


def _number_words(r, kw, p):
    return _compare(count_words(r), kw, "relation", "num_words")


def _nth_paragraph_first_word(r, kw, p):
    want, nth = _num(kw, "num_paragraphs"), _num(kw, "nth_paragraph")
    first_word = _arg(kw, "first_word").lower()
    parts = r.split("\n\n")
    count = sum(1 for part in parts if part.strip())
    if not 1 <= nth <= count:
        return False
    paragraph = parts[nth - 1].strip()  # indexes the raw split, empty parts included, as Google's code does
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    found = re.match(r"[^.,?!'\"]*", word).group(0).lower()
    return count == want and found == first_word


def _number_placeholders(r, kw, p):
    return len(re.findall(r"\[.*?\]", r)) >= _num(kw, "num_placeholders")


def _postscript(r, kw, p):
    marker = _arg(kw, "postscript_marker").strip()
    pattern = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}.get(
        marker, r"\s*" + marker.lower() + r".*$")
    return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def _number_bullet_lists(r, kw, p):
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == _num(kw, "num_bullets")


def _constrained_response(r, kw, p):
    value = r.strip()
    return any(option in value for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def _number_highlighted_sections(r, kw, p):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip()]
    return len(single) + len(double) >= _num(kw, "num_highlights")


def _multiple_sections(r, kw, p):
    splitter = _arg(kw, "section_spliter").strip()
    return len(re.split(r"\s?" + splitter + r"\s?\d+\s?", r)) - 1 >= _num(kw, "num_sections")


def _json_format(r, kw, p):
    value = r.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    try:
        json.loads(value.removesuffix("```").strip())
    except ValueError:
        return False
    return True


def _title(r, kw, p):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _two_responses(r, kw, p):
    parts = r.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def _repeat_prompt(r, kw, p):
    return r.strip().lower().startswith(_arg(kw, "prompt_to_repeat").strip().lower())


def _end_checker(r, kw, p):
    return r.strip().strip('"').lower().endswith(_arg(kw, "end_phrase").strip().lower())


def _quotation(r, kw, p):
    value = r.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def _capital_word_frequency(r, kw, p):
    return _compare(len(capital_words(r)), kw, "capital_relation", "capital_frequency")


def _english_capital(r, kw, p):
    return r.isupper() and _is_language(r, "en")


def _english_lowercase(r, kw, p):
    return r.islower() and _is_language(r, "en")


def _no_comma(r, kw, p):
    return "," not in r


INSTRUCTIONS: dict[str, Checker] = {
    "keywords:existence": _keywords_exist,
    "keywords:frequency": _keyword_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _number_highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "punctuation:no_comma": _no_comma,
}


# ------------------------------------------------------------------------------------------- their arguments


def _count(low: int = 0):
    def check(v):
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # a table with missing values stores counts as floats (300.0)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"must be an integer >= {low}, got {v!r}")
        return v
    return check


def _relation(v):
    if v not in _RELATIONS:
        raise ValueError(f"must be one of {_RELATIONS}, got {v!r}")
    return v


def _text(v):
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v


def _char(v):
    if not isinstance(v, str) or len(v.strip()) != 1:
        raise ValueError(f"must be a single non-whitespace character, got {v!r}")
    return v


def _words(v):
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(w, str) and w.strip() for w in v):
        raise ValueError(f"must be a non-empty list of non-empty strings, got {v!r}")
    return list(v)


# Each instruction's arguments (the arguments of Google's ``build_description``) and their checks. All are
# required: where Google's code draws a missing one at random, a grader must not.
KWARGS: dict[str, dict[str, Callable]] = {
    "keywords:existence": {"keywords": _words},
    "keywords:frequency": {"keyword": _text, "frequency": _count(), "relation": _relation},
    "keywords:forbidden_words": {"forbidden_words": _words},
    "keywords:letter_frequency": {"letter": _char, "let_frequency": _count(), "let_relation": _relation},
    "language:response_language": {"language": _text},
    "length_constraints:number_sentences": {"num_sentences": _count(), "relation": _relation},
    "length_constraints:number_paragraphs": {"num_paragraphs": _count(1)},
    "length_constraints:number_words": {"num_words": _count(), "relation": _relation},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": _count(1), "nth_paragraph": _count(1),
                                                    "first_word": _text},
    "detectable_content:number_placeholders": {"num_placeholders": _count()},
    "detectable_content:postscript": {"postscript_marker": _text},
    "detectable_format:number_bullet_lists": {"num_bullets": _count()},
    "detectable_format:constrained_response": {},
    "detectable_format:number_highlighted_sections": {"num_highlights": _count()},
    "detectable_format:multiple_sections": {"section_spliter": _text, "num_sections": _count()},
    "detectable_format:json_format": {},
    "detectable_format:title": {},
    "combination:two_responses": {},
    "combination:repeat_prompt": {"prompt_to_repeat": _text},
    "startend:end_checker": {"end_phrase": _text},
    "startend:quotation": {},
    "change_case:capital_word_frequency": {"capital_frequency": _count(), "capital_relation": _relation},
    "change_case:english_capital": {},
    "change_case:english_lowercase": {},
    "punctuation:no_comma": {},
}


def check_instructions(ids, kwargs) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """A row's ``instruction_id_list`` and ``kwargs`` (a list of objects, or that list as JSON text, as some
    copies of the data store it) checked against :data:`KWARGS`, as tuples with ``None`` values dropped (the
    Hugging Face copy fills every unused key with ``None``) and integral floats made integers. An unknown
    instruction id, a count of objects other than one per instruction, a missing, mistyped, out-of-range or
    unexpected argument is a ``ValueError`` naming the instruction and the key.

    >>> check_instructions(["startend:end_checker"], [{"end_phrase": "Bye.", "keywords": None}])
    (('startend:end_checker',), ({'end_phrase': 'Bye.'},))
    >>> check_instructions(["length_constraints:number_words"], [{"num_words": -1, "relation": "less than"}])
    Traceback (most recent call last):
    ...
    ValueError: length_constraints:number_words: argument 'num_words' must be an integer >= 0, got -1
    """
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"kwargs is no valid JSON ({e.msg})") from None
    if isinstance(ids, str) or not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(f"instruction_id_list must be a non-empty list of ids, got {ids!r}")
    unknown = [i for i in ids if i not in INSTRUCTIONS]
    if unknown:
        raise ValueError(f"unknown IFEval instruction id(s) {', '.join(map(str, unknown))}: no checker")
    if not isinstance(kwargs, (list, tuple)) or not all(isinstance(k, Mapping) for k in kwargs):
        raise ValueError(f"kwargs must be a list of objects (one per instruction), got {kwargs!r}")
    if len(kwargs) != len(ids):
        raise ValueError(f"{len(kwargs)} kwargs for {len(ids)} instructions")
    clean = []
    for iid, kw in zip(ids, kwargs):
        spec, out = KWARGS[iid], {}
        for key, value in kw.items():
            if value is None:
                continue
            if key not in spec:
                raise ValueError(f"{iid}: unexpected argument {key!r} (it takes {sorted(spec) or 'none'})")
            try:
                out[key] = spec[key](value)
            except ValueError as e:
                raise ValueError(f"{iid}: argument {key!r} {e}") from None
        missing = [k for k in spec if k not in out]
        if missing:
            raise ValueError(f"{iid}: missing argument(s) {', '.join(map(repr, missing))}")
        if iid == "length_constraints:nth_paragraph_first_word" and out["nth_paragraph"] > out["num_paragraphs"]:
            raise ValueError(f"{iid}: argument 'nth_paragraph' {out['nth_paragraph']} is beyond num_paragraphs "
                             f"{out['num_paragraphs']}")
        clean.append(out)
    return tuple(ids), tuple(clean)

# ------------------------------------------------------------------------------------------ data and grading


@dataclass(frozen=True)
class IFEvalItem:
    """One IFEval prompt: its instructions and each one's arguments (``None`` values dropped)."""

    key: int
    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict, ...]


def _parse_row(line: str, need_key: bool = True, lineno: int = 0) -> IFEvalItem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError("a row must be a JSON object")
    fields = ("key", "prompt", "instruction_id_list", "kwargs") if need_key else ("prompt", "instruction_id_list",
                                                                                 "kwargs")
    missing = [k for k in fields if k not in row]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    key, prompt = row.get("key", lineno), row["prompt"]
    if isinstance(key, bool) or not isinstance(key, int):
        raise ValueError(f"key must be an integer, got {key!r}")
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError("instruction_id_list must be a non-empty list of strings")
    ids, clean = check_instructions(ids, kwargs)
    return IFEvalItem(key, prompt, ids, clean)


def _read_rows(path: str | Path, limit: int | None, need_key: bool, what: str) -> list[IFEvalItem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    items: list[IFEvalItem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                items.append(_parse_row(line, need_key, lineno))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad {what} row: {e}") from None
    return items


def load_ifeval(path: str | Path, limit: int | None = None) -> list[IFEvalItem]:
    """The IFEval rows of ``path`` (Google's ``input_data.jsonl``), the first ``limit`` of them if given; each
    row's instructions checked by :func:`check_instructions`."""
    return _read_rows(path, limit, True, "IFEval")


def read_if_prompts(path: str | Path) -> list[IFEvalItem]:
    """Instruction-following prompts in IFEval's schema (``prompt``, ``instruction_id_list``, ``kwargs``; ``key``
    optional, the line number when absent), each row checked by :func:`check_instructions`; a bad row is a
    ``ValueError`` naming the file and the line."""
    return _read_rows(path, None, False, "instruction-following prompt")


def _loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(c.replace("*", "") for c in cut)]


def grade(item: IFEvalItem, response: str) -> dict[str, list[bool]]:
    """``{"strict": [...], "loose": [...]}``: whether ``response`` follows each of ``item``'s instructions."""
    variants = _loose_variants(response)
    strict, loose = [], []
    for iid, kwargs in zip(item.instruction_ids, item.kwargs):
        check = INSTRUCTIONS[iid]
        kw = {k: v for k, v in kwargs.items() if v is not None}
        strict.append(bool(response.strip()) and bool(check(response, kw, item.prompt)))
        loose.append(any(v.strip() and check(v, kw, item.prompt) for v in variants))
    return {"strict": strict, "loose": loose}


def score(graded: list[dict]) -> dict:
    """Prompt-level (all of a prompt's instructions followed) and instruction-level accuracy, strict and loose;
    0.0 for an empty list.

    >>> s = score([{"strict": [True, False], "loose": [True, True]}, {"strict": [True], "loose": [True]}])
    >>> s["prompt_level_strict"], s["prompt_level_loose"], s["instruction_level_strict"], s["n_instructions"]
    (0.5, 1.0, 0.6666666666666666, 3)
    """
    n_prompts = len(graded)
    n_instructions = sum(len(g["strict"]) for g in graded)
    out: dict = {}
    for mode in ("strict", "loose"):
        out[f"prompt_level_{mode}"] = sum(all(g[mode]) for g in graded) / n_prompts if n_prompts else 0.0
        followed = sum(sum(map(bool, g[mode])) for g in graded)
        out[f"instruction_level_{mode}"] = followed / n_instructions if n_instructions else 0.0
    return {**out, "n_prompts": n_prompts, "n_instructions": n_instructions}


# ------------------------------------------------------------------------------------------------ as rewards


def _instructions(ids, kwargs) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    """A row's instructions for a reward, checked by :func:`check_instructions`: an unknown id or a bad argument
    is an error (the reward runner counts it 0 and logs it), never a pass."""
    try:
        return check_instructions(ids, kwargs)
    except ValueError as e:
        raise ValueError(f"bad IFEval instructions, so no reward: {e}") from None


def _user_text(messages) -> str:
    if isinstance(messages, str):
        return messages
    users = [m.get("content", "") for m in messages or () if m.get("role") == "user"]
    return users[-1] if users else ""


def _graded(completions, instruction_id_list, kwargs, prompts, mode: str) -> list[list[bool] | None]:
    """Per completion, whether its answer after the think block follows each instruction of its row (an unclosed
    or malformed think block follows none); None for a row without instructions (nothing to follow: the
    rewards leave it unscored, as TRL's reward functions do with a sample they do not apply to)."""
    prompts = prompts if prompts is not None else [None] * len(completions)
    out = []
    for c, ids, kws, p in zip(completions, instruction_id_list, kwargs, prompts, strict=True):
        if not ids and not kws:
            out.append(None)
            continue
        ids, kws = _instructions(ids, kws)
        answer = final_answer(completion_text(c))
        out.append(grade(IFEvalItem(0, _user_text(p), ids, kws), answer)[mode] if answer is not None
                   else [False] * len(ids))
    return out


def _followed(completions, instruction_id_list, kwargs, prompts, mode: str) -> list[float | None]:
    return [None if g is None else 1.0 if all(g) else 0.0
            for g in _graded(completions, instruction_id_list, kwargs, prompts, mode)]


def ifeval_share(completions, instruction_id_list, kwargs, prompts=None, **columns) -> list[float | None]:
    """The reward: the share of its row's instructions that the answer after the think block follows, strictly
    (IFEval's instruction-level strict accuracy, per prompt); partial credit where :func:`ifeval_strict` is
    all or nothing. A malformed think block follows nothing; bad instructions are a ValueError; a row without
    instructions is not scored (None).

    >>> ids, kw = [["punctuation:no_comma", "startend:quotation", "detectable_format:title"]] * 3, [[{}, {}, {}]] * 3
    >>> completions = ['<think>\\nHmm, ok\\n</think>\\n\\n"fine"', '"Yes, fine"', '<think>']
    >>> [round(x, 3) for x in ifeval_share(completions, ids, kw)]
    [0.667, 0.333, 0.0]
    """
    return [None if g is None else sum(g) / len(g)
            for g in _graded(completions, instruction_id_list, kwargs, prompts, "strict")]


def ifeval_strict(completions, instruction_id_list, kwargs, prompts=None, **columns) -> list[float | None]:
    """The reward: 1.0 when the answer after the think block follows every instruction of its row, strictly
    (IFEval's prompt-level strict accuracy, the number evaluation reports as pass@1); all or nothing. Columns
    as in IFEval's data: ``instruction_id_list`` and ``kwargs``. A malformed think block follows nothing; an
    unknown instruction id is a ValueError (the reward fails closed, loudly); a row without instructions (a
    plain task prompt among instruction prompts) is not scored: None.

    >>> ids, kw = [["punctuation:no_comma", "startend:quotation"]] * 3, [[{}, {}]] * 3
    >>> ifeval_strict(['<think>\\nHmm, ok\\n</think>\\n\\n"all fine"', '"Yes, fine"', '<think>"fine"'], ids, kw)
    [1.0, 0.0, 0.0]
    >>> ifeval_strict(["4", "4"], [["punctuation:no_comma"], []], [[{}], []])
    [1.0, None]
    """
    return _followed(completions, instruction_id_list, kwargs, prompts, "strict")


def ifeval_loose(completions, instruction_id_list, kwargs, prompts=None, **columns) -> list[float | None]:
    """As :func:`ifeval_strict`, with IFEval's loose variants (the response without its first or last line,
    or without ``*``: any one that follows counts).

    >>> ids, kw = [["startend:end_checker"]] * 2, [[{"end_phrase": "Is there anything else I can help with?"}]] * 2
    >>> ifeval_loose(["Sure.\\nIs there anything else I can help with?\\n**Done**", "Sure."], ids, kw)
    [1.0, 0.0]
    """
    return _followed(completions, instruction_id_list, kwargs, prompts, "loose")
