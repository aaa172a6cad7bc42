"""Request bodies of the OpenAI-compatible server (pydantic), and the pieces of text handling it needs.

Fields follow OpenAI's API reference (chat completions and legacy completions) plus the extensions vLLM
accepts that matter here: ``top_k``, ``chat_template_kwargs``, ``thinking_token_budget``; and thinkfast's
``max_thinking_tokens``. The last two are one thinking budget (:mod:`thinkfast.generation.budget`) under two names:
``max_thinking_tokens`` an integer >= 0, ``thinking_token_budget`` vLLM's field (an integer >= 0, or -1 for no
budget, as vLLM's ``SamplingParams`` takes it). A request may give either or both; both with different budgets is a
400 naming the two (:meth:`_Sampling.thinking_budget`; ``null`` is not giving one). Types are strict (``"5"`` is
not a number) and unknown fields are ignored, as OpenAI's server does. A field OpenAI has that we do not implement
(``logprobs``, ``tools``, ``echo``, ``response_format`` other than text, ...) is refused with a 400 naming it, never
silently ignored.

Every value must be one the engine can execute, or the request is a 400 naming the field: a ``seed`` fits in 64
bits (vLLM's range, -2**63 .. 2**63 - 1; the k-th of ``n`` samples uses seed + k, wrapped to 64 bits); text holds
no lone UTF-16 surrogates (JSON's ``"\ud800"``, which no tokenizer can encode); a ``user``, ``system`` or
``developer`` message has content (``null`` is for an assistant turn only, as in OpenAI's API);
``chat_template_kwargs.enable_thinking`` is a boolean. A ``temperature`` above 0 but under 0.01 samples at 0.01
and a ``top_p`` that rounds to 0 keeps the most likely token (vLLM's conventions; :mod:`thinkfast.generation`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..toggle import THINK_CLOSE, THINK_OPEN

__all__ = ["ChatCompletionRequest", "CompletionRequest", "UNSUPPORTED", "split_reasoning"]


INT64 = (-(2**63), 2**63 - 1)  # seeds (vLLM: torch.iinfo(torch.long))


def _unicode(text: str) -> str:
    """Refuse a lone UTF-16 surrogate (valid in JSON's escapes, not in Unicode text).

    >>> _unicode("ok")
    'ok'
    >>> _unicode("a\\ud800")
    Traceback (most recent call last):
    ...
    ValueError: contains a lone UTF-16 surrogate (U+D800) at character 1: text must be valid Unicode
    """
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            raise ValueError(f"contains a lone UTF-16 surrogate (U+{ord(ch):04X}) at character {i}: text must be "
                             "valid Unicode")
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content(cls, v, info: ValidationInfo):
        role = info.data.get("role")
        if v is None and role not in (None, "assistant"):
            raise ValueError(f"a {role} message needs content (a string or a list of text parts); null is for an "
                             "assistant turn only")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0: off
    n: int = Field(1, ge=1, le=16)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_thinking_tokens: int | None = Field(None, ge=0)
    thinking_token_budget: int | None = Field(None, ge=-1)  # vLLM's name for the same budget; -1: none
    skip_special_tokens: bool = True  # vLLM's extension: special tokens are left out of the text
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def thinking_budget(self) -> int | None:
        """The thinking budget in tokens (None: none) from ``max_thinking_tokens`` or vLLM's
        ``thinking_token_budget`` (-1: none); a ValueError naming both when they ask for different budgets.

        >>> CompletionRequest(prompt="hi", thinking_token_budget=4).thinking_budget()
        4
        >>> CompletionRequest(prompt="hi", thinking_token_budget=-1).thinking_budget()
        >>> CompletionRequest(prompt="hi", max_thinking_tokens=4, thinking_token_budget=4).thinking_budget()
        4
        >>> CompletionRequest(prompt="hi", max_thinking_tokens=4, thinking_token_budget=8).thinking_budget()
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: max_thinking_tokens (4) and thinking_token_budget (8) are the same thinking budget under two ...
        """
        vllm = None if self.thinking_token_budget == -1 else self.thinking_token_budget
        if None not in (self.max_thinking_tokens, self.thinking_token_budget) and vllm != self.max_thinking_tokens:
            raise ValueError(f"max_thinking_tokens ({self.max_thinking_tokens}) and thinking_token_budget "
                             f"({self.thinking_token_budget}) are the same thinking budget under two names "
                             "(thinkfast's and vLLM's): give one, or both equal")
        return self.max_thinking_tokens if self.max_thinking_tokens is not None else vllm


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        if v is not None and "enable_thinking" in v and not isinstance(v["enable_thinking"], bool):
            raise ValueError(f"enable_thinking must be true or false, not {v['enable_thinking']!r}")
        return v


class CompletionRequest(_Sampling):
    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# fields OpenAI defines that this server does not implement: refused (400), with the value that would be a no-op
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"])}


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a response so far, both stripped; reasoning None when there is no think block.

    Applied to a growing text, each part only grows (a stripped prefix is a prefix of the stripped whole), so a
    stream can send the difference; the parts of the whole text are what a non-streamed response returns. An
    unclosed block is all reasoning (vLLM's reasoning parsers do the same); text before a think block, or a
    second block, stays in the answer as written.

    >>> split_reasoning("<think>\\n2+2 is 4.\\n</think>\\n\\n4")
    ('2+2 is 4.', '4')
    >>> split_reasoning("<think>\\n2+2")
    ('2+2', '')
    >>> split_reasoning(" 4 ")
    (None, '4')
    """
    s = text.lstrip()
    if s.startswith(THINK_OPEN):
        body = s[len(THINK_OPEN) :]
        if THINK_CLOSE in body:
            reasoning, answer = body.split(THINK_CLOSE, 1)
            return reasoning.strip(), answer.strip()
        return body.strip(), ""
    if s and THINK_OPEN.startswith(s):  # a think tag still arriving in pieces
        return None, ""
    return None, text.strip()
