"""Packed attention against the dense block-diagonal mask: a nano pretraining step (8 rows x 512 tokens of documents
that each attend only to themselves, forward + backward + AdamW, float32) with ``PackedLayout`` and with the same
rule as a dense mask, side by side: each batch both ways back to back, the order alternating per round; the median of the pairs' ratios.

    python benchmarks/packed_attention.py [--steps 10] [--rounds 3] -> benchmarks/results/packed_attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkfast.data import DataConfig, doc_attention
    from thinkfast.modeling.packed import use_packed_attention
    from thinkfast.nano.corpus import packed_rows
    from thinkfast.nano.tokenizer import build_tokenizer
    from thinkfast.puzzle.timing import device_name
    from thinkfast.train.loop import adamw, optimizer_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per side and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/packed_attention.json")
    args = ap.parse_args(argv)
    data = DataConfig(kinds=["add", "sub", "mul", "word", "word"], digits=[1, 2, 2], steps=[2], think_fraction=0.75,
                      held_out=0.1, doc_mask=True)  # configs/nano.yaml's mix
    tok = build_tokenizer()
    eos = data.doc_eos(tok)
    torch.manual_seed(0)
    model = use_packed_attention(LlamaForCausalLM(LlamaConfig(  # the nano parent's shape (configs/nano.yaml)
        vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=8, num_attention_heads=6,
        num_key_value_heads=6, max_position_embeddings=2048, tie_word_embeddings=True)))
    opt = adamw(model, lr=4e-3, weight_decay=0.1)
    rows, seq_len = 8, 512
    batches = [packed_rows(tok, random.Random(f"bench:{s}"), rows, seq_len + 1, **data.mix()) for s in range(args.steps)]

    def step(b, packed: bool):
        x = b[:, :-1]
        kw = doc_attention(x, eos)
        if not packed:
            kw.pop("packed_layout")
        out = model(input_ids=x, **kw)
        loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]),
                                                 b[:, 1:].reshape(-1))
        optimizer_step(opt, loss, clip=1.0)

    step(batches[0], True), step(batches[0], False)  # warm-up
    times = {"packed": [], "dense": []}
    ratios = []
    for r in range(args.rounds):  # each batch both ways back to back, the order alternating: drift cancels
        for b in batches:
            one = {}
            for side in (("packed", "dense") if r % 2 == 0 else ("dense", "packed")):
                t = time.perf_counter()
                step(b, side == "packed")
                one[side] = time.perf_counter() - t
                times[side].append(one[side])
            ratios.append(one["dense"] / one["packed"])
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"device": device_name(torch.device("cpu")), "torch": torch.__version__, "rows": rows, "seq_len": seq_len,
           "steps": len(times["packed"]), "step_s": med, "speedup": statistics.median(ratios),
           "speedup_quartiles": statistics.quantiles(ratios, n=4)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"pretraining step: packed {med['packed']:.3f} s, dense mask {med['dense']:.3f} s; median of pairs "
          f"{out['speedup']:.2f}x (quartiles {out['speedup_quartiles'][0]:.2f}-{out['speedup_quartiles'][2]:.2f}) "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
