"""Rollout engine vs transformers' `generate()`: decode throughput, side by side in one process.

Two workloads, on the same model and prompts, rounds alternating to even out machine noise:

- ``rollout``: the trained nano parent (``--model``, default runs/nano/pretrain/model) answering a batch of
  nano problems step by step (1-2 digits, every kind), greedy, stopping at end-of-text: responses differ
  in length, as RL rollouts and evaluation batches do. Tokens/s counts the tokens each sequence generated
  up to and including its stop token; the benchmark checks that both produce the same tokens.
- ``fixed``: the same prompts with no stop token and ``--fixed-tokens`` new tokens each: identical work
  for both (the per-step cost alone).

Writes benchmarks/results/sampler.json.

    python benchmarks/sampler.py [--model DIR] [--batch 64] [--max-new-tokens 600] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import thinkfast
from thinkfast.generation import SamplingParams, generate
from thinkfast.nano import tasks
from thinkfast.artifacts import load_decilm
from thinkfast.toggle import stop_token_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/nano/pretrain/model")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=600)
    ap.add_argument("--fixed-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler.json"))
    args = ap.parse_args()
    model = load_decilm(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    rng = random.Random(0)
    problems = [tasks.sample_problem(rng, rng.choice(tasks.KINDS), rng.choice((1, 2)), 2) for _ in range(args.batch)]
    prompts = [tok(tasks.text_prompt(p, "think"), add_special_tokens=False)["input_ids"] for p in problems]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stops = tuple(stop_token_ids(tok))
    results: dict = {}
    for name, new, stop in (("rollout", args.max_new_tokens, stops), ("fixed", args.fixed_tokens, ())):
        params = SamplingParams(max_new_tokens=new, batch_size=args.batch, stop_token_ids=stop)

        def ours():
            return [c.token_ids for c in generate(model, prompts, params)]

        def hf():
            kw = {"eos_token_id": list(stop), "pad_token_id": stop[0]} if stop else {
                "eos_token_id": None, "pad_token_id": 0, "min_new_tokens": new}
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **kw)
            seqs = []
            for row in out[:, width:].tolist():
                if stop:
                    cut = next((i for i, t in enumerate(row) if t in stop), len(row) - 1)
                    row = row[:cut + 1]
                seqs.append(row)
            return seqs

        a, b = ours(), hf()  # warm-up, and the check that both generate the same tokens
        same = sum(x == y for x, y in zip(a, b)) / len(a)
        tokens = sum(map(len, a))
        times = {"thinkfast": [], "transformers.generate": []}
        for _ in range(args.rounds):
            for key, fn in (("thinkfast", ours), ("transformers.generate", hf)):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {"max_new_tokens": new, "stop": bool(stop), "generated_tokens": tokens,
                         "mean_length": tokens / len(a), "longest": max(map(len, a)),
                         "same_tokens_share": same, "median_seconds": med,
                         "tokens_per_second": {k: tokens / v for k, v in med.items()},
                         "speedup_vs_transformers": med["transformers.generate"] / med["thinkfast"]}
        print(name, json.dumps(results[name]), flush=True)
    out = {"model": args.model, "params": sum(p.numel() for p in model.parameters()), "batch": args.batch,
           "rounds": args.rounds, "workloads": results, "torch": torch.__version__, "thinkfast": thinkfast.__version__,
           "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
