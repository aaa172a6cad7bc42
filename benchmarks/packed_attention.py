"""Packed attention against the dense block-diagonal mask: a nano pretraining step (8 rows x 512 tokens of documents
that each attend only to themselves, forward + backward + AdamW, float32) with ``PackedLayout`` and with the same
rule as a dense mask, side by side on the same batches (rounds interleaved, median step time per side).

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
    from thinkfast.data import DataConfig, doc_attention
    from thinkfast.nano.tokenizer import build_tokenizer
    from thinkfast.puzzle.timing import device_name
    from thinkfast.stages.pretrain import PretrainConfig, _optimizer, build_parent, make_batch
    from thinkfast.train.loop import optimizer_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per side and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/packed_attention.json")
    args = ap.parse_args(argv)
    cfg = PretrainConfig()  # the nano parent: 8 layers, hidden 96, 6 heads of 16
    data = DataConfig(kinds=["add", "sub", "mul", "word", "word"], digits=[1, 2, 2], steps=[2], think_fraction=0.75,
                      held_out=0.1, doc_mask=True)  # configs/nano.yaml's mix
    tok = build_tokenizer()
    eos = data.doc_eos(tok)
    model = build_parent(cfg, tok)
    opt = _optimizer(model, cfg)
    batches = [make_batch(cfg, data, tok, s) for s in range(100, 100 + args.steps)]

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
    for _ in range(args.rounds):
        for side in ("packed", "dense"):
            for b in batches:
                t = time.perf_counter()
                step(b, side == "packed")
                times[side].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"device": device_name(torch.device("cpu")), "torch": torch.__version__, "rows": cfg.batch_size,
           "seq_len": cfg.seq_len, "steps": len(times["packed"]), "step_s": med,
           "speedup": med["dense"] / med["packed"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"pretraining step: packed {med['packed']:.3f} s, dense mask {med['dense']:.3f} s "
          f"({out['speedup']:.2f}x) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
