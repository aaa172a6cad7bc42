"""Reasoning toggle: chat template, tokenizer setup and response parsing.

Follows Llama-Nemotron (arXiv 2505.00949) section 4.1 / model card: one model
serves both modes, selected by the system prompt ``detailed thinking on`` or
``detailed thinking off``. "On" responses are ``<think>\\n...\\n</think>\\n\\n``
followed by the answer; "off" responses are the answer alone. The model card's
remedy for an off-mode model that still thinks is to prefill an empty think
block ``<think>\\n</think>\\n\\n``. The template reproduces the Llama-3 layout
of Llama-3.3-Nemotron-Super-49B: ``bos``, an always-present system header,
``<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>`` turns, and
earlier assistant turns with their reasoning removed
(``content.split('</think>')[-1].lstrip()``).

Departures from the published template:

* ``enable_thinking`` (True/False) may be passed to ``apply_chat_template``;
  it writes the toggle line and replaces a toggle line already leading the
  user's system message. Without it the system message is kept verbatim, so
  the original ``{"role": "system", "content": "detailed thinking on"}`` works.
* The final message keeps its reasoning when it is an assistant turn (it is
  the SFT target); only earlier assistant turns are stripped.
* Assistant content plus ``<|eot_id|>`` is wrapped in ``{% generation %}`` so
  ``return_assistant_tokens_mask=True`` yields an assistant-only loss mask.
* ``prefill_empty_think=True`` with ``add_generation_prompt=True`` appends the
  model card's empty think block, in off mode only.
* Message content is rendered verbatim (no Jinja ``trim``).
* :func:`install_chat_template` adds the Llama-3 header tokens and the think
  tags to tokenizers that lack them (e.g. a small non-Llama student).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SYSTEM_ON = "detailed thinking on"
SYSTEM_OFF = "detailed thinking off"
EOT = "<|eot_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOT,
)
EMPTY_THINK = f"{THINK_OPEN}\n{THINK_CLOSE}\n\n"

__all__ = [
    "CHAT_TEMPLATE",
    "CHATML_END",
    "CHATML_TEMPLATE",
    "EMPTY_THINK",
    "EOT",
    "SPECIAL_TOKENS",
    "SYSTEM_OFF",
    "SYSTEM_ON",
    "THINK_CLOSE",
    "THINK_OPEN",
    "ParsedResponse",
    "format_ok",
    "has_toggle",
    "install_chat_template",
    "messages_for",
    "parse_response",
    "stop_token_ids",
    "strip_reasoning",
    "template_layout",
]

# The toggle's system turn, shared by both layouts: ``user_system`` (the user's system message), ``loop_messages``
# (the rest), ``toggle`` (the toggle line in force, or '') and ``system_content`` (what the system turn says).
_TOGGLE_SYSTEM: str = """{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set user_system = messages[0]['content'] if messages[0]['content'] is string else '' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set user_system = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- set sys_parts = user_system.lstrip().split('\\n', 1) -%}
{%- set legacy = sys_parts[0].strip() -%}
{%- if legacy != 'detailed thinking on' and legacy != 'detailed thinking off' -%}
    {%- set legacy = '' -%}
{%- endif -%}
{%- if enable_thinking is defined and enable_thinking is not none -%}
    {%- set toggle = 'detailed thinking on' if enable_thinking else 'detailed thinking off' -%}
    {%- if legacy -%}
        {%- set body = sys_parts[1].lstrip() if sys_parts | length > 1 else '' -%}
    {%- else -%}
        {%- set body = user_system -%}
    {%- endif -%}
    {%- set system_content = toggle + ('\\n\\n' + body if body else '') -%}
{%- else -%}
    {%- set toggle = legacy -%}
    {%- set system_content = user_system -%}
{%- endif -%}
"""

# Every tag uses whitespace control, so only the emitted expressions reach the
# output. A "toggle line" is the first line of the system message when it is
# exactly SYSTEM_ON or SYSTEM_OFF.
CHAT_TEMPLATE: str = ("""
{%- if bos_token is defined and bos_token is not none -%}{{- bos_token -}}{%- endif -%}
""" + _TOGGLE_SYSTEM + """{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_content + '<|eot_id|>' -}}
{%- for message in loop_messages -%}
    {%- set content = message['content'] if message['content'] is string else '' -%}
    {%- if message['role'] == 'assistant' -%}
        {%- if not loop.last and '</think>' in content -%}
            {%- set content = content.split('</think>')[-1].lstrip() -%}
        {%- endif -%}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {%- generation -%}{{- content + '<|eot_id|>' -}}{%- endgeneration -%}
    {%- else -%}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content + '<|eot_id|>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
    {%- if prefill_empty_think is defined and prefill_empty_think and toggle == 'detailed thinking off' -%}
        {{- '<think>\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}
""").strip()


# The same toggle in ChatML, the layout of SmolLM2, Qwen and many small instruct models (``<|im_start|>ROLE\n
# CONTENT<|im_end|>\n``): their own template with the toggle added. The system turn appears when it has content
# (the toggle line, a user's system message or both).
CHATML_TEMPLATE: str = (_TOGGLE_SYSTEM + """{%- if system_content -%}
    {{- '<|im_start|>system\\n' + system_content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set content = message['content'] if message['content'] is string else '' -%}
    {%- if message['role'] == 'assistant' -%}
        {%- if not loop.last and '</think>' in content -%}
            {%- set content = content.split('</think>')[-1].lstrip() -%}
        {%- endif -%}
        {{- '<|im_start|>assistant\\n' -}}
        {%- generation -%}{{- content + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if prefill_empty_think is defined and prefill_empty_think and toggle == 'detailed thinking off' -%}
        {{- '<think>\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}
""").strip()
CHATML_END = "<|im_end|>"


def template_layout(tokenizer: Any) -> str:
    """``"chatml"`` when the tokenizer's own chat template is ChatML and ``<|im_start|>`` / ``<|im_end|>`` are
    single tokens of it, else ``"llama3"`` (the nano world's, and Llama-3's)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "<|im_start|>" in template and all(
            _is_single_token(tokenizer, t) for t in ("<|im_start|>", CHATML_END)):
        return "chatml"
    return "llama3"


def _is_single_token(tokenizer: Any, token: str) -> bool:
    """True when ``token`` is in the vocabulary and encodes to exactly its own id."""
    if token not in tokenizer.get_vocab():
        return False
    ids = tokenizer.encode(token, add_special_tokens=False)
    return list(ids) == [tokenizer.convert_tokens_to_ids(token)]


def _add_special(tokenizer: Any, tokens: list[str]) -> None:
    """Register ``tokens`` as extra special tokens without dropping existing ones."""
    from tokenizers import AddedToken

    added = [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in tokens]
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    # transformers 5 renamed ``additional_special_tokens`` -> ``extra_special_tokens``.
    if "replace_extra_special_tokens" in params:
        tokenizer.add_special_tokens({"extra_special_tokens": added}, replace_extra_special_tokens=False)
    else:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": added}, replace_additional_special_tokens=False
        )


def install_chat_template(tokenizer: Any, add_missing_tokens: bool = True, layout: str = "auto") -> list[str]:
    """Set the toggle's chat template on a Hugging Face tokenizer; add missing tokens.

    ``layout``: ``"llama3"`` (:data:`CHAT_TEMPLATE`), ``"chatml"`` (:data:`CHATML_TEMPLATE`) or ``"auto"``: the
    layout of the tokenizer's own template (:func:`template_layout`), so that a ChatML model keeps its turns and
    gains the toggle. A ChatML model gets no new tokens (its turn tokens exist; the think tags stay text of a few
    tokens each), so its vocabulary, and every engine's view of it, is unchanged. The rest of this paragraph is
    about the Llama-3 layout.

    Header tokens (:data:`SPECIAL_TOKENS`) missing as single tokens are added
    as special tokens; ``<think>``/``</think>`` are added as normal tokens, so
    ``decode(..., skip_special_tokens=True)`` keeps the reasoning tags. The eos
    token is left unchanged; pass :func:`stop_token_ids` to ``generate`` so
    ``<|eot_id|>`` also stops generation.

    Returns the token strings that were added (empty when nothing was). When
    the list is non-empty the caller must call
    ``model.resize_token_embeddings(len(tokenizer))``.
    """
    if layout == "auto":
        layout = template_layout(tokenizer)
    if layout not in ("llama3", "chatml"):
        raise ValueError(f"layout={layout!r}: expected 'auto', 'llama3' or 'chatml'")
    tokenizer.chat_template = CHATML_TEMPLATE if layout == "chatml" else CHAT_TEMPLATE
    if not add_missing_tokens or layout == "chatml":
        return []
    missing_special = [t for t in SPECIAL_TOKENS if not _is_single_token(tokenizer, t)]
    missing_think = [t for t in (THINK_OPEN, THINK_CLOSE) if not _is_single_token(tokenizer, t)]
    if missing_special:
        _add_special(tokenizer, missing_special)
    if missing_think:
        from tokenizers import AddedToken

        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False) for t in missing_think]
        )
    special = set(tokenizer.all_special_tokens)
    for tag in (THINK_OPEN, THINK_CLOSE):
        if tag in special:
            warnings.warn(
                f"{tag!r} is a special token of this tokenizer; skip_special_tokens=True will drop it",
                stacklevel=2,
            )
    return missing_special + missing_think


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos, ``<|eot_id|>`` and ``<|im_end|>`` (those in
    its vocabulary).

    Pass as ``model.generate(..., eos_token_id=stop_token_ids(tokenizer))``.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    for end in (EOT, CHATML_END):
        if end in tokenizer.get_vocab():
            eot = int(tokenizer.convert_tokens_to_ids(end))
            if eot not in ids:
                ids.append(eot)
    return ids


def has_toggle(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template obeys the reasoning toggle: a prompt rendered with
    ``enable_thinking=True`` differs from one rendered with ``False`` (a parent's own template, which ignores
    the flag, has one mode only).

    >>> from transformers import PreTrainedTokenizerFast
    >>> from tokenizers import Tokenizer, models
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    >>> tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    >>> has_toggle(tok)
    False
    >>> tok.chat_template = CHAT_TEMPLATE
    >>> has_toggle(tok)
    True
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    messages = [{"role": "user", "content": "2+2?"}]
    on, off = (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=flag) for flag in (True, False))
    return on != off


def messages_for(prompt: str, thinking: bool | None, response: str | None = None) -> list[dict[str, str]]:
    """Build a conversation: toggle system message (unless ``thinking`` is None),
    the user ``prompt`` and, when given, the assistant ``response``."""
    messages: list[dict[str, str]] = []
    if thinking is not None:
        messages.append({"role": "system", "content": SYSTEM_ON if thinking else SYSTEM_OFF})
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


WELL_FORMED = frozenset({"think", "empty_think", "plain"})
MALFORMED = frozenset({"unclosed", "nested", "repeated", "orphan_close", "text_before_think"})


@dataclass(frozen=True)
class ParsedResponse:
    """A response split into reasoning and answer.

    ``form`` is one of ``think``, ``empty_think``, ``plain`` (well formed) or
    ``unclosed``, ``nested``, ``repeated``, ``orphan_close``,
    ``text_before_think`` (malformed: ``reasoning`` and ``answer`` are None).
    """

    reasoning: str | None
    answer: str | None
    form: str

    @property
    def well_formed(self) -> bool:
        """True for ``think``, ``empty_think`` and ``plain``."""
        return self.form in WELL_FORMED


def _tags(text: str) -> list[tuple[int, str]]:
    """Positions and kinds of every think tag in ``text``, in order."""
    found: list[tuple[int, str]] = []
    for tag in (THINK_OPEN, THINK_CLOSE):
        start = text.find(tag)
        while start != -1:
            found.append((start, tag))
            start = text.find(tag, start + len(tag))
    return sorted(found)


def parse_response(text: str) -> ParsedResponse:
    """Classify a response and split it into reasoning and answer.

    Malformed traces never yield an answer. Precedence when several faults
    occur: ``nested``/``orphan_close`` (first found scanning left to right),
    then ``unclosed``, ``repeated``, ``text_before_think``.

    >>> parse_response("<think>\\n2+2 is 4.\\n</think>\\n\\n4")
    ParsedResponse(reasoning='2+2 is 4.', answer='4', form='think')
    >>> parse_response("<think>\\n</think>\\n\\n4")
    ParsedResponse(reasoning='', answer='4', form='empty_think')
    >>> parse_response(" 4 ")
    ParsedResponse(reasoning=None, answer='4', form='plain')
    >>> parse_response("<think>2+2 is").form
    'unclosed'
    >>> parse_response("<think>a<think>b</think></think>c").form
    'nested'
    >>> parse_response("<think>a</think>b<think>c</think>d").form
    'repeated'
    >>> parse_response("a</think>b").form
    'orphan_close'
    >>> parse_response("Sure. <think>a</think>b").answer is None
    True
    """
    tags = _tags(text)
    if not tags:
        return ParsedResponse(reasoning=None, answer=text.strip(), form="plain")
    depth = 0
    pairs = 0
    for _, tag in tags:
        if tag == THINK_OPEN:
            if depth:
                return ParsedResponse(None, None, "nested")
            depth = 1
        else:
            if not depth:
                return ParsedResponse(None, None, "orphan_close")
            depth = 0
            pairs += 1
    if depth:
        return ParsedResponse(None, None, "unclosed")
    if pairs > 1:
        return ParsedResponse(None, None, "repeated")
    (open_at, _), (close_at, _) = tags
    if text[:open_at].strip():
        return ParsedResponse(None, None, "text_before_think")
    reasoning = text[open_at + len(THINK_OPEN) : close_at].strip()
    answer = text[close_at + len(THINK_CLOSE) :].strip()
    return ParsedResponse(reasoning, answer, "think" if reasoning else "empty_think")


def strip_reasoning(text: str) -> str | None:
    """The answer part of ``text``, or None when the trace is malformed."""
    return parse_response(text).answer


def format_ok(text: str, thinking: bool, *, allow_empty_think: bool = False) -> bool:
    """GRPO format reward rule for the requested mode.

    ``thinking=True`` needs a ``think`` form with non-empty reasoning;
    ``thinking=False`` needs a ``plain`` answer without any think tags (an
    ``empty_think`` block passes only with ``allow_empty_think=True``).

    >>> format_ok("<think>\\nstep\\n</think>\\n\\n4", thinking=True)
    True
    >>> format_ok("<think>\\n</think>\\n\\n4", thinking=True)
    False
    >>> format_ok("4", thinking=False)
    True
    >>> format_ok("<think>\\n</think>\\n\\n4", thinking=False)
    False
    >>> format_ok("<think>\\n</think>\\n\\n4", thinking=False, allow_empty_think=True)
    True
    """
    form = parse_response(text).form
    if thinking:
        return form == "think"
    return form == "plain" or (allow_empty_think and form == "empty_think")
