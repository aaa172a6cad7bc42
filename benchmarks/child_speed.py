"""A Puzzle child's decode speedup over its parent, three ways, side by side on this machine: the search's
back-to-back pairs of one decode step (``paired_speedup``: what the costs are fitted to and the search verifies),
the eval stage's interleaved rounds of one step (``interleaved_throughput``), and the rollout engine generating
``--new`` tokens for 16 prompts of 256 tokens (greedy, no stop; parent and child alternating, the median over
``--rounds`` of the ratio of wall times: decode as a server runs it, with the engine's per-step work).

    python benchmarks/child_speed.py --run runs/nano [--child runs/nano/distill/model] [--also DIR ...]
    -> benchmarks/results/child_speed.json
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
    from thinkfast.artifacts import load_decilm
    from thinkfast.generation.sampler import SamplingParams, generate
    from thinkfast.puzzle.timing import device_name, interleaved_throughput, paired_speedup

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/nano")
    ap.add_argument("--child", help="default: RUN/distill/model")
    ap.add_argument("--also", nargs="*", default=[], help="other children (folders) measured the same way")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/child_speed.json")
    args = ap.parse_args(argv)
    run, dev = Path(args.run), torch.device("cpu")
    parent = load_decilm(run / "pretrain" / "model")
    children = {str(p): load_decilm(p) for p in [args.child or run / "distill" / "model", *args.also]}
    prompts = torch.randint(10, parent.config.vocab_size, (args.batch, 256),
                            generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=args.new, temperature=0.0, batch_size=args.batch)

    def wall(model) -> float:
        t = time.perf_counter()
        generate(model, prompts, params)
        return time.perf_counter() - t

    out = {"device": device_name(dev), "batch": args.batch, "new_tokens": args.new, "rounds": args.rounds,
           "children": {}}
    for model in (parent, *children.values()):
        wall(model)  # warm-up
    inter = interleaved_throughput({"parent": parent, **children}, [args.batch], 256, 256, dev, rounds=40)
    key = f"decode_tok_s@{args.batch}"
    for name, child in children.items():
        pairs = [paired_speedup(parent, child, "decode_s", args.batch, 256, 256, torch.float32, dev)
                 for _ in range(2)]
        gen = []
        for _ in range(args.rounds):
            tp = wall(parent)
            gen.append(tp / wall(child))
        out["children"][name] = {"paired_step": pairs, "interleaved_step_40_rounds": inter[name][key] / inter["parent"][key],
                                 "engine_generation": statistics.median(gen), "engine_generation_rounds": gen}
        print(f"{name}: paired {' / '.join(f'{p:.2f}' for p in pairs)}x, interleaved "
              f"{out['children'][name]['interleaved_step_40_rounds']:.2f}x, engine {statistics.median(gen):.2f}x "
              f"({', '.join(f'{g:.2f}' for g in gen)})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
