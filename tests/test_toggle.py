"""Tests for thinkfast.toggle: chat template, tokenizer setup, response parsing."""

from __future__ import annotations

import doctest
import string

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from thinkfast import toggle  # noqa: E402
from thinkfast.toggle import (  # noqa: E402
    SPECIAL_TOKENS,
    SYSTEM_OFF,
    SYSTEM_ON,
    THINK_CLOSE,
    THINK_OPEN,
    ParsedResponse,
    format_ok,
    install_chat_template,
    messages_for,
    parse_response,
    stop_token_ids,
    strip_reasoning,
)

SYS = "<|start_header_id|>system<|end_header_id|>\n\n"
USER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASST = "<|start_header_id|>assistant<|end_header_id|>\n\n"
EOT = "<|eot_id|>"
ADDED = [*SPECIAL_TOKENS, THINK_OPEN, THINK_CLOSE]


def _char_tokenizer(bos: str | None = "<s>") -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII (which includes '\\n')."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(set(string.printable)):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    tokenizer = _char_tokenizer()
    assert install_chat_template(tokenizer) == ADDED
    return tokenizer


def render(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]], **kwargs: object) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


HISTORY = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"},
]
HISTORY_TAIL = f"{USER}q1{EOT}{ASST}A1{EOT}{USER}q2{EOT}{ASST}<think>\nr2\n</think>\n\nA2{EOT}"


# ---------------------------------------------------------------- install


def test_install_adds_missing_tokens_once() -> None:
    tokenizer = _char_tokenizer()
    base = len(tokenizer)
    assert install_chat_template(tokenizer) == ADDED
    assert len(tokenizer) == base + 6
    assert tokenizer.chat_template == toggle.CHAT_TEMPLATE
    assert install_chat_template(tokenizer) == []
    assert len(tokenizer) == base + 6
    for special in SPECIAL_TOKENS:
        assert special in tokenizer.all_special_tokens
    assert THINK_OPEN not in tokenizer.all_special_tokens
    assert THINK_CLOSE not in tokenizer.all_special_tokens
    assert tokenizer.eos_token == "</s>"
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)]


def test_install_without_adding_tokens() -> None:
    tokenizer = _char_tokenizer()
    base = len(tokenizer)
    assert install_chat_template(tokenizer, add_missing_tokens=False) == []
    assert len(tokenizer) == base
    assert tokenizer.chat_template == toggle.CHAT_TEMPLATE
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


# ---------------------------------------------------------------- rendering


def test_toggle_variable(tok: PreTrainedTokenizerFast) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert render(tok, msgs, enable_thinking=True) == f"<s>{SYS}{SYSTEM_ON}{EOT}{USER}hi{EOT}"
    assert render(tok, msgs, enable_thinking=False) == f"<s>{SYS}{SYSTEM_OFF}{EOT}{USER}hi{EOT}"
    # Absent (or None): the system header is still there, with empty content.
    assert render(tok, msgs) == f"<s>{SYS}{EOT}{USER}hi{EOT}"
    assert render(tok, msgs, enable_thinking=None) == f"<s>{SYS}{EOT}{USER}hi{EOT}"


def test_no_bos_when_tokenizer_has_none() -> None:
    tokenizer = _char_tokenizer(bos=None)
    install_chat_template(tokenizer)
    assert render(tokenizer, [{"role": "user", "content": "hi"}]) == f"{SYS}{EOT}{USER}hi{EOT}"


def test_user_system_combined_with_toggle(tok: PreTrainedTokenizerFast) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render(tok, msgs, enable_thinking=True) == f"<s>{SYS}{SYSTEM_ON}\n\nBe brief.{EOT}{USER}hi{EOT}"
    assert render(tok, msgs, enable_thinking=False) == f"<s>{SYS}{SYSTEM_OFF}\n\nBe brief.{EOT}{USER}hi{EOT}"
    assert render(tok, msgs) == f"<s>{SYS}Be brief.{EOT}{USER}hi{EOT}"


def test_legacy_system_toggle(tok: PreTrainedTokenizerFast) -> None:
    on = messages_for("hi", thinking=True)
    assert on == [{"role": "system", "content": SYSTEM_ON}, {"role": "user", "content": "hi"}]
    assert render(tok, on) == f"<s>{SYS}{SYSTEM_ON}{EOT}{USER}hi{EOT}"
    # enable_thinking overrides a leading toggle line instead of stacking a second one.
    assert render(tok, on, enable_thinking=False) == f"<s>{SYS}{SYSTEM_OFF}{EOT}{USER}hi{EOT}"
    combined = [{"role": "system", "content": f"{SYSTEM_ON}\n\nBe brief."}, {"role": "user", "content": "hi"}]
    assert render(tok, combined, enable_thinking=False) == f"<s>{SYS}{SYSTEM_OFF}\n\nBe brief.{EOT}{USER}hi{EOT}"


def test_history_strips_earlier_reasoning_only(tok: PreTrainedTokenizerFast) -> None:
    assert render(tok, HISTORY, enable_thinking=True) == f"<s>{SYS}{SYSTEM_ON}{EOT}{HISTORY_TAIL}"
    # When the last message is a user turn, every assistant turn is history.
    assert render(tok, HISTORY[:3]) == f"<s>{SYS}{EOT}{USER}q1{EOT}{ASST}A1{EOT}{USER}q2{EOT}"


def test_other_roles(tok: PreTrainedTokenizerFast) -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "tool", "content": "42"}]
    expected = f"<s>{SYS}{EOT}{USER}q{EOT}<|start_header_id|>tool<|end_header_id|>\n\n42{EOT}"
    assert render(tok, msgs) == expected


def test_generation_prompt_and_prefill(tok: PreTrainedTokenizerFast) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    off = f"<s>{SYS}{SYSTEM_OFF}{EOT}{USER}hi{EOT}{ASST}"
    on = f"<s>{SYS}{SYSTEM_ON}{EOT}{USER}hi{EOT}{ASST}"
    empty = "<think>\n</think>\n\n"
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=False) == off
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=False, prefill_empty_think=True) == off + empty
    assert render(tok, msgs, add_generation_prompt=True, enable_thinking=True, prefill_empty_think=True) == on
    # Mode resolved from the legacy system message.
    legacy_off = messages_for("hi", thinking=False)
    assert render(tok, legacy_off, add_generation_prompt=True, prefill_empty_think=True) == off + empty
    legacy_on = messages_for("hi", thinking=True)
    assert render(tok, legacy_on, add_generation_prompt=True, prefill_empty_think=True) == on
    # No toggle at all: no prefill.
    assert render(tok, msgs, add_generation_prompt=True, prefill_empty_think=True) == f"<s>{SYS}{EOT}{USER}hi{EOT}{ASST}"


# ---------------------------------------------------------------- tokenized


def test_tags_and_headers_are_single_tokens(tok: PreTrainedTokenizerFast) -> None:
    for token in ADDED:
        assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]
    ids = tok.apply_chat_template(messages_for("hi", True, "<think>\nr\n</think>\n\nA"), tokenize=True, return_dict=False)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:4] == ["<s>", "<|start_header_id|>", "s", "y"]
    assert pieces[-9:] == ["<think>", "\n", "r", "\n", "</think>", "\n", "\n", "A", EOT]


def test_decode_keeps_think_tags(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(f"<s>{ASST}<think>\nr\n</think>\n\nA{EOT}", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n\n<think>\nr\n</think>\n\nA"
    assert tok.decode(ids) == f"<s>{ASST}<think>\nr\n</think>\n\nA{EOT}"


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_assistant_mask(tok: PreTrainedTokenizerFast) -> None:
    out = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *HISTORY],
        enable_thinking=True,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    decoded = [tok.decode(ids[a:b]) for a, b in _spans(mask)]
    assert decoded == [f"A1{EOT}", f"<think>\nr2\n</think>\n\nA2{EOT}"]
    assert tok.decode(ids) == f"<s>{SYS}{SYSTEM_ON}\n\nBe brief.{EOT}{HISTORY_TAIL}"


# ---------------------------------------------------------------- parsing

PARSE_CASES = [
    ("<think>\nstep 1\n</think>\n\n42", ParsedResponse("step 1", "42", "think")),
    ("  \n<think>r</think>a", ParsedResponse("r", "a", "think")),
    ("<think>\n</think>\n\n42", ParsedResponse("", "42", "empty_think")),
    ("<think></think>", ParsedResponse("", "", "empty_think")),
    ("  42\n", ParsedResponse(None, "42", "plain")),
    ("<think>\nstep 1 ... 42", ParsedResponse(None, None, "unclosed")),
    ("<think>a</think>b<think>c", ParsedResponse(None, None, "unclosed")),
    ("<think>a<think>b</think>c</think>42", ParsedResponse(None, None, "nested")),
    ("<think>a</think>b<think>c</think>42", ParsedResponse(None, None, "repeated")),
    ("step 1</think>\n\n42", ParsedResponse(None, None, "orphan_close")),
    ("<think>a</think>42</think>", ParsedResponse(None, None, "orphan_close")),
    ("Sure! <think>a</think>42", ParsedResponse(None, None, "text_before_think")),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_response(text: str, expected: ParsedResponse) -> None:
    parsed = parse_response(text)
    assert parsed == expected
    assert parsed.well_formed is (expected.form in {"think", "empty_think", "plain"})
    assert strip_reasoning(text) == expected.answer


def test_strip_reasoning() -> None:
    assert strip_reasoning("<think>\nr\n</think>\n\nThe answer is 4.") == "The answer is 4."
    assert strip_reasoning("The answer is 4.") == "The answer is 4."
    assert strip_reasoning("<think>\nr\n") is None


FORMAT_TABLE = [
    # text, thinking, allow_empty_think, expected
    ("<think>\nr\n</think>\n\n4", True, False, True),
    ("<think>\nr\n</think>\n\n4", False, False, False),
    ("<think>\nr\n</think>\n\n4", False, True, False),
    ("<think>\n</think>\n\n4", True, False, False),
    ("<think>\n</think>\n\n4", True, True, False),
    ("<think>\n</think>\n\n4", False, False, False),
    ("<think>\n</think>\n\n4", False, True, True),
    ("4", True, False, False),
    ("4", False, False, True),
    ("4", False, True, True),
    ("<think>\nr", True, False, False),
    ("<think>\nr", False, True, False),
    ("r</think>4", False, False, False),
    ("<think>a</think><think>b</think>4", True, False, False),
]


@pytest.mark.parametrize(("text", "thinking", "allow", "expected"), FORMAT_TABLE)
def test_format_ok(text: str, thinking: bool, allow: bool, expected: bool) -> None:
    assert format_ok(text, thinking, allow_empty_think=allow) is expected


def test_doctests() -> None:
    result = doctest.testmod(toggle)
    assert result.attempted > 0
    assert result.failed == 0
