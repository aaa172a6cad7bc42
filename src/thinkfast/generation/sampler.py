"""The rollout engine: the one batched sampler that evaluation, RL rollouts and serving share.

``generate(model, prompts, params)`` takes token-id prompts of any lengths, left-pads them, prefills
once and decodes token by token: greedy (temperature 0) or temperature / top-p / top-k sampling,
per-sequence stop tokens and a token budget. Position ids count real tokens only, so a left-padded
prompt is computed exactly as it would be alone (tested against full recomputation).

What makes it fast on the nemotron-nas model (benchmarks/sampler.py, against ``transformers.generate``):

* a KV cache preallocated once per batch for the layers that have attention (:class:`StaticKVCache`),
  written in place; the per-step attention mask is a view of one preallocated buffer (nothing is
  reallocated per step);
* sequences leave the batch when they stop: once a quarter of the rows have finished, the live rows are
  gathered into a smaller batch (cache included), so a batch costs about the sum of its sequences'
  lengths, not its longest one times the batch size.

Any other causal LM whose forward takes ``input_ids, attention_mask, position_ids`` and a cache
(``cache``, or ``past_key_values`` before transformers 5.24; e.g. ``LlamaForCausalLM``) runs on
transformers' ``DynamicCache`` with 2D masks.

A step hook (``generate(..., hook=f)``, :class:`StepView`) sees every step's tokens and may force the
next tokens of a sequence or end it: the thinking budget and the streaming server build on it.

Log-probabilities: :class:`Completion` ``logprobs`` are those of the chosen tokens under the model's own
distribution (temperature 1, no top-k / top-p), computed in the sampler's forward pass; RL states which
log-probs its policy ratio uses (:mod:`thinkfast.rl.rollout`).

Backends: evaluation, RL rollouts and benchmarks generate through a :class:`Backend` (``generate(prompts, params,
*, hook=None, progress=False)`` and ``sync(model)``), never by switching on what they were given:
:class:`LocalBackend` is this engine on an in-process model; :class:`thinkfast.generation.endpoint.Endpoint` is an
OpenAI-compatible server (evaluation only: it cannot take new weights); a vLLM engine is the next one.

Why not ``model.generate``: RL needs per-token log-probs of the sampled tokens, serving and the thinking
budget need control of each step, and our sampler behaves identically across transformers versions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from transformers import DynamicCache

from ..modeling.kvcache import StaticKVCache
from ..modeling import DeciLMForCausalLM


# Sampling limits, vLLM's conventions (vllm/sampling_params.py): a temperature above 0 but below MIN_TEMPERATURE is
# raised to it (logits / 1e-39 overflow float32 to inf, and softmax of inf is NaN); 0 is greedy. Seeds are what
# torch's generators take: [-2**63, 2**64).
MIN_TEMPERATURE = 1e-2
SEED_RANGE = (-(2**63), 2**64)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 = greedy (REFERENCE.md section 7: reasoning-off evaluation); a temperature
    in (0, ``MIN_TEMPERATURE``) is raised to ``MIN_TEMPERATURE``, as vLLM does."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    batch_size: int = 64
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0")
        if 0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed={self.seed} does not fit in 64 bits")


@dataclass
class Completion:
    """One generated continuation: its token ids (stop token included when hit), why it ended
    ("stop" or "length"), and the log-probability of each sampled token under the sampling distribution
    before temperature (i.e. the model's own distribution, as RL needs)."""

    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    # set by a server's completion (thinkfast.generation.endpoint), which returns text and a token count, not token ids
    text: str | None = None
    num_tokens: int | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens generated (the stop token included)."""
        return len(self.token_ids) if self.num_tokens is None else self.num_tokens


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] -> logits with the tokens outside top-k / the top-p nucleus set to -inf. The most likely
    token always stays (a top_p that rounds to 0 in float32 keeps just it, as vLLM's top-p does)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts left-padded into one batch: token ids and a bool mask [n, longest], and position ids that count
    real tokens only (a padded prompt is computed as it would be alone)."""
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0)


class StepView:
    """What a step hook sees after each decoding step, and what it may do: one interface over every engine that
    runs hooks (the rollout engine's batches here, the server's continuous batch in
    :mod:`thinkfast.generation.continuous`).

    ``requests``: the id of each request that produced a token this step (here its index in the prompt list given
    to :func:`generate`); ``tokens``: those tokens; ``step``: the step number (0 = the first generated token).
    :meth:`generated` gives a request's tokens so far (this step's included). :meth:`force` queues tokens that
    replace the request's next sampled tokens (a thinking budget closing ``</think>``); :meth:`ban` keeps tokens
    from being chosen for the request from now on (no second ``<think>``); :meth:`finish` ends a request after
    this step (finish reason ``"stop"``). The engine behind it implements ``step_generated``, ``step_force``,
    ``step_ban`` and ``step_finish``, each taking a request id.
    """

    def __init__(self, engine, step: int, requests: list[int], tokens: list[int]):
        self._engine, self.step, self.requests, self.tokens = engine, step, requests, tokens

    def generated(self, request: int) -> list[int]:
        return self._engine.step_generated(request)

    def force(self, request: int, token_ids: list[int]) -> None:
        self._engine.step_force(request, [int(t) for t in token_ids])

    def ban(self, request: int, token_ids: list[int]) -> None:
        self._engine.step_ban(request, [int(t) for t in token_ids])

    def finish(self, request: int) -> None:
        self._engine.step_finish(request)


class _Batch:
    """One batch of prompts decoded to the end (the engine's state; see :func:`generate`)."""

    def __init__(self, model, requests: list[int], params: SamplingParams):
        self.model, self.params = model, params
        self.device = next(model.parameters()).device
        self.request_of = requests  # local index -> request index
        self.local = {r: i for i, r in enumerate(requests)}
        n = len(requests)
        self.out_tokens = torch.zeros((n, params.max_new_tokens), dtype=torch.long, device=self.device)
        self.out_logp = torch.zeros((n, params.max_new_tokens), dtype=torch.float32, device=self.device)
        self.n_gen = torch.zeros(n, dtype=torch.long, device=self.device)
        self.forced: dict[int, list[int]] = {}
        self.banned: dict[int, set[int]] = {}
        self.finish: set[int] = set()

    # what a StepView asks of this batch (requests by their index in generate()'s prompt list)
    def step_generated(self, request: int) -> list[int]:
        i = self.local[request]
        return self.out_tokens[i, : int(self.n_gen[i])].tolist()

    def step_force(self, request: int, token_ids: list[int]) -> None:
        self.forced.setdefault(self.local[request], []).extend(token_ids)

    def step_ban(self, request: int, token_ids: list[int]) -> None:
        self.banned.setdefault(self.local[request], set()).update(token_ids)

    def step_finish(self, request: int) -> None:
        self.finish.add(self.local[request])

    @torch.no_grad()
    def run(self, prompts: list[list[int]], generator, hook) -> list[Completion]:
        model, params, device = self.model, self.params, self.device
        pad_id = params.stop_token_ids[0] if params.stop_token_ids else 0
        ids, mask, positions = left_padded(prompts, pad_id, device)
        n, width = ids.shape
        total = width + params.max_new_tokens
        ours = isinstance(model, DeciLMForCausalLM)
        # our model: a cache preallocated for the whole batch (attention layers only) and a mask buffer whose
        # views are the per-step masks; any other model (Llama, an older remote code): DynamicCache, 2D masks
        cache = StaticKVCache(total, chunk=total) if ours else DynamicCache()
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        mask_buf = torch.zeros((n, total), dtype=torch.bool, device=device)
        mask_buf[:, :width] = mask
        stop = torch.tensor(list(params.stop_token_ids) or [-1], device=device)
        rows = torch.arange(n, device=device)  # local index of each batch row
        live = torch.ones(n, dtype=torch.bool, device=device)  # rows still generating (others are dead weight)
        reasons = ["length"] * n
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, **{cache_arg: cache},
                       use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
        pos = positions[:, -1]
        for t in range(params.max_new_tokens):
            if self.banned:
                for r, local in enumerate(rows.tolist()):
                    if local in self.banned:
                        logits[r, sorted(self.banned[local])] = float("-inf")
            logp = logits.log_softmax(-1)
            if params.temperature == 0:
                nxt = logits.argmax(-1)
            else:
                filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
                nxt = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
            if self.forced:
                for r, local in enumerate(rows.tolist()):
                    queue = self.forced.get(local)
                    if queue and live[r]:
                        nxt[r] = queue.pop(0)
                self.forced = {k: v for k, v in self.forced.items() if v}
            nxt = torch.where(live, nxt, torch.full_like(nxt, pad_id))
            at = rows[live]
            self.out_tokens[at, t] = nxt[live]
            self.out_logp[at, t] = logp.gather(-1, nxt[:, None]).squeeze(-1)[live]
            self.n_gen[at] += 1
            ended = live & torch.isin(nxt, stop)
            if hook is not None:
                hook(StepView(self, t, [self.request_of[r] for r in at.tolist()], nxt[live].tolist()))
            if self.finish:
                ended |= live & torch.isin(rows, torch.tensor(sorted(self.finish), device=device))
                self.finish.clear()
            for local in rows[ended].tolist():
                reasons[local] = "stop"
                self.forced.pop(local, None)
            live = live & ~ended
            n_live = int(live.sum())
            if n_live == 0 or t + 1 == params.max_new_tokens:
                break
            if n_live <= 0.75 * len(rows):  # finished sequences leave the batch (geometric: little copying)
                keep = live.nonzero().squeeze(1)
                if ours:
                    cache.select(keep)
                else:
                    cache.batch_select_indices(keep)
                mask_buf, rows, pos, nxt, live = mask_buf[keep], rows[keep], pos[keep], nxt[keep], live[keep]
            pos = pos + 1
            col = width + t
            mask_buf[:, col] = True
            if ours:  # (a model without attention layers caches nothing and needs no mask)
                step_mask = mask_buf[:, None, None, : col + 1] if len(cache) else None
            else:
                step_mask = mask_buf[:, : col + 1].long()
            logits = model(input_ids=nxt[:, None], attention_mask=step_mask, position_ids=pos[:, None],
                           **{cache_arg: cache}, use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
        out = []
        for i in range(n):
            k = int(self.n_gen[i])
            out.append(Completion(self.out_tokens[i, :k].tolist(), reasons[i], self.out_logp[i, :k].tolist()))
        return out


def generate(model, prompts: list[list[int]], params: SamplingParams, progress: bool = False,
             hook: Callable[[StepView], None] | None = None) -> list[Completion]:
    """Generate one completion per prompt (token-id lists), in the order given.

    Prompts are processed in batches of ``params.batch_size``, longest first (less padding). ``hook``, when
    given, is called after every decoding step of every batch with a :class:`StepView`.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    was_training = model.training
    model.eval()
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(params.seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Completion | None] = [None] * len(prompts)
    batches = [order[i : i + params.batch_size] for i in range(0, len(order), params.batch_size)]
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="generate", unit="batch")
    try:
        for batch in iterator:
            chunk = [prompts[i] for i in batch]
            for i, c in zip(batch, _Batch(model, batch, params).run(chunk, generator, hook)):
                results[i] = c
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


@runtime_checkable
class Backend(Protocol):
    """What generates completions for evaluation and RL: token-id prompts in, one :class:`Completion` each out, in
    order. ``hook`` is a per-step hook (:class:`StepView`; a backend that cannot run one raises ValueError);
    ``sync(model)`` makes the backend generate with ``model``'s current weights (RL calls it after each update;
    a backend that cannot take weights raises ValueError)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, hook: Callable | None = None,
                 progress: bool = False) -> list[Completion]: ...

    def sync(self, model) -> None: ...


class LocalBackend:
    """The rollout engine (:func:`generate`) on an in-process model. The model is read in place, so training it
    needs no sync; ``sync(model)`` points the backend at another model object."""

    def __init__(self, model):
        self.model = model

    def __repr__(self) -> str:
        return f"LocalBackend({type(self.model).__name__})"

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, hook: Callable | None = None,
                 progress: bool = False) -> list[Completion]:
        return generate(self.model, prompts, params, progress=progress, hook=hook)

    def sync(self, model) -> None:
        self.model = model
