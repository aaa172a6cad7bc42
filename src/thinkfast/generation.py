"""The one batched sampler that evaluation, RL rollouts and serving share.

``generate(model, prompts, params)`` takes token-id prompts of any lengths, left-pads them, prefills
once with a KV cache and decodes token by token: greedy (temperature 0) or temperature / top-p / top-k
sampling, per-sequence stop tokens and a token budget. It works with any causal LM whose forward takes
``input_ids, attention_mask, position_ids`` and a KV cache (``cache``, or ``past_key_values`` before
transformers 5.24) (the nemotron-nas model and
``LlamaForCausalLM``). Position ids count real tokens only, so a left-padded prompt is computed exactly
as it would be alone.

Why not ``model.generate``: RL needs per-token log-probs of the sampled tokens, serving and the thinking
budget need control of each step, and our sampler behaves identically across transformers versions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .kvcache import StaticKVCache
from .modeling import DeciLMForCausalLM


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 = greedy (REFERENCE.md section 7: reasoning-off evaluation)."""

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
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


@dataclass
class Completion:
    """One generated continuation: its token ids (stop token included when hit), why it ended
    ("stop" or "length"), and the log-probability of each sampled token under the sampling distribution
    before temperature (i.e. the model's own distribution, as RL needs)."""

    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] -> logits with the tokens outside top-k / the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


@torch.no_grad()
def _generate_batch(model, prompts: list[list[int]], params: SamplingParams, generator) -> list[Completion]:
    device = next(model.parameters()).device
    pad_id = params.stop_token_ids[0] if params.stop_token_ids else 0
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # thinkfast's own nemotron-nas model gets the preallocated cache (no copy of the whole cache per step);
    # any other model (Llama, or an older nemotron-nas remote code) transformers' DynamicCache
    cache = StaticKVCache(width + params.max_new_tokens) if isinstance(model, DeciLMForCausalLM) else DynamicCache()
    # transformers >= 5.24 names the argument ``cache``; older releases ``past_key_values``
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    stop = torch.tensor(list(params.stop_token_ids) or [-1], device=device)
    n = len(prompts)
    out_tokens = torch.zeros((n, params.max_new_tokens), dtype=torch.long, device=device)
    out_logp = torch.zeros((n, params.max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    n_gen = torch.zeros(n, dtype=torch.long, device=device)
    step_ids, step_pos = ids, positions
    for t in range(params.max_new_tokens):
        logits = model(
            input_ids=step_ids, attention_mask=mask, position_ids=step_pos, **{cache_arg: cache},
            use_cache=True, logits_to_keep=1,
        ).logits[:, -1, :].float()
        logp = logits.log_softmax(-1)
        if params.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            filtered = _filter_logits(logits / params.temperature, params.top_k, params.top_p)
            nxt = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out_tokens[:, t] = nxt
        out_logp[:, t] = logp.gather(-1, nxt[:, None]).squeeze(-1)
        n_gen += (~done).long()
        real = ~done  # this step's token is a real token (not padding after a finished sequence)
        done = done | torch.isin(nxt, stop)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, real.long()[:, None]], dim=1)
    results = []
    for i in range(n):
        k = int(n_gen[i])
        toks = out_tokens[i, :k].tolist()
        reason = "stop" if toks and toks[-1] in params.stop_token_ids else "length"
        results.append(Completion(toks, reason, out_logp[i, :k].tolist()))
    return results


def generate(model, prompts: list[list[int]], params: SamplingParams, progress: bool = False) -> list[Completion]:
    """Generate one completion per prompt (token-id lists), in the order given.

    Prompts are processed in batches of ``params.batch_size``, longest first (less padding).
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
            for i, c in zip(batch, _generate_batch(model, [prompts[i] for i in batch], params, generator)):
                results[i] = c
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
