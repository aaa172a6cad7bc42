"""How much of a decode step the blocks explain: the whole model's step against its layers and the fixed
embedding / norm / head, with transformers' DynamicCache and with thinkfast's preallocated cache, side
by side in one process (issue 10, section 3). Two views: the layers run in sequence (what the model
adds around them: loop, masks, casts, output), and each layer timed alone (as the costs stage times
blocks: its weights and cache stay warm, so the sum comes out lower than the same layers in sequence).

Puzzle can only remove block time; what the blocks do not explain is overhead every child pays. One
step = one new token per sequence over ``--context`` cached tokens at ``--batch`` sequences; each time
is the median of ``--repeats`` calls, in ``--rounds`` interleaved passes, median over passes. With
DynamicCache the cache is rebuilt for each timed step (as the costs stage did before it had the
preallocated cache, and as a fresh generate() call does), which is what a step costs there.

    python benchmarks/decode_overhead.py [--model runs/nano/pretrain/model] [--batch 16] [--context 256]
    -> benchmarks/results/decode_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from thinkfast.modeling.kvcache import StaticKVCache
from thinkfast.artifacts import load_decilm


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/nano/pretrain/model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/decode_overhead.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    m = load_decilm(args.model)
    conf, inner, b, ctx = m.config, m.model, args.batch, args.context
    slots = [layer.attention_spec.num_kv_heads(conf.num_attention_heads) for layer in inner.layers
             if layer.attention_spec.kind == "gqa"]
    kvs = [torch.randn(b, h, ctx, conf.head_dim) for h in slots]
    static = StaticKVCache(ctx + 1)
    for slot, kv in enumerate(kvs):
        static.update(kv, kv, slot)
    ids = torch.randint(0, conf.vocab_size, (b, 1))
    pos = torch.full((b, 1), ctx)
    x = torch.randn(b, 1, conf.hidden_size)
    cos, sin = inner.rotary_emb(x, pos)

    def whole_dynamic():
        cache = DynamicCache()
        for slot, kv in enumerate(kvs):
            cache.update(kv, kv, slot)
        m(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)

    def whole_static():
        static.truncate_to(ctx)
        m(input_ids=ids, position_ids=pos, past_key_values=static, use_cache=True)

    def layer_fn(layer):
        def run():
            static.truncate_to(ctx)
            layer(x, cos, sin, None, static)
        return run

    def fixed():
        m.lm_head(inner.norm(inner.embed_tokens(ids)))

    def layers_in_sequence():
        static.truncate_to(ctx)
        h = x
        for layer in inner.layers:
            h = layer(h, cos, sin, None, static)

    def rotary():
        inner.rotary_emb(x, pos)

    parts = {"whole_dynamic": whole_dynamic, "whole_static": whole_static, "fixed": fixed,
             "layers_in_sequence": layers_in_sequence, "rotary": rotary,
             **{f"layer_{i}": layer_fn(layer) for i, layer in enumerate(inner.layers)}}
    passes = [{k: timed(f, args.repeats) for k, f in parts.items()} for _ in range(args.rounds)]
    t = {k: statistics.median(p[k] for p in passes) for k in parts}
    explained = t["fixed"] + sum(v for k, v in t.items() if k.startswith("layer_"))
    out = {
        "cpu": f"{cpu_name()} ({torch.get_num_threads()} threads)", "torch": torch.__version__,
        "model": args.model, "batch": b, "context": ctx, "layers": conf.num_hidden_layers,
        "step_ms_dynamic_cache": 1e3 * t["whole_dynamic"], "step_ms_static_cache": 1e3 * t["whole_static"],
        "speedup_static_over_dynamic": t["whole_dynamic"] / t["whole_static"],
        # what the model adds around its layers (loop, masks, casts, output): layers run in sequence
        "outside_layers_share_static": 1 - (t["layers_in_sequence"] + t["fixed"] + t["rotary"]) / t["whole_static"],
        "outside_layers_share_dynamic": 1 - (t["layers_in_sequence"] + t["fixed"] + t["rotary"]) / t["whole_dynamic"],
        # what per-block timing (the costs stage: each block alone, warm caches) leaves unexplained
        "explained_by_isolated_blocks_ms": 1e3 * explained,
        "unexplained_by_isolated_blocks_static": 1 - explained / t["whole_static"],
        "unexplained_by_isolated_blocks_dynamic": 1 - explained / t["whole_dynamic"],
        "times_ms": {k: 1e3 * v for k, v in t.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "times_ms"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
