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
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .generation import Completion, SamplingParams

__all__ = ["Endpoint"]


class Endpoint:
    """``generate(prompts, params)`` through an OpenAI-compatible server at ``url`` (``http://host:port/v1``)."""

    def __init__(self, url: str, tokenizer, model: str | None = None, api_key: str | None = None,
                 concurrency: int = 16, timeout: float = 3600.0):
        import openai

        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} must be >= 1")
        self.url, self.tokenizer, self.concurrency = url.rstrip("/"), tokenizer, concurrency
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or "none", timeout=timeout, max_retries=2)
        try:
            served = [m.id for m in self.client.models.list().data]
        except openai.APIConnectionError as e:
            raise ConnectionError(f"eval.endpoint={url}: no OpenAI-compatible server answers there ({e})") from None
        if model is None:
            if not served:
                raise ValueError(f"eval.endpoint={url} serves no model")
            model = served[0]
        elif model not in served:
            raise ValueError(f"eval.endpoint_model={model!r}: {url} serves {served}")
        self.model = model

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r}, model={self.model!r})"

    def _one(self, i: int, prompt: list[int], params: SamplingParams) -> Completion:
        extra: dict = {"skip_special_tokens": True}  # as the harness decodes a local model's tokens
        if params.stop_token_ids:
            extra["stop_token_ids"] = list(params.stop_token_ids)
        if params.top_k:
            extra["top_k"] = params.top_k
        r = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=None if params.seed is None else params.seed + i, extra_body=extra or None)
        choice = r.choices[0]
        reason = "length" if choice.finish_reason == "length" else "stop"
        return Completion([], reason, [], text=choice.text, num_tokens=r.usage.completion_tokens if r.usage else None)

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress: bool = False,
                 hook=None) -> list[Completion]:
        if hook is not None:
            raise ValueError("step hooks (e.g. a thinking budget) need a local model, not an endpoint")
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self._one, i, p, params) for i, p in enumerate(prompts)]
            if progress:
                from tqdm.auto import tqdm

                futures_iter = tqdm(futures, desc="endpoint", unit="req")
            else:
                futures_iter = futures
            return [f.result() for f in futures_iter]
