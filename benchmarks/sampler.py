"""Shared sampler vs transformers' `generate()`: decode throughput, side by side in one process.

Both decode the same left-padded batch greedily for a fixed number of new tokens (no stop token, so the
work is identical) on the same nemotron-nas model; rounds alternate to even out machine noise. The
model is the nano parent's shape (converted to nemotron-nas) with random weights, or a trained model
folder given with --model. Writes benchmarks/results/sampler.json.

    python benchmarks/sampler.py [--model DIR] [--batch 64] [--new-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import thinkfast
from thinkfast.convert import convert_llama_model
from thinkfast.generation import SamplingParams, generate


def nano_shaped_model(vocab: int = 104):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=2048)
    torch.manual_seed(0)
    return convert_llama_model(LlamaForCausalLM(cfg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler.json"))
    args = ap.parse_args()
    model = (AutoModelForCausalLM.from_pretrained(args.model) if args.model else nano_shaped_model()).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90, (int(n),), generator=g).tolist()
               for n in torch.randint(12, 40, (args.batch,), generator=g)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    params = SamplingParams(max_new_tokens=args.new_tokens, batch_size=args.batch)

    def ours():
        return generate(model, prompts, params)

    def hf():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)

    ours(), hf()  # warm-up
    times = {"thinkfast.generate": [], "transformers.generate": []}
    for _ in range(args.rounds):
        for name, fn in (("thinkfast.generate", ours), ("transformers.generate", hf)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = args.batch * args.new_tokens
    result = {
        "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "model": args.model or "nano-shaped random (1.6M params, nemotron-nas)",
        "median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "tokens_per_second": {k: tokens / statistics.median(v) for k, v in times.items()},
        "speedup_vs_transformers": statistics.median(times["transformers.generate"]) / statistics.median(times["thinkfast.generate"]),
        "torch": torch.__version__, "thinkfast": thinkfast.__version__, "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
