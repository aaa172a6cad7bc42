"""The toggle's format on many fresh problems: how often a model's answers obey the requested mode, per cell.

The eval stage checks 40 problems per cell, so one miss moves a cell by 0.025; this draws ``--per-cell`` fresh
problems of every cell of the nano eval grid (add / sub / mul of 1-3 digits, word problems of 1-3 digits and 2-3
steps), in the canonical wording or a split of ``thinkfast.nano.tasks.PHRASINGS``, and asks each model in each mode
the eval stage's way ("on" sampled at 0.6 / 0.95, "off" greedy). Every malformed answer is kept in the output.

    python benchmarks/toggle_format.py --model runs/s14main/sft/model --per-cell 100 \
        --phrasing canonical held_out --out benchmarks/results/toggle_format.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from thinkfast.artifacts import load_model
from thinkfast.evaluation.harness import build_prompt, decoded, grade
from thinkfast.generation import LocalBackend
from thinkfast.generation.sampler import SamplingParams
from thinkfast.nano import tasks
from thinkfast.toggle import stop_token_ids

CELLS = ([(k, d, 2) for k in ("add", "sub", "mul") for d in (1, 2, 3)]
         + [("word", d, s) for d in (1, 2, 3) for s in (2, 3)])


def cell_name(cell) -> str:
    kind, digits, steps = cell
    return f"{kind}/{digits}d" + (f"/{steps}s" if kind == "word" else "")


def probe(model_dir: str, mode: str, phrasing: str, per_cell: int, seed: int, max_new_tokens: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    backend = LocalBackend(load_model(model_dir).eval())
    rng = random.Random(f"toggle-format:{seed}")
    items = []
    for cell in CELLS:
        for _ in range(per_cell):
            p = tasks.sample_problem(rng, *cell)
            items.append((cell, p, None if phrasing == "canonical" else tasks.phrasing(p, rng, phrasing)))
    on = mode == "on"
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.6 if on else 0.0, top_p=0.95 if on else 1.0,
                            stop_token_ids=tuple(stop_token_ids(tok)), batch_size=64, seed=seed)
    comps = backend.generate([build_prompt(tok, p, "chat", mode, t) for _, p, t in items], params, progress=True)
    cells: dict = {cell_name(c): {"format_ok": 0, "correct": 0, "n": 0} for c in CELLS}
    malformed = []
    for (cell, p, template), comp in zip(items, comps):
        text = decoded(tok, comp)
        g = grade(p, text, "chat", mode)
        c = cells[cell_name(cell)]
        c["n"] += 1
        c["format_ok"] += bool(g["format_ok"])
        c["correct"] += bool(g["correct"])
        if not g["format_ok"]:
            malformed.append({"cell": cell_name(cell), "question": p.question, "template": template,
                              "finish_reason": comp.finish_reason, "response": text})
    n = len(items)
    ok = sum(c["format_ok"] for c in cells.values())
    return {"model": model_dir, "mode": mode, "phrasing": phrasing, "per_cell": per_cell,
            "format_ok": ok / n, "malformed": n - ok, "n": n,
            "accuracy": sum(c["correct"] for c in cells.values()) / n,
            "worst_cell": min(cells, key=lambda k: cells[k]["format_ok"]),
            "worst_format_ok": min(c["format_ok"] / c["n"] for c in cells.values()),
            "cells": {k: {"format_ok": c["format_ok"] / c["n"], "accuracy": c["correct"] / c["n"]}
                      for k, c in cells.items()},
            "malformed_answers": malformed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", required=True, help="chat model folders (toggle SFT or later)")
    ap.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--phrasing", nargs="+", default=["canonical", "held_out"],
                    choices=["canonical", "train", "held_out"])
    ap.add_argument("--per-cell", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=1200)
    ap.add_argument("--out", default="benchmarks/results/toggle_format.json")
    args = ap.parse_args(argv)
    runs = []
    for model in args.model:
        for phrasing in args.phrasing:
            for mode in args.modes:
                r = probe(model, mode, phrasing, args.per_cell, args.seed, args.max_new_tokens)
                runs.append(r)
                print(f"{model} {mode:3s} {phrasing:9s} format {r['format_ok']:.4f} ({r['malformed']} of {r['n']} "
                      f"malformed), worst {r['worst_cell']} {r['worst_format_ok']:.3f}, accuracy {r['accuracy']:.3f}",
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "runs": runs}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
