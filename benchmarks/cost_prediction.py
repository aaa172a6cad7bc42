"""How well a costs file predicts whole-model speed: children the search did not pick, predicted against measured.

Draws ``--children`` random children of the parent under ``structure: layers`` (each layer removed whole, or kept
with its FFN and its attention or a variant with fewer KV heads; ``--structure layers_ffn``: its FFN may also be
narrower), predicts each one's speedup from the run's costs
(``thinkfast.puzzle.assemble.build_problem``: blocks + fixed part + the parent's unexplained overhead, exactly what
the search uses) and times it against the parent here in back-to-back pairs (``paired_speedup``, the search's own
verification). Weights do not change a CPU's timing, so the children are random-initialised from their configs.
Writes ``benchmarks/results/cost_prediction.json``: per child its layers, predicted and measured speedup and the
ratio, and the median / worst absolute error.

    python benchmarks/cost_prediction.py --run runs/nano [--costs FILE] [--children 12] [--structure layers_ffn]
                                         [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    from thinkfast.artifacts import load_decilm, read_costs, read_library, read_scores
    from thinkfast.modeling import DeciLMForCausalLM
    from thinkfast.puzzle.assemble import build_problem, restrict
    from thinkfast.puzzle.costs import child_config
    from thinkfast.puzzle.timing import device_name, paired_speedup

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/nano", help="a run directory with library, scores and costs done")
    ap.add_argument("--costs", help="a costs.json to test instead of the run's")
    ap.add_argument("--children", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--structure", default="layers", help="the search's structure the children are drawn from "
                    "(layers, layers_ffn)")
    ap.add_argument("--out", default="benchmarks/results/cost_prediction.json")
    args = ap.parse_args(argv)
    run = Path(args.run)
    lib = read_library(run / "library" / "library")
    costs = read_costs(Path(args.costs) if args.costs else run / "costs" / "costs.json", lib)
    scores = read_scores(run / "scores" / "scores.json", lib)
    problem = restrict(build_problem(lib, scores, costs), args.structure)
    parent = load_decilm(run / "pretrain" / "model")
    batch = max(int(b) for b in costs["batch_sizes"])
    key = f"decode_s@{batch}"
    p_pred = problem.totals(problem.parent_choice)[key]
    rng = random.Random(args.seed)
    allowed = [[k for k in range(problem.scores.shape[1]) if np.isfinite(problem.scores[i, k])]
               for i in range(len(problem.names))]
    rows = []
    tried = set()
    while len(rows) < args.children:
        keep = rng.randint(1, len(allowed) - 1)
        kept = set(rng.sample(range(len(allowed)), keep))
        choice = []
        for i, ks in enumerate(allowed):
            noop = [k for k in ks if problem.names[i][k] == ("no_op", "no_op")]
            live = [k for k in ks if problem.names[i][k] != ("no_op", "no_op")]
            choice.append(rng.choice(live) if i in kept else noop[0])
        if tuple(choice) in tried:
            continue
        tried.add(tuple(choice))
        blocks = [problem.names[i][k] for i, k in enumerate(choice)]
        predicted = p_pred / problem.totals(choice)[key]
        scaled = scaled_time(problem, problem.parent_choice, key) / scaled_time(problem, choice, key)
        config = child_config(parent.config, lib, blocks)
        torch.manual_seed(0)
        child = DeciLMForCausalLM(config).eval()
        measured = paired_speedup(parent, child, "decode_s", batch, costs["prefill_len"], costs["decode_context"],
                                  torch.float32, torch.device("cpu"))
        rows.append({"blocks": blocks, "predicted": predicted, "measured": measured, "ratio": measured / predicted,
                     "predicted_scaled": scaled, "ratio_scaled": measured / scaled})
        print(f"{sum(b != ('no_op', 'no_op') for b in blocks)} layers {blocks}: predicted {predicted:.2f}x "
              f"(overhead per block: {scaled:.2f}x), measured {measured:.2f}x", flush=True)
    out = {"device": device_name(torch.device("cpu")), "costs": str(args.costs or run / "costs" / "costs.json"),
           "structure": args.structure,
           "measure": costs.get("measure", "blocks"), "batch": batch, "children": rows,
           **_errors([r["ratio"] for r in rows]), "scaled": _errors([r["ratio_scaled"] for r in rows])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"median |measured / predicted - 1| = {out['median_abs_error']:.3f}, worst {out['max_abs_error']:.3f}, "
          f"within 10%: {out['within_10pct']:.0%}; overhead per block: {out['scaled']['median_abs_error']:.3f}, "
          f"worst {out['scaled']['max_abs_error']:.3f}, within 10%: {out['scaled']['within_10pct']:.0%} -> {args.out}")
    return 0


def _errors(ratios: list[float]) -> dict:
    """Median and worst |measured / predicted - 1|, and the share within 10%."""
    errors = [abs(r - 1) for r in ratios]
    return {"median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
            "within_10pct": sum(e <= 0.10 for e in errors) / len(errors)}


def scaled_time(problem, choice, key: str) -> float:
    """A child's time with the parent's unexplained overhead spread over its blocks (each block's cost scaled so
    that the parent's blocks explain the parent) instead of paid whole by every child."""
    rows = np.arange(len(choice))
    parent_blocks = float(problem.costs[key][rows, list(problem.parent_choice)].sum())
    overhead = problem.overhead.get(key, 0.0)
    scale = (parent_blocks + overhead) / parent_blocks
    return problem.fixed[key] - overhead + scale * float(problem.costs[key][rows, list(choice)].sum())


if __name__ == "__main__":
    sys.exit(main())
