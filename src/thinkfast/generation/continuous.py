"""Continuous batching on the rollout engine: requests join and leave one running batch.

:func:`thinkfast.generation.generate` decodes a fixed list of prompts; a server gets requests one at a time,
at any moment. :class:`ContinuousEngine` keeps one batch decoding in a background thread. Each iteration:

1. every running sequence gets its next token (each request its own temperature / top-p / top-k, stop ids,
   token limit, thinking budget and, when it gives a seed, its own random generator);
2. sequences that ended (stop token, length, budget's hard stop, cancelled) leave the batch, their cache
   rows freed (:meth:`StaticKVCache.select`); padding columns no sequence needs any more are dropped;
3. the survivors' tokens go through the model (one decode step);
4. waiting requests join: their prompts are prefilled together (left-padded, position ids counting real
   tokens only) and their cache rows appended to the running cache right-aligned
   (:meth:`StaticKVCache.join`), so every row's tokens end in the same column.

A joined row is computed exactly as it would be alone: padding is masked and positions are its own
(tested: greedy outputs equal :func:`generate`'s, with requests arriving while others run). Tokens reach
each request through its ``emit`` callback from the engine thread (a server hands them to its event loop).

One request never breaks another. What is done per request (admission: its generator, budget and token ids;
choosing its next token; its thinking budget) runs in that request's own scope: an error there ends that
request alone (finish reason "error", ``error`` naming the phase and the cause). What is done for many at once
is retried so as to find the culprit: a prefill that fails is split in halves until the failing prompt is
alone; a decode forward that fails drops the running cache and re-prefills every running request from its
prompt and tokens so far (vLLM's preemption by recomputation), so only a request that fails on its own is
ended. Whatever still escapes ends every request the engine holds, each answered (tested by fault injection
at every phase: the others finish with the tokens they get alone).

nemotron-nas models only (a Llama-layout model is converted in memory, :func:`thinkfast.modeling.convert.
convert_llama_model`): joining needs a cache whose rows can be padded and concatenated.
"""

from __future__ import annotations

import itertools
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .sampler import SamplingParams, StepView, filter_logits, left_padded
from ..modeling.kvcache import StaticKVCache
from ..modeling import DeciLMForCausalLM

__all__ = ["ContinuousEngine", "Request", "SequentialGenerateEngine", "as_decilm"]


def as_decilm(model):
    """The model as a nemotron-nas model: a ``LlamaForCausalLM`` is converted in memory; any other kind is
    refused with a ValueError naming it."""
    if isinstance(model, DeciLMForCausalLM):
        return model.eval()
    from transformers import LlamaForCausalLM

    if isinstance(model, LlamaForCausalLM):
        from ..modeling.convert import convert_llama_model

        return convert_llama_model(model)
    raise ValueError(f"the continuous-batching engine serves nemotron-nas and Llama models, not "
                     f"{type(model).__name__}")


@dataclass(eq=False)
class Request:
    """One generation request. ``emit(tokens, finish_reason)`` is called from the engine thread with each
    step's new token ids (finish_reason None while it runs; then "stop", "length", "abort" or "error",
    with ``error`` set for the last). ``params.batch_size`` is ignored (the engine's ``max_batch`` rules)."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[list[int], str | None], None] | None = None
    budget: int | None = None  # thinking tokens (thinkfast.generation.budget); None: no budget
    stream: bool = True  # emit every step's token; False: one emit with all the tokens when the request ends
    id: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    emitted: int = 0  # tokens handed to emit so far


class ContinuousEngine:
    """A background thread decoding every submitted request in one running batch (at most ``max_batch``
    sequences; joining prompts are prefilled ``max_prefill_tokens`` at a time, at least one prompt)."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 32, max_prefill_tokens: int = 8192,
                 budget_grace: int = 32, seed: int = 0, threads: int | None = None):
        if max_batch < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1")
        self.threads = threads  # torch's CPU threads in the engine thread (None: torch's default)
        self.model = as_decilm(model)
        self.device = next(self.model.parameters()).device
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.budget = None
        if tokenizer is not None:
            from .budget import ThinkingBudget

            try:
                self.budget = ThinkingBudget(tokenizer, [], None, grace=budget_grace)
            except ValueError:  # no single-token think tags: requests with a budget are refused
                self.budget = None
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._ids = itertools.count()
        self._pending: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        # the running batch (engine thread only)
        self._rows: list[Request] = []
        self._by_id: dict[int, Request] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._cache: StaticKVCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)  # [rows, room]
        self._pos = torch.zeros(0, dtype=torch.long, device=self.device)  # next position of each row
        self._logits: torch.Tensor | None = None  # next-token logits of each row
        self._width = 0  # columns of the cache (and of the mask) in use
        self._forced: dict[int, list[int]] = {}
        self._banned: dict[int, set[int]] = {}
        self._finish: set[int] = set()
        self._joining: list[Request] = []  # taken from the queue, not yet in the running batch
        self.stats = {"steps": 0, "generated_tokens": 0, "joins": 0, "joins_into_running": 0, "max_running": 0,
                      "finished": 0, "errors": 0, "recomputes": 0}

    # -- the caller's side (any thread) -------------------------------------------------------------------------

    def start(self) -> ContinuousEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="thinkfast-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, request: Request) -> Request:
        """Queue ``request``; it joins the running batch at the next iteration."""
        if not request.prompt:
            raise ValueError("empty prompt: every prompt needs at least one token")
        if request.budget is not None and self.budget is None:
            raise ValueError("this model's tokenizer has no single-token think tags: no thinking budget")
        request.id = next(self._ids)
        with self._cv:
            self._pending.append(request)
            self._cv.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """End ``request`` (finish reason "abort") at the next iteration, freeing its slot."""
        request.cancelled = True
        with self._cv:
            self._cv.notify_all()

    def generate(self, prompt: list[int], params: SamplingParams, budget: int | None = None,
                 timeout: float | None = None) -> Request:
        """Submit and wait (a convenience for tests and scripts)."""
        request = self.submit(Request(list(prompt), params, budget=budget))
        if not request.done.wait(timeout):
            self.cancel(request)
            raise TimeoutError(f"request {request.id} not done in {timeout} s")
        return request

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # -- the engine thread --------------------------------------------------------------------------------------

    # what a StepView asks of the running batch (requests by their engine id)
    def step_generated(self, request: int) -> list[int]:
        return list(self._by_id[request].tokens)

    def step_force(self, request: int, token_ids: list[int]) -> None:
        self._forced.setdefault(request, []).extend(token_ids)

    def step_ban(self, request: int, token_ids: list[int]) -> None:
        self._banned.setdefault(request, set()).update(token_ids)

    def step_finish(self, request: int) -> None:
        self._finish.add(request)

    def _loop(self) -> None:
        if self.threads:  # OpenMP's thread count is per calling thread: set it in the engine's own
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not self._stop and not self._rows and not self._pending:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                with torch.no_grad():
                    self._iteration()
            except Exception as e:  # noqa: BLE001 - a fault no request could be blamed for: end the ones held
                traceback.print_exc()
                message = f"engine step failed: {type(e).__name__}: {e}"
                for r in self._rows + self._joining:
                    if not r.done.is_set():
                        self._end(r, "error", error=message)
                self._joining = []
                self._reset()
        for r in self._rows + list(self._pending):
            self._end(r, "abort")
        self._reset()

    def _reset(self) -> None:
        self._drop_batch()
        self._forced, self._banned, self._finish = {}, {}, set()

    def _drop_batch(self) -> None:
        """Forget the running batch's tensors (its requests' own state stays)."""
        self._rows, self._cache, self._logits = [], None, None
        self._mask = self._mask[:0, :0]
        self._pos = self._pos[:0]
        self._width = 0

    def _end(self, r: Request, reason: str, error: str | None = None) -> None:
        r.finish_reason, r.error = reason, error
        if error is not None:
            self.stats["errors"] += 1
        new, r.emitted = r.tokens[r.emitted :], len(r.tokens)
        self._by_id.pop(r.id, None)
        self._generators.pop(r.id, None)
        if self.budget is not None:
            self.budget.discard(r.id)
        self.stats["finished"] += 1
        if r.emit is not None:
            try:
                r.emit(new, reason)
            except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine
                traceback.print_exc()
        r.done.set()

    def _iteration(self) -> None:
        if self._rows:
            self._decode_step()
        self._admit()

    def _choose(self, idx: list[int], logits: torch.Tensor, picked: dict[int, int]) -> None:
        """The next token of rows ``idx`` of the running batch (``logits``: every row's, [rows, V]) into ``picked``
        (row -> token id): greedy, or sampled with the request's temperature / top-k / top-p, from its own
        generator when it gave a seed. Rows land in ``picked`` as they are chosen: after a failure the caller
        retries only the others, and a seeded request's generator is never drawn twice for one step."""
        rows = self._rows
        greedy = [i for i in idx if rows[i].params.temperature == 0]
        if greedy:
            at = torch.tensor(greedy, device=logits.device)
            picked.update(zip(greedy, logits[at].argmax(-1).tolist()))
        groups: dict[tuple[int, float], list[int]] = {}
        for i in idx:
            if rows[i].params.temperature > 0:
                groups.setdefault((rows[i].params.top_k, rows[i].params.top_p), []).append(i)
        for (top_k, top_p), members in groups.items():
            at = torch.tensor(members, device=logits.device)
            temps = torch.tensor([rows[i].params.temperature for i in members], device=logits.device,
                                 dtype=logits.dtype)
            probs = filter_logits(logits[at] / temps[:, None], top_k, top_p).softmax(-1)
            shared = [j for j, i in enumerate(members) if rows[i].id not in self._generators]
            if shared:
                draws = torch.multinomial(probs[shared], 1, generator=self.generator).squeeze(-1).tolist()
                picked.update((members[j], t) for j, t in zip(shared, draws))
            for j, i in enumerate(members):
                own = self._generators.get(rows[i].id)
                if own is not None:
                    picked[i] = int(torch.multinomial(probs[j : j + 1], 1, generator=own)[0, 0])

    def _decode_step(self) -> None:
        rows, logits = self._rows, self._logits
        assert logits is not None
        failed: dict[int, str] = {}  # row -> why that request ends in error
        for i, r in enumerate(rows):
            if r.id in self._banned:
                try:
                    logits[i, sorted(self._banned[r.id])] = float("-inf")
                except Exception as e:  # noqa: BLE001
                    failed[i] = f"banning tokens: {type(e).__name__}: {e}"
        picked: dict[int, int] = {}
        live = [i for i in range(len(rows)) if i not in failed]
        try:
            self._choose(live, logits, picked)
        except Exception:  # noqa: BLE001 - find the request at fault: the rest one at a time
            for i in live:
                if i not in picked:
                    try:
                        self._choose([i], logits, picked)
                    except Exception as e:  # noqa: BLE001
                        failed[i] = f"choosing the next token: {type(e).__name__}: {e}"
        for i, r in enumerate(rows):
            queue = self._forced.get(r.id)
            if queue and i in picked:
                picked[i] = queue.pop(0)
                if not queue:
                    del self._forced[r.id]
        nxt = torch.tensor([picked.get(i, 0) for i in range(len(rows))], device=self.device)
        chosen = logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1).tolist()
        tokens = nxt.tolist()
        for i, (r, t, lp) in enumerate(zip(rows, tokens, chosen)):
            if i not in failed:
                r.tokens.append(t)
                r.logprobs.append(lp)
        self.stats["steps"] += 1
        self.stats["generated_tokens"] += len(rows) - len(failed)
        if self.budget is not None and self.budget.count:
            for i, r in enumerate(rows):  # one request at a time: a failure is that request's alone
                if i not in failed and r.id in self.budget.count:
                    try:
                        self.budget(StepView(self, self.stats["steps"], [r.id], [tokens[i]]))
                    except Exception as e:  # noqa: BLE001
                        failed[i] = f"thinking budget: {type(e).__name__}: {e}"
        keep = []
        for i, (r, t) in enumerate(zip(rows, tokens)):
            error = failed.get(i)
            if error is not None:
                reason = "error"
            elif t in r.params.stop_token_ids or r.id in self._finish:
                reason = "stop"
            elif len(r.tokens) >= r.params.max_new_tokens:
                reason = "length"
            elif r.cancelled:
                reason = "abort"
            else:
                keep.append(i)
                if r.emit is not None and r.stream:
                    try:
                        r.emit(r.tokens[r.emitted :], None)
                        r.emitted = len(r.tokens)
                    except Exception:  # noqa: BLE001
                        traceback.print_exc()
                        r.cancelled = True
                continue
            self._forced.pop(r.id, None)
            self._banned.pop(r.id, None)
            self._end(r, reason, error=error)
        self._finish.clear()
        if not keep:
            self._reset()
            return
        if len(keep) < len(rows):
            at = torch.tensor(keep, device=self.device)
            self._rows = [rows[i] for i in keep]
            if len(self._cache):
                self._cache.select(at)
            self._mask, self._pos, nxt = self._mask[at], self._pos[at], nxt[at]
            self._drop_unused_columns()
        try:
            self._forward(nxt)
        except Exception:  # noqa: BLE001 - the batch's forward: recompute the requests, isolating a culprit
            traceback.print_exc()
            self._recompute()

    def _recompute(self) -> None:
        """Drop the running batch's cache and prefill every running request again from its prompt and its tokens
        so far (vLLM's preemption by recomputation): the batch goes on, and a request whose own prefill fails
        is the one ended."""
        rows = self._rows
        self.stats["recomputes"] += 1
        self._drop_batch()
        self._join(rows, [r.prompt + r.tokens for r in rows])

    def _drop_unused_columns(self) -> None:
        """Drop leading columns that are padding in every remaining row (once they are a quarter of the width)."""
        width = self._width
        used = self._mask[:, :width].any(0)
        first = int(used.long().argmax()) if bool(used.any()) else width
        if first >= max(16, width // 4):
            if len(self._cache):
                self._cache.drop_front(first)
            self._mask[:, : width - first] = self._mask[:, first:width].clone()
            self._mask[:, width - first :] = False
            self._width = width - first

    def _grow_mask(self, need: int) -> None:
        if need > self._mask.shape[1]:
            grown = torch.zeros((self._mask.shape[0], max(need + 64, 2 * self._mask.shape[1])), dtype=torch.bool,
                                device=self.device)
            grown[:, : self._mask.shape[1]] = self._mask
            self._mask = grown

    def _forward(self, nxt: torch.Tensor) -> None:
        """One decode step of every running row (their tokens ``nxt``)."""
        col = self._width
        self._grow_mask(col + 1)
        self._mask[:, col] = True
        self._width = col + 1
        cache = self._cache
        mask = self._mask[:, None, None, : col + 1] if len(cache) else None
        out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=self._pos[:, None], cache=cache,
                         use_cache=True, logits_to_keep=1)
        self._logits = out.logits[:, -1, :].float()
        self._pos = self._pos + 1

    def _take_pending(self) -> list[Request]:
        room = self.max_batch - len(self._rows)
        taken: list[Request] = []
        tokens = 0
        with self._cv:
            while self._pending and len(taken) < room:
                r = self._pending[0]
                if r.cancelled:
                    self._pending.popleft()
                    self._end(r, "abort")
                    continue
                if taken and tokens + len(r.prompt) > self.max_prefill_tokens:
                    break
                taken.append(self._pending.popleft())
                tokens += len(r.prompt)
        return taken

    def _admit(self) -> None:
        new = self._take_pending()
        if not new:
            return
        self._joining = new  # from here on the engine answers them, whatever happens
        ready = []
        for r in new:
            try:
                self._admit_one(r)
                ready.append(r)
            except Exception as e:  # noqa: BLE001 - this request is refused; the others join
                self._end(r, "error", error=f"admission: {type(e).__name__}: {e}")
        self._join(ready, [r.prompt for r in ready])
        self._joining = []

    def _admit_one(self, r: Request) -> None:
        """What a request brings of its own: token ids the model has, its generator, its thinking budget."""
        vocab = self.model.config.vocab_size
        if min(r.prompt) < 0 or max(r.prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        self._by_id[r.id] = r
        if r.params.seed is not None:
            self._generators[r.id] = torch.Generator(device=self.device).manual_seed(r.params.seed)
        if self.budget is not None:
            self.budget.add(r.id, r.prompt, r.budget)

    def _join(self, requests: list[Request], inputs: list[list[int]]) -> None:
        """Prefill ``inputs`` (each request's tokens) and add the requests to the running batch, about
        ``max_prefill_tokens`` at a time (at least one request)."""
        start = 0
        while start < len(requests):
            end, tokens = start + 1, len(inputs[start])
            while end < len(requests) and tokens + len(inputs[end]) <= self.max_prefill_tokens:
                tokens += len(inputs[end])
                end += 1
            self._join_group(requests[start:end], inputs[start:end])
            start = end

    def _join_group(self, requests: list[Request], inputs: list[list[int]]) -> None:
        """Prefill together; when that fails, each half on its own, until a request that fails alone is ended
        with the error and the rest join."""
        try:
            prefilled = self._prefill(inputs)
        except Exception as e:  # noqa: BLE001
            if len(requests) == 1:
                traceback.print_exc()
                self._end(requests[0], "error", error=f"prefill: {type(e).__name__}: {e}")
                return
            half = len(requests) // 2
            self._join_group(requests[:half], inputs[:half])
            self._join_group(requests[half:], inputs[half:])
            return
        self._merge(requests, *prefilled)

    def _merge(self, new: list[Request], cache: StaticKVCache, mask: torch.Tensor, pos: torch.Tensor,
               logits: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, right-aligned with its columns."""
        self.stats["joins"] += 1
        if not self._rows:
            self._rows, self._cache, self._mask, self._pos, self._logits = list(new), cache, mask, pos, logits
            self._width = mask.shape[1]
        else:
            self.stats["joins_into_running"] += 1
            width = self._width
            pad_old, pad_new = (self._cache.join(cache) if len(self._cache) else
                                (max(0, mask.shape[1] - width), max(0, width - mask.shape[1])))
            total = width + pad_old
            merged = torch.zeros((len(self._rows) + len(new), total + 64), dtype=torch.bool, device=self.device)
            merged[: len(self._rows), pad_old:total] = self._mask[:, :width]
            merged[len(self._rows) :, pad_new:total] = mask
            self._rows = self._rows + list(new)
            self._mask, self._width = merged, total
            self._pos = torch.cat([self._pos, pos])
            self._logits = torch.cat([self._logits, logits])
        self.stats["max_running"] = max(self.stats["max_running"], len(self._rows))

    def _prefill(self, prompts: list[list[int]]):
        """Prefill ``prompts`` together: (cache, mask [n, width], next positions [n], last logits [n, V])."""
        ids, mask, positions = left_padded(prompts, 0, self.device)
        cache = StaticKVCache(1 << 30, chunk=256)
        out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
        return cache, mask, positions[:, -1] + 1, out.logits[:, -1, :].float()


class SequentialGenerateEngine:
    """The load test's baseline: ``transformers``' plain ``model.generate`` loop, one request at a time, in a
    background thread (the interface of :class:`ContinuousEngine`; no thinking budget, no per-step streaming:
    a request's tokens arrive together when it is done)."""

    budget = None

    def __init__(self, model, tokenizer=None, *, threads: int | None = None, **_):
        self.model, self.threads = model.eval(), threads
        self.device = next(model.parameters()).device
        self._pending: deque[Request] = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._busy = 0
        self.stats = {"finished": 0, "generated_tokens": 0}

    start = ContinuousEngine.start
    stop = ContinuousEngine.stop
    cancel = ContinuousEngine.cancel
    generate = ContinuousEngine.generate

    def submit(self, request: Request) -> Request:
        if request.budget is not None:
            raise ValueError("the transformers generate baseline has no thinking budget")
        return ContinuousEngine.submit(self, request)

    waiting = ContinuousEngine.waiting

    @property
    def running(self) -> int:
        return self._busy

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cv:
                while not self._stop and not self._pending:
                    self._cv.wait()
                if self._stop:
                    break
                r = self._pending.popleft()
            if r.cancelled:
                self._finish(r, [], "abort")
                continue
            self._busy = 1
            try:
                p = r.params
                sampling = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k or None}
                if p.seed is not None:
                    torch.manual_seed(p.seed)
                with torch.no_grad():
                    out = self.model.generate(
                        torch.tensor([r.prompt], device=self.device), attention_mask=None,
                        max_new_tokens=p.max_new_tokens, eos_token_id=list(p.stop_token_ids) or None,
                        pad_token_id=(p.stop_token_ids or (0,))[0],
                        **(sampling if p.temperature > 0 else {"do_sample": False}))
                tokens = out[0, len(r.prompt):].tolist()
                stopped = bool(tokens) and tokens[-1] in p.stop_token_ids
                self._finish(r, tokens, "stop" if stopped else "length")
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self._finish(r, [], "error", f"{type(e).__name__}: {e}")
            finally:
                self._busy = 0
        for r in list(self._pending):
            self._finish(r, [], "abort")

    def _finish(self, r: Request, tokens: list[int], reason: str, error: str | None = None) -> None:
        r.tokens, r.finish_reason, r.error = tokens, reason, error
        self.stats["finished"] += 1
        self.stats["generated_tokens"] += len(tokens)
        if r.emit is not None:
            r.emit(tokens, reason)
        r.done.set()
