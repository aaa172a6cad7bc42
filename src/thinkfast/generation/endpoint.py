"""An OpenAI-compatible server as the model of an evaluation (``eval.endpoint``): e.g. vLLM, ``thinkfast serve``.

The harness builds every prompt itself, with the local tokenizer of the model folder (``eval.model``), exactly as
for a local model, and sends the token ids to the server's ``/v1/completions`` (OpenAI's API takes a prompt as
token ids). So the server's chat template and reasoning parser play no part: a local model and the same model
behind a server are graded on the same prompts and the same raw text (tested against ``thinkfast serve`` and
against real vLLM). Requests go ``concurrency`` at a time through
the official ``openai`` client; each carries ``temperature``, ``top_p``, ``max_tokens``, a seed (the
evaluation's seed plus the prompt's index) and ``stop_token_ids`` (a vLLM extension; other servers ignore it).

What comes back is text (special tokens skipped, as the harness decodes a local model's tokens) and the
server's count of generated tokens: :class:`~thinkfast.generation.Completion` ``text`` and ``num_tokens``, with
no token ids or log-probs. Step hooks (the thinking budget) run inside an engine and are refused here.

A server is someone else's process: it may sit at another path (no ``/v1``), answer HTML or JSON of another
shape, fail, or stop answering. Each of these ends the evaluation with one :class:`EndpointError` line naming
the endpoint, the request (``POST /v1/completions``, prompt i of n) and what came back (the status and the
start of the body, or "no answer in N s"), because the client's own exceptions name none of these. So the raw
answer is read and its JSON checked here rather than parsed by the client. Timeouts, connection failures,
HTTP 429 and 5xx are retried ``retries`` times with a doubling backoff, by this loop rather than the client's so
that retries are counted (:meth:`Endpoint.stats`, in the evaluation's metrics); an answer of the wrong shape
is not retried: a server that answers garbage once answers it again.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from typing import Callable
from urllib.parse import urlsplit

from .sampler import Completion, SamplingParams

__all__ = ["Endpoint", "EndpointError"]


class EndpointError(RuntimeError):
    """The server failed, answered something other than the OpenAI API, or stopped answering. The message is
    one self-sufficient line (the CLI prints a RuntimeError's first line)."""


def _snippet(body: str, limit: int = 200) -> str:
    """The start of an answer's body on one line: an error's own message when it is JSON (OpenAI's ``{"error":
    {"message": ...}}``, vLLM's ``{"message": ...}``, FastAPI's ``{"detail": ...}``), else the raw text, quoted."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        message = error.get("message") if isinstance(error, dict) else error or parsed.get("message") or \
            parsed.get("detail")
        if isinstance(message, str) and message.strip():
            body = message
    flat = " ".join(body.split())
    if not flat:
        return "an empty body"
    return repr(flat[:limit] + ("..." if len(flat) > limit else ""))


def _models(body: object) -> list[str]:
    """The served models' names from a ``/models`` answer; ValueError saying what its shape lacks."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise ValueError('no "data" list of models with an "id"')
    return [m["id"] for m in data]


def _completion(body: object) -> Completion:
    """The first choice of a ``/completions`` answer; ValueError saying what its shape lacks."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ValueError('an empty "choices" list' if isinstance(choices, list) else 'no "choices" list')
    choice = choices[0]
    text = choice.get("text") if isinstance(choice, dict) else None
    if not isinstance(text, str):
        raise ValueError('no "text" string in choices[0]')
    usage = body.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if tokens is not None and (type(tokens) is not int or tokens < 0):
        raise ValueError(f"usage.completion_tokens={tokens!r} is not a count")
    reason = "length" if choice.get("finish_reason") == "length" else "stop"
    return Completion([], reason, [], text=text, num_tokens=tokens)


class Endpoint:
    """``generate(prompts, params)`` through an OpenAI-compatible server at ``url`` (``http://host:port/v1``).

    ``timeout`` is seconds a request may wait for its answer, ``retries`` the extra attempts of a request that
    timed out, lost its connection or got HTTP 429 / 5xx (after ``backoff`` seconds, doubling); ``on_retry``
    receives a line about each retry. Construction asks ``GET /models``, so a wrong URL fails here, before any
    prompt is sent."""

    def __init__(self, url: str, tokenizer, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 16, timeout: float = 300.0, retries: int = 2, backoff: float = 0.5,
                 on_retry: Callable[[str], None] | None = None):
        import openai

        if concurrency < 1 or retries < 0 or not timeout > 0:
            raise ValueError(f"concurrency={concurrency} must be >= 1, retries={retries} >= 0, timeout={timeout} > 0")
        self.url, self.tokenizer, self.concurrency = url.rstrip("/"), tokenizer, concurrency
        self.timeout, self.retries, self.backoff, self.on_retry = timeout, retries, backoff, on_retry
        self.requests = self.retried = 0  # HTTP requests sent (retries included), and retries among them
        self._lock = threading.Lock()
        self._path = urlsplit(self.url).path
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or "none", timeout=timeout, max_retries=0)
        served = self._request(f"GET {self._path}/models", self.client.models.with_raw_response.list, _models)
        if model is None:
            if not served:
                raise ValueError(f"eval.endpoint={url} serves no model")
            model = served[0]
        elif model not in served:
            raise ValueError(f"eval.endpoint_model={model!r}: {url} serves {served}")
        self.model = model

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, model={self.model!r})"

    def stats(self) -> dict:
        """What the evaluation asked of the server, for its metrics."""
        return {"url": self.url, "model": self.model, "requests": self.requests, "retries": self.retried,
                "timeout": self.timeout, "max_retries": self.retries}

    def _request(self, what: str, send: Callable, parse: Callable, stop: threading.Event | None = None):
        """``parse`` of the JSON that ``send()`` gets back, retrying the failures that may pass; every other
        outcome is an EndpointError naming ``what`` (e.g. "POST /v1/completions (prompt 3 of 40)"). ``stop``
        set: another request failed, so no more retries."""
        import openai

        where = f"eval.endpoint={self.url}: {what}"
        for attempt in range(1, self.retries + 2):
            with self._lock:
                self.requests += 1
            timed_out = False
            try:
                raw = send()
            except openai.APITimeoutError:
                failure, timed_out = f"got no answer in {self.timeout:g} s", True
            except openai.APIConnectionError as e:
                failure = f"connection failed ({e.__cause__ or e})"
            except openai.APIStatusError as e:
                failure = f"answered HTTP {e.status_code}: {_snippet(e.response.text)}"
                if e.status_code != 429 and e.status_code < 500:
                    raise EndpointError(f"{where} {failure}{self._did_you_mean(what)}") from None
            else:
                try:
                    body = json.loads(raw.text)
                except ValueError:
                    raise EndpointError(f"{where} answered HTTP {raw.status_code} that is not JSON: "
                                        f"{_snippet(raw.text)}{self._did_you_mean(what)}") from None
                try:
                    return parse(body)
                except ValueError as e:
                    raise EndpointError(f"{where} answered HTTP {raw.status_code} of the wrong shape ({e}): "
                                        f"{_snippet(raw.text)}{self._did_you_mean(what)}") from None
            if attempt > self.retries or (stop is not None and stop.is_set()):
                break
            delay = self.backoff * 2 ** (attempt - 1)
            with self._lock:
                self.retried += 1
            if self.on_retry is not None:
                self.on_retry(f"{where} {failure}; retry {attempt} of {self.retries} in {delay:g} s")
            time.sleep(delay)
        hint = "; raise eval.endpoint_timeout if the server is only slow" if timed_out else ""
        raise EndpointError(f"{where} {failure} (gave up after {attempt} attempt{'s' * (attempt > 1)}{hint})")

    def _did_you_mean(self, what: str) -> str:
        """The usual mistake: the server's root instead of its API (vLLM and thinkfast serve it under /v1)."""
        if what.startswith("GET") and not self._path.endswith("/v1"):
            return f"; did you mean {self.url}/v1?"
        return ""

    def _one(self, i: int, n: int, prompt: list[int], params: SamplingParams, stop: threading.Event
             ) -> Completion | None:
        if stop.is_set():  # another request failed: the evaluation is over (None: never sent)
            return None
        extra: dict = {"skip_special_tokens": True}  # as the harness decodes a local model's tokens
        if params.stop_token_ids:
            extra["stop_token_ids"] = list(params.stop_token_ids)
        if params.top_k:
            extra["top_k"] = params.top_k
        send = partial(self.client.completions.with_raw_response.create, model=self.model, prompt=prompt,
                       max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                       seed=None if params.seed is None else params.seed + i, extra_body=extra)
        try:
            return self._request(f"POST {self._path}/completions (prompt {i + 1} of {n})", send, _completion, stop)
        except EndpointError:
            stop.set()  # set here, in the failing worker, so that no worker sends another prompt after it
            raise

    def sync(self, model) -> None:
        """A server generates with its own weights: it cannot take a training model's (a Backend method)."""
        raise ValueError(f"{self!r} serves its own weights; it cannot take new ones (use a local backend for RL)")

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, hook=None,
                 progress: bool = False) -> list[Completion]:
        """One completion per prompt, in order. The first request that fails ends it: the ones not yet sent
        are cancelled and those in flight are not retried, so a dead server costs one timeout, not one per
        prompt."""
        if hook is not None:
            raise ValueError("step hooks (e.g. a thinking budget) need a local model, not an endpoint")
        stop = threading.Event()
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            futures = [pool.submit(self._one, i, len(prompts), p, params, stop) for i, p in enumerate(prompts)]
            done = as_completed(futures)
            if progress:
                from tqdm.auto import tqdm

                done = tqdm(done, total=len(futures), desc="endpoint", unit="req")
            for f in done:
                f.result()
            return [f.result() for f in futures]
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
