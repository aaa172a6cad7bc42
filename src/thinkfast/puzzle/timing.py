"""Timing a model the way the costs stage does: median of ``repeats`` calls after ``warmup`` calls.

Shared by the ``costs`` stage (blocks, whole probe models) and the ``search`` stage (the child it chose,
measured against its parent). Decode steps run in a preallocated KV cache (``thinkfast.modeling.kvcache``), as a
serving engine keeps one: one new token per sequence over ``decode_context`` cached tokens.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..modeling.kvcache import StaticKVCache

__all__ = ["device_name", "median_time", "paired_speedup", "whole_model_times"]


def device_name(device: torch.device) -> str:
    """The device costs are measured on, as recorded in costs.json (a CPU measurement uses every core)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}: {name} ({max(1, os.cpu_count() or 1)} threads)"


def median_time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _step(model, kind: str, batch: int, prefill_len: int, decode_context: int, dtype: torch.dtype,
          device: torch.device):
    """A function running one timed call of ``model``: a prefill, or a decode step in a preallocated cache."""
    conf = model.config
    if kind == "prefill_s":
        ids = torch.randint(0, conf.vocab_size, (batch, prefill_len), device=device)
        return lambda: model(input_ids=ids, use_cache=False)
    kv_heads = [layer.attention_spec.num_kv_heads(conf.num_attention_heads) for layer in model.model.layers
                if layer.attention_spec.kind == "gqa"]
    x1 = torch.randint(0, conf.vocab_size, (batch, 1), device=device)
    pos1 = torch.full((batch, 1), decode_context, device=device)
    cache = StaticKVCache(decode_context + 1)
    for slot, h in enumerate(kv_heads):
        kv = torch.randn(batch, h, decode_context, conf.head_dim, device=device, dtype=dtype)
        cache.update(kv, kv, slot)

    def decode():
        cache.truncate_to(decode_context)
        return model(input_ids=x1, position_ids=pos1, past_key_values=cache, use_cache=True)

    return decode


@torch.no_grad()
def paired_speedup(base, other, kind: str, batch: int, prefill_len: int, decode_context: int, dtype: torch.dtype,
                   device: torch.device, warmup: int = 3, pairs: int = 40, budget_s: float = 20.0,
                   min_pairs: int = 8) -> float:
    """How many times faster ``other`` runs than ``base``: the median over ``pairs`` back-to-back pairs of
    calls of (base's time / other's time). Pairing cancels the slow and fast phases of a busy or noisy
    machine: here it gave 1.60-1.74 for a pair whose separately timed medians gave 1.49-2.35. Stops
    after ``budget_s`` once ``min_pairs`` pairs are done. Both models run in ``dtype`` on ``device`` and are put
    back in float32."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base, other = base.to(device=device, dtype=dtype), other.to(device=device, dtype=dtype)
    fa = _step(base, kind, batch, prefill_len, decode_context, dtype, device)
    fb = _step(other, kind, batch, prefill_len, decode_context, dtype, device)
    for _ in range(warmup):
        fa()
        fb()
    ratios, start = [], time.perf_counter()
    for _ in range(pairs):
        sync()
        t0 = time.perf_counter()
        fa()
        sync()
        t1 = time.perf_counter()
        fb()
        sync()
        ratios.append((t1 - t0) / max(time.perf_counter() - t1, 1e-12))
        if len(ratios) >= min_pairs and time.perf_counter() - start > budget_s:
            break
    base.float()
    other.float()
    return statistics.median(ratios)


@torch.no_grad()
def whole_model_times(model, batch_sizes: Sequence[int], prefill_len: int, decode_context: int, dtype: torch.dtype,
                      device: torch.device, warmup: int, repeats: int) -> dict:
    """``{kind: {str(batch): seconds}}`` of a DeciLM model: a prefill of ``prefill_len`` tokens
    (``prefill_s``) and one decode step over ``decode_context`` cached tokens (``decode_s``). The model
    is run in ``dtype`` and put back in float32 afterwards."""
    model = model.to(dtype)
    out = {"prefill_s": {}, "decode_s": {}}
    for b in batch_sizes:
        for kind in out:
            out[kind][str(b)] = median_time(_step(model, kind, b, prefill_len, decode_context, dtype, device), device,
                                            warmup, repeats)
    model.float()
    return out


@torch.no_grad()
def interleaved_throughput(models: dict, batch_sizes: Sequence[int], prefill_len: int, decode_context: int,
                           device: torch.device, rounds: int = 5, warmup: int = 2) -> dict:
    """Prefill and decode tokens per second of several DeciLM models, measured side by side: in each of
    ``rounds`` rounds every model runs once per kind and batch size, and each model's median over the rounds
    is kept (a busy machine's slow phases hit every model alike). ``{name: {"prefill_tok_s@B": x,
    "decode_tok_s@B": y}}``: a prefill of ``prefill_len`` tokens per sequence, one decode step over
    ``decode_context`` cached tokens."""
    steps = {(name, kind, b): _step(m, kind, b, prefill_len, decode_context, torch.float32, device)
             for name, m in models.items() for b in batch_sizes for kind in ("prefill_s", "decode_s")}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict = {key: [] for key in steps}
    for _ in range(rounds):
        for key, fn in steps.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t)
    out: dict = {name: {} for name in models}
    for (name, kind, b), ts in times.items():
        tokens = b * (prefill_len if kind == "prefill_s" else 1)
        out[name][f"{kind[:-2]}_tok_s@{b}"] = tokens / statistics.median(ts)
    return out
