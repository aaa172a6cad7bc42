"""Puzzle-like random MIP instances (benchmarks and tests share them).

Each layer has 6 attention options (GQA with 8 / 4 / 2 / 1 KV heads, linear, no-op) x 9 FFN options
(width 100 / 87 / 75 / 50 / 25 / 20 / 10 %, linear, no-op) = 54 variants, variant 0 being the parent
block. Costs follow a Llama-70B-shaped layer (hidden 8192, 64 heads of 128, FFN 28672) at batch 64 x
4096 tokens: parameter + KV-cache memory, decode runtime (memory-bound: bytes read per step) and KV
cache. Scores imitate replace-1-block KL: zero for the parent, growing with how much is removed,
scaled by a random per-layer sensitivity (some layers matter far more than others, as measured in
the paper) and with noise, so the instances are neither additive nor trivially ordered.
"""

from __future__ import annotations

import numpy as np

H, HEADS, HEAD_DIM, FFN = 8192, 64, 128, 28672
BATCH, SEQ, BYTES = 64, 4096, 2
ATTENTION = [("gqa", 8), ("gqa", 4), ("gqa", 2), ("gqa", 1), ("linear", 0), ("no_op", 0)]
FFN_OPTIONS = [("ffn", f) for f in (1.0, 0.87, 0.75, 0.5, 0.25, 0.2, 0.1)] + [("linear", 0), ("no_op", 0)]


def _attention_cost(kind, kv):
    if kind == "gqa":
        params = H * HEADS * HEAD_DIM * 2 + H * kv * HEAD_DIM * 2
        kv_bytes = BATCH * SEQ * 2 * kv * HEAD_DIM * BYTES
    elif kind == "linear":
        params, kv_bytes = H * H, 0
    else:
        params, kv_bytes = 0, 0
    return params * BYTES, kv_bytes


def _ffn_params(kind, frac):
    if kind == "ffn":
        width = int(np.ceil(FFN * frac / 256) * 256)
        return 3 * H * width * BYTES
    return H * H * BYTES if kind == "linear" else 0


def instance(layers: int, seed: int, tightness: float = 0.52, family: str = "spread"):
    """``(scores, costs, limits)`` for ``layers`` layers; limits at ``tightness`` of the parent.

    ``family="spread"``: per-layer sensitivities lognormal with sigma 1, costs identical in every layer.
    ``family="real"``: shaped like a real parent's measurements: sensitivities less spread (sigma 0.6),
    measured runtimes with a few percent of noise per layer and variant, limits memory 55% / runtime
    55% / KV cache 50% of the parent (``tightness`` is ignored). ``family="flat"``: as ``real``, with layers
    nearly alike (sigma 0.3), little score noise (3%) and 5% runtime noise: many near-tied architectures,
    the hard case for a bound."""
    if family not in ("spread", "real", "flat"):
        raise ValueError(f"family {family!r}: choose spread, real or flat")
    rng = np.random.default_rng(seed)
    sigma = {"real": 0.6, "flat": 0.3}.get(family, 1.0)
    a_cost = np.array([_attention_cost(k, kv) for k, kv in ATTENTION], dtype=np.float64)  # [6, 2]
    f_params = np.array([_ffn_params(k, f) for k, f in FFN_OPTIONS], dtype=np.float64)  # [9]
    params = (a_cost[:, 0][:, None] + f_params[None, :]).reshape(-1)  # [54]
    kv = np.repeat(a_cost[:, 1], len(FFN_OPTIONS))
    # runtime: a prefill of SEQ tokens (compute-bound: FLOPs / 990e12, attention's T^2 term independent of
    # the KV-head count) plus BATCH decode steps' worth of reads (memory-bound: bytes / 3.35e12)
    T = SEQ
    a_flops = np.array([4 * T * H * H + 4 * T * H * kv * HEAD_DIM + 4 * T * T * H if k == "gqa" else
                        (2 * T * H * H if k == "linear" else 0) for k, kv in ATTENTION], dtype=np.float64)
    f_flops = np.array([6 * T * H * (_ffn_params(k, f) / (3 * H * BYTES)) if k == "ffn" else
                        (2 * T * H * H if k == "linear" else 0) for k, f in FFN_OPTIONS], dtype=np.float64)
    flops = (a_flops[:, None] + f_flops[None, :]).reshape(-1)
    runtime = flops / 990e12 + (params + kv) / 3.35e12
    # removed fraction of each sub-block -> damage, per-layer sensitivity
    a_loss = np.array([0.0, 0.05, 0.15, 0.4, 0.7, 1.0])
    f_loss = np.array([0.0, 0.04, 0.1, 0.3, 0.6, 0.7, 0.85, 0.9, 1.0])
    a_sens = rng.lognormal(-1.0, sigma, layers)[:, None]
    f_sens = rng.lognormal(-0.5, sigma, layers)[:, None]
    base = (a_sens * a_loss[None, :])[:, :, None] + (f_sens * f_loss[None, :])[:, None, :]  # [L, 6, 9]
    inter = 0.3 * np.sqrt(a_sens * f_sens)[:, :, None] * a_loss[None, :, None] * f_loss[None, None, :]
    noise = rng.lognormal(0.0, 0.03 if family == "flat" else 0.15, base.shape)
    scores = ((base + inter) * noise).reshape(layers, -1)
    scores[:, 0] = 0.0
    costs = {
        "memory": np.tile(params + kv, (layers, 1)),
        "runtime": np.tile(runtime, (layers, 1)),
        "kv_cache": np.tile(kv, (layers, 1)),
    }
    # vary the tightness per constraint so that all three bind somewhere in the 50-55% band
    t = {"memory": tightness, "runtime": tightness + 0.01, "kv_cache": tightness + 0.03}
    if family in ("real", "flat"):
        costs["runtime"] = costs["runtime"] * rng.lognormal(0.0, 0.05 if family == "flat" else 0.03,
                                                            costs["runtime"].shape)
        costs["runtime"][:, 0] = runtime[0]  # the parent's own blocks: the limits' reference
        t = {"memory": 0.55, "runtime": 0.55, "kv_cache": 0.50}
    limits = {k: float(v[:, 0].sum() * t[k]) for k, v in costs.items()}
    return scores, costs, limits
