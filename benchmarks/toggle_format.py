"""The toggle's format on many fresh problems: how often a model's answers obey the requested mode, per cell.

The eval stage checks 40 problems per cell, so one miss moves a cell by 0.025; this asks ``--per-cell`` held-out
problems (the eval split, another seed than the eval stage's) of every cell of the nano eval grid (add / sub / mul of
1-3 digits, word problems of 1-3 digits and 2-3 steps), in the canonical wording or a split of
``thinkfast.nano.tasks.PHRASINGS``, through the eval harness itself (``NanoTask``: "on" sampled at 0.6 / 0.95, "off"
greedy). Every malformed answer is kept in the output.

    python benchmarks/toggle_format.py --model runs/s14main/sft/model --per-cell 100 \
        --phrasing canonical held_out --out benchmarks/results/toggle_format.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from thinkfast.artifacts import load_model
from thinkfast.evaluation import EvalSettings
from thinkfast.evaluation.harness import NanoTask, run_task
from thinkfast.generation import LocalBackend
from thinkfast.nano import tasks


def probe(model_dir: str, phrasing: str, per_cell: int, seed: int, max_new_tokens: int,
          digits: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """Both modes of one model in one wording: a summary per mode, with its malformed answers."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    backend = LocalBackend(load_model(model_dir).eval())
    suite = tasks.eval_suite(seed=seed, per_cell=per_cell, digits=digits, steps=(2, 3))
    task = NanoTask(suite, phrasing=None if phrasing == "canonical" else phrasing)
    settings = EvalSettings(seed=seed, max_new_tokens=max_new_tokens, save_samples=per_cell)  # keep every answer
    modes, records = run_task(backend, tok, task, "chat", settings)
    out = []
    for mode, m in modes.items():
        cells = m["cells"]
        malformed = [r for r in records if r["mode"] == mode and not r["format_ok"]]
        out.append({"model": model_dir, "mode": mode, "phrasing": phrasing, "per_cell": per_cell,
                    "format_ok": m["format_ok"], "malformed": len(malformed), "n": per_cell * len(cells),
                    "accuracy": m["accuracy"], "worst_cell": min(cells, key=lambda k: cells[k]["format_ok"]),
                    "worst_format_ok": min(c["format_ok"] for c in cells.values()),
                    "cells": {k: {"format_ok": c["format_ok"], "accuracy": c["accuracy"]} for k, c in cells.items()},
                    "malformed_answers": malformed})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", required=True, help="chat model folders (toggle SFT or later)")
    ap.add_argument("--phrasing", nargs="+", default=["canonical", "held_out"],
                    choices=["canonical", "train", "held_out"])
    ap.add_argument("--per-cell", type=int, default=100)
    ap.add_argument("--seed", type=int, default=4321, help="the eval split's seed (the eval stage's: 1234)")
    ap.add_argument("--max-new-tokens", type=int, default=1200)
    ap.add_argument("--digits", type=int, nargs="+", default=[1, 2, 3], help="the cells' digits (a quick screen: 3)")
    ap.add_argument("--out", default="benchmarks/results/toggle_format.json")
    args = ap.parse_args(argv)
    runs = []
    for model in args.model:
        for phrasing in args.phrasing:
            for r in probe(model, phrasing, args.per_cell, args.seed, args.max_new_tokens,
                           tuple(args.digits)):
                runs.append(r)
                print(f"{model} {r['mode']:3s} {phrasing:9s} format {r['format_ok']:.4f} ({r['malformed']} of "
                      f"{r['n']} malformed), worst {r['worst_cell']} {r['worst_format_ok']:.3f}, "
                      f"accuracy {r['accuracy']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "runs": runs}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
