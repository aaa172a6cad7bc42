"""Peak memory of the RL log-probs (forward and backward) with the LM head in slices against the whole batch at once.

GRPO, RLOO and RPO take each completion token's log-prob under the policy (:func:`thinkfast.rl.rollout.token_logprobs`).
Done whole, the batch's full-vocabulary logits exist at once, several times over (the head's output, its float32
copy, the log-softmax, their gradients): at SmolLM2's 49k vocabulary that was most of GRPO's 14 GiB peak on the
135M model (docs/LOG.md session 15). :func:`~thinkfast.rl.rollout.picked_logprobs` runs the head on a slice of rows at
a time and recomputes each slice's logits in the backward pass. This measures, each variant in a fresh process, the
rise in peak resident memory over the loaded model for one forward and backward pass of a rollout batch, and its time,
on a SmolLM2-135M-shaped Llama (hidden 576, 9 heads and 3 KV heads, FFN 1536, vocabulary 49,152, tied embeddings)
with ``--layers`` of its 30 layers (the head's share is what changes; random weights):

    python benchmarks/logprob_memory.py [--rows 16] [--prompt 64] [--completion 448] [--layers 4]
        -> benchmarks/results/logprob_memory.json

``whole``: one slice (the head over the whole batch, as before); ``sliced``: the default budget
(:data:`thinkfast.rl.rollout.LOGITS_BUDGET` logits a slice).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def child(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from thinkfast.rl.rollout import LOGITS_BUDGET, token_logprobs

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).train()
    t = args.prompt + args.completion
    ids = torch.randint(0, cfg.vocab_size, (args.rows, t))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(t).expand(args.rows, t).contiguous()}
    budget = {"whole": 2 ** 62, "sliced": LOGITS_BUDGET}[args.variant]
    before = _rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    lp = token_logprobs(model, batch, args.prompt, budget=budget)
    lp[:, args.prompt:].sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.variant, "budget": budget if args.variant == "sliced" else None,
            "rss_before_mib": round(before, 1), "peak_before_mib": round(peak_before, 1),
            "peak_mib": round(peak, 1), "rise_mib": round(peak - before, 1), "seconds": round(seconds, 2),
            "logits_one_copy_mib": round(args.rows * args.completion * cfg.vocab_size * 4 / 2 ** 20, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=448)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per variant, alternating")
    ap.add_argument("--variant", choices=["whole", "sliced"], help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--out", default="benchmarks/results/logprob_memory.json")
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return 0
    runs = []
    for r in range(args.repeats):
        for variant in ("whole", "sliced"):
            cmd = [sys.executable, __file__, "--variant", variant, "--rows", str(args.rows), "--prompt",
                   str(args.prompt), "--completion", str(args.completion), "--layers", str(args.layers)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs.append({"repeat": r, **json.loads(out)})
            print(runs[-1], flush=True)
    summary = {v: {"rise_mib": min(x["rise_mib"] for x in runs if x["variant"] == v),
                   "seconds": min(x["seconds"] for x in runs if x["variant"] == v)} for v in ("whole", "sliced")}
    summary["rise_ratio"] = round(summary["sliced"]["rise_mib"] / summary["whole"]["rise_mib"], 3)
    summary["time_ratio"] = round(summary["sliced"]["seconds"] / summary["whole"]["seconds"], 3)
    result = {"argv": sys.argv[1:], "machine": platform.processor() or platform.machine(),
              "shape": {"rows": args.rows, "prompt": args.prompt, "completion": args.completion, "layers": args.layers},
              "runs": runs, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary), f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
