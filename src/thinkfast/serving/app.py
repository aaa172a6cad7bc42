"""An OpenAI-compatible HTTP server (FastAPI on uvicorn) over the continuous-batching engine.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, with
or without streaming (server-sent events, ``data: {...}`` chunks ending with ``data: [DONE]``, usage in a last
chunk when ``stream_options.include_usage``).

- The reasoning toggle: a system message ``detailed thinking on`` / ``off`` (Llama-Nemotron's convention), or
  ``chat_template_kwargs: {"enable_thinking": bool}`` (which wins), both handled by the model's chat template
  (:mod:`thinkfast.toggle`).
- ``max_thinking_tokens``, or vLLM's ``thinking_token_budget`` (-1: none): the thinking budget
  (:mod:`thinkfast.generation.budget`), on both endpoints; both in one request with different budgets is a 400
  naming the two.
- Responses return the reasoning apart from the answer: ``message.reasoning_content`` (``delta.
  reasoning_content`` when streaming) and ``content``, as vLLM's reasoning parsers do.
- Errors are OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body
  (invalid JSON, a body that is not sent as ``application/json``, a wrong type, a bad role, a negative
  ``max_tokens``, a seed outside 64 bits, a prompt longer than the model's context, an unsupported field), 404
  for an unknown model or path, 500 when generating, detokenising or checking stop strings fails for that
  request (the message names the phase; a stream ends with an error event). One request's failure is its own:
  the engine isolates it (:mod:`thinkfast.generation.continuous`) and the others in the batch go on.
- A client that disconnects (mid-stream or while waiting) cancels its requests: their batch slots free at
  the engine's next step.

Departures from vLLM's server: no log-probs, tools, penalties or guided decoding (refused with a 400 naming
the field); ``n`` at most 16; the reasoning split is the toggle's fixed ``<think>`` format.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import SamplingParams
from ..generation.continuous import Request as EngineRequest
from .protocol import UNSUPPORTED, ChatCompletionRequest, CompletionRequest, split_reasoning

__all__ = ["ServerState", "build_app"]


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    code = {400: "invalid_request", 404: "not_found", 500: "internal_error"}.get(status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


@dataclass
class ServerState:
    """What the endpoints share: the engine, the tokenizer, the model's name and context length."""

    engine: object  # ContinuousEngine or SequentialGenerateEngine
    tokenizer: object
    model_name: str
    max_model_len: int
    stop_token_ids: tuple[int, ...]
    created: int = field(default_factory=lambda: int(time.time()))


class _ChoiceError(Exception):
    """Turning one choice's tokens into text failed (``phase``: detokenising, or checking stop strings)."""

    def __init__(self, phase: str, error: Exception):
        super().__init__(f"{phase} failed: {type(error).__name__}: {error}")


class _Choice:
    """One generated sequence as text: decoded incrementally, cut at stop strings (never streaming a partial
    one), stop tokens left out of the text."""

    def __init__(self, state: ServerState, stops: list[str], skip_special_tokens: bool = True, lazy: bool = False):
        self.state, self.stops, self.skip = state, list(stops or []), skip_special_tokens
        self.lazy = lazy and not self.stops  # nobody reads the text before the end: decode once, at the end
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.n_generated = 0
        self.text = ""  # what has been released so far
        self.finish_reason: str | None = None
        self.stopped_by_string = False

    def feed(self, tokens: list[int], reason: str | None) -> str:
        """Take the engine's new tokens; return the newly released text."""
        self.n_generated += len(tokens)
        stop_ids = self.state.stop_token_ids
        self.tokens.extend(t for t in tokens if not (reason == "stop" and t in stop_ids))
        if self.lazy and reason is None:
            return ""
        try:
            full = self._decode()
        except Exception as e:  # noqa: BLE001 - this choice's failure, reported as such
            raise _ChoiceError("detokenising", e) from e
        try:
            cut = self._cut(full)
        except Exception as e:  # noqa: BLE001
            raise _ChoiceError("checking stop strings", e) from e
        if cut is not None:
            full, reason, self.stopped_by_string = cut, "stop", True
        if reason is None:
            if full.endswith("\ufffd"):  # a character still arriving in pieces
                full = full[:-1]
            full = full[: max(len(self.text), len(full) - self.hold)]
        self.finish_reason = reason
        delta, self.text = full[len(self.text) :], full
        return delta

    def _decode(self) -> str:
        return self.state.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)

    def _cut(self, full: str) -> str | None:
        """``full`` cut before the first stop string that appears in it (None: none does)."""
        cut = None
        for s in self.stops:
            at = full.find(s, max(0, len(self.text) - len(s)))
            if at != -1 and (cut is None or at < len(cut)):
                cut = full[:at]
        return cut


def _union_tag(part) -> bool:
    """Whether a pydantic error location part names a union member (``str``, ``list[TextPart]``,
    ``function-after[...]``) rather than a field or an index."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


def _most_specific(errors: list) -> dict:
    """The error to report: the first one, or, when it is one member of a union that failed every member, the
    member's error that got deepest into the value (a text part's bad ``text``, not "Input should be a valid
    string" for the content as a whole)."""
    if not errors:
        return {}
    loc = list(errors[0].get("loc", ()))
    tag = next((i for i, part in enumerate(loc) if _union_tag(part)), None)
    if tag is None:
        return errors[0]
    same = [err for err in errors if list(err.get("loc", ()))[:tag] == loc[:tag]]
    return max(same, key=lambda err: len(err.get("loc", ())))


def _check_unsupported(body) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
            raise APIError(400, f"'{name}' is not supported by this server", name)


def _sampling(state: ServerState, body, prompt_len: int, max_tokens: int | None) -> SamplingParams:
    if prompt_len >= state.max_model_len:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens; the prompt has "
                       f"{prompt_len}", "messages" if isinstance(body, ChatCompletionRequest) else "prompt")
    if max_tokens is None:
        max_tokens = state.max_model_len - prompt_len
    elif prompt_len + max_tokens > state.max_model_len:
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                       f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in "
                       "the completion). Please reduce the length of the prompt or of max_tokens.", "max_tokens")
    try:
        return SamplingParams(max_new_tokens=max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0),
                              stop_token_ids=state.stop_token_ids, seed=body.seed)
    except ValueError as e:  # a value the protocol let through that the engine cannot execute
        raise APIError(400, str(e)) from None


class _Generation:
    """The engine requests of one HTTP request: submitted at once (so a refusal is a 400 before any response
    starts); :meth:`events` yields (index, choice, new text) as tokens arrive, and whatever is left is cancelled
    when the consumer stops early (a disconnect) or the client goes away while waiting."""

    def __init__(self, state: ServerState, http: Request, prompts: list[list[int]], params: list[SamplingParams],
                 budget: int | None, stops: list[str], skip_special_tokens: bool = True, stream: bool = True):
        self.state, self.http = state, http
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [_Choice(state, stops, skip_special_tokens, lazy=not stream) for _ in prompts]
        self.requests = []
        per_token = stream or bool(stops)  # else the engine hands over all tokens once, at the end
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                self.requests.append(state.engine.submit(EngineRequest(p, sp, emit=self._emitter(i), budget=budget,
                                                                       stream=per_token)))
            except ValueError as e:
                self.cancel()
                raise APIError(400, str(e)) from None

    def _emitter(self, i: int):
        def emit(tokens, reason):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, tokens, reason))
        return emit

    def cancel(self) -> None:
        for r in self.requests:
            if r.finish_reason is None:
                self.state.engine.cancel(r)

    async def events(self) -> AsyncIterator[tuple[int, _Choice, str]]:
        open_ = len(self.requests)
        checked = time.monotonic()
        try:
            while open_:
                try:
                    i, tokens, reason = await asyncio.wait_for(self.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    i = None
                if time.monotonic() - checked > 0.25:  # a client that went away cancels its requests
                    checked = time.monotonic()
                    if await self.http.is_disconnected():
                        return
                if i is None:
                    continue
                choice = self.choices[i]
                if choice.finish_reason is not None:
                    continue  # ended by a stop string: the engine's last tokens are dropped
                if reason == "error":
                    raise APIError(500, f"generation failed: {self.requests[i].error}", kind="server_error")
                try:
                    delta = choice.feed(tokens, reason)
                except _ChoiceError as e:
                    raise APIError(500, f"generation failed: {e}", kind="server_error") from None
                if choice.stopped_by_string:
                    self.state.engine.cancel(self.requests[i])
                if choice.finish_reason is not None:
                    open_ -= 1
                yield i, choice, delta
        finally:
            self.cancel()


def _usage(prompts: list[list[int]], choices: list[_Choice]) -> dict:
    p = sum(len(x) for x in prompts)
    c = sum(ch.n_generated for ch in choices)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj) -> str:
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="thinkfast", docs_url=None, redoc_url=None)
    app.state.thinkfast = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = _most_specific(e.errors())
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _union_tag(x)]
        if first.get("type") == "json_invalid":
            why = first.get("ctx", {}).get("error", first.get("msg"))
            return _error(400, f"invalid JSON in the request body: {why}")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not loc and kind != "application/json" and not kind.endswith("+json"):
            return _error(400, f"the request body must be JSON sent with Content-Type: application/json (this "
                          f"request says {kind or 'no Content-Type'})")
        where = ".".join(loc) or "body"
        msg = first.get("msg", "invalid value").removeprefix("Value error, ")
        return _error(400, f"{where}: {msg}", where)

    @app.exception_handler(Exception)
    async def _failed(request: Request, e: Exception):  # a bug: still OpenAI's shape, naming the cause
        return _error(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(e.status_code, str(e.detail), kind=kind)

    @app.get("/health")
    async def health():
        eng = state.engine
        return {"status": "ok", "running": eng.running, "waiting": eng.waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "thinkfast", "max_model_len": state.max_model_len}]}

    def _check_model(body) -> None:
        _check_unsupported(body)
        if body.model is not None and body.model != state.model_name:
            raise APIError(404, f"The model '{body.model}' does not exist (this server has '{state.model_name}')",
                           "model", "not_found_error")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, http: Request):
        _check_model(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if any(m["role"] == "system" for m in messages[1:]):
            raise APIError(400, "a system message must come first", "messages")
        tok = state.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          **(body.chat_template_kwargs or {}))
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault (its kwargs or messages)
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        prompts = [ids] * body.n
        gen, base = _start(state, http, body, prompts, body.max_completion_tokens or body.max_tokens, "chatcmpl")
        if body.stream:
            return StreamingResponse(_chat_stream(gen, base, body, prompts), media_type="text/event-stream")
        choices = await _collect(gen)
        out = []
        for i in range(body.n):
            reasoning, content = split_reasoning(choices[i].text)
            out.append({"index": i, "message": {"role": "assistant", "content": content,
                                                 "reasoning_content": reasoning},
                        "logprobs": None, "finish_reason": choices[i].finish_reason})
        return {**base, "object": "chat.completion", "choices": out,
                "usage": _usage(prompts, [choices[i] for i in range(body.n)])}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        _check_model(body)
        if body.echo:
            raise APIError(400, "'echo' is not supported by this server", "echo")
        tok = state.tokenizer
        prompts: list[list[int]] = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append(tok(p, add_special_tokens=True)["input_ids"])
            elif any(not 0 <= t < len(tok) for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {len(tok)})", "prompt")
            else:
                prompts.append(list(p))
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "empty prompt", "prompt")
        expanded = [p for p in prompts for _ in range(body.n)]
        gen, base = _start(state, http, body, expanded, body.max_tokens, "cmpl")
        if body.stream:
            return StreamingResponse(_completion_stream(gen, base, body, expanded), media_type="text/event-stream")
        choices = await _collect(gen)
        out = [{"index": i, "text": choices[i].text, "logprobs": None, "finish_reason": choices[i].finish_reason}
               for i in range(len(expanded))]
        return {**base, "object": "text_completion", "choices": out,
                "usage": _usage(expanded, [choices[i] for i in range(len(expanded))])}

    return app


async def _collect(gen: _Generation) -> dict[int, _Choice]:
    events = gen.events()
    try:
        async for i, ch, _ in events:
            pass
    finally:
        await events.aclose()
    if any(ch.finish_reason is None for ch in gen.choices):  # the client went away
        raise APIError(499, "client disconnected")
    return dict(enumerate(gen.choices))


def _start(state: ServerState, http: Request, body, prompts: list[list[int]], max_tokens: int | None,
           prefix: str) -> tuple[_Generation, dict]:
    """Check each prompt's length, submit them (``body.n`` per distinct prompt, consecutive; a seeded request's
    k-th sample gets seed + k, wrapped to 64 bits) and return the generation and the response's common fields."""
    from dataclasses import replace

    try:
        budget = body.thinking_budget()
    except ValueError as e:  # max_thinking_tokens and vLLM's thinking_token_budget disagree
        raise APIError(400, str(e), "thinking_token_budget") from None
    params = []
    for k, p in enumerate(prompts):
        sp = _sampling(state, body, len(p), max_tokens)
        # the k-th sample's seed, wrapped to 64 bits (a seed of 2**63 - 1 with n = 2 stays valid)
        if body.seed is not None:
            sp = replace(sp, seed=(body.seed + k % body.n + 2**63) % 2**64 - 2**63)
        params.append(sp)
    gen = _Generation(state, http, prompts, params, budget, body.stop, body.skip_special_tokens, body.stream)
    return gen, {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}


async def _stream(gen: _Generation, chunk: dict, body, prompts, head: list[dict], piece) -> AsyncIterator[str]:
    """Server-sent events: the ``head`` choices, then ``piece(index, choice, new text)`` for each event (None:
    nothing to send), the usage chunk when asked for, ``[DONE]``; an error mid-stream is an error event."""
    events = gen.events()
    try:
        for choice in head:
            yield _sse({**chunk, "choices": [choice]})
        async for i, ch, delta in events:
            choice = piece(i, ch, delta)
            if choice is not None:
                yield _sse({**chunk, "choices": [choice]})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**chunk, "choices": [], "usage": _usage(prompts, gen.choices)})
    except APIError as e:
        yield _sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})
    except Exception as e:  # noqa: BLE001 - a bug: the stream still ends with an error event naming it
        yield _sse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                              "param": None, "code": None}})
    finally:
        await events.aclose()
        gen.cancel()
    yield "data: [DONE]\n\n"


def _chat_stream(gen: _Generation, base: dict, body: ChatCompletionRequest, prompts) -> AsyncIterator[str]:
    sent: dict[int, tuple[str, str]] = {i: ("", "") for i in range(body.n)}

    def piece(i: int, ch: _Choice, _delta: str) -> dict | None:
        reasoning, content = split_reasoning(ch.text)  # each part only grows: send what is new
        old_r, old_c = sent[i]
        delta = {}
        if reasoning and len(reasoning) > len(old_r):
            delta["reasoning_content"] = reasoning[len(old_r) :]
        if len(content) > len(old_c):
            delta["content"] = content[len(old_c) :]
        sent[i] = (reasoning or "", content)
        if not delta and ch.finish_reason is None:
            return None
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": ch.finish_reason}

    head = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(body.n)]
    return _stream(gen, {**base, "object": "chat.completion.chunk"}, body, prompts, head, piece)


def _completion_stream(gen: _Generation, base: dict, body: CompletionRequest, prompts) -> AsyncIterator[str]:
    def piece(i: int, ch: _Choice, delta: str) -> dict | None:
        if not delta and ch.finish_reason is None:
            return None
        return {"index": i, "text": delta, "logprobs": None, "finish_reason": ch.finish_reason}

    return _stream(gen, {**base, "object": "text_completion"}, body, prompts, [], piece)
