"""The toggle's format on many fresh problems: how often a model's answers obey the requested mode, per cell.

The eval stage checks 40 problems per cell, so one miss moves a cell by 0.025; this asks ``--per-cell`` held-out
problems (the eval split, another seed than the eval stage's) of every cell of the nano eval grid (add / sub / mul of
1-3 digits, word problems of 1-3 digits and 2-3 steps), in the canonical wording or a split of
``thinkfast.nano.tasks.PHRASINGS``, through the eval harness itself (``NanoTask``: "on" sampled at 0.6 / 0.95, "off"
greedy). Every malformed answer is kept in the output.

    python benchmarks/toggle_format.py --model runs/s14main/sft/model --per-cell 100 \
        --phrasing canonical held_out --out benchmarks/results/toggle_format.json

``--pool FILE...`` adds up such results (several problem seeds, both wordings) per model, mode and difficulty: the
issue's target read per difficulty ("every difficulty and held-out phrasings") on 600 problems a difficulty rather
than per cell of 100, where one answer moves a cell by 0.01; each rate with its 95% Wilson interval.

    python benchmarks/toggle_format.py --pool benchmarks/results/toggle_format_s20{,_seed5678,_seed2468}.json \
        --out benchmarks/results/toggle_format_s20_pooled.json
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


def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``k / n`` (SciPy's ``binomtest``); (0, 1) when ``n`` is 0.

    >>> [round(x, 4) for x in wilson(600, 600)]
    [0.9936, 1.0]
    >>> lo, hi = wilson(3, 600); round(lo, 4), round(hi, 4)
    (0.0017, 0.0146)
    """
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def pool(results: list[dict]) -> dict:
    """Well-formed answers added up over result files (``{"argv", "runs"}`` as ``main`` writes them) per model and
    mode: per difficulty (a cell, over every wording and problem seed), per wording, and in all; each with its
    count, rate and 95% Wilson interval; ``worst_difficulty`` and ``worst_wording`` name the lowest rates."""

    def entry(ok: int, n: int) -> dict:
        lo, hi = wilson(ok, n)
        return {"ok": ok, "n": n, "format_ok": ok / n if n else None, "ci95": [round(lo, 4), round(hi, 4)]}

    counts: dict = {}
    for res in results:
        for r in res["runs"]:
            per = r["per_cell"]
            slot = counts.setdefault((r["model"], r["mode"]), {"cells": {}, "wordings": {}})
            for cell, c in r["cells"].items():
                ok = round(c["format_ok"] * per)
                got = slot["cells"].setdefault(cell, [0, 0])
                got[0] += ok
                got[1] += per
                w = slot["wordings"].setdefault(r["phrasing"], [0, 0])
                w[0] += ok
                w[1] += per
    out = {}
    for (model, mode), slot in counts.items():
        cells = {k: entry(*v) for k, v in slot["cells"].items()}
        wordings = {k: entry(*v) for k, v in slot["wordings"].items()}
        total = entry(sum(v[0] for v in slot["cells"].values()), sum(v[1] for v in slot["cells"].values()))
        out.setdefault(model, {})[mode] = {
            "all": total, "wordings": wordings, "difficulties": cells,
            "worst_difficulty": min(cells, key=lambda k: cells[k]["format_ok"]),
            "worst_wording": min(wordings, key=lambda k: wordings[k]["format_ok"])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", help="chat model folders (toggle SFT or later)")
    ap.add_argument("--phrasing", nargs="+", default=["canonical", "held_out"],
                    choices=["canonical", "train", "held_out"])
    ap.add_argument("--per-cell", type=int, default=100)
    ap.add_argument("--seed", type=int, default=4321, help="the eval split's seed (the eval stage's: 1234)")
    ap.add_argument("--max-new-tokens", type=int, default=1200)
    ap.add_argument("--digits", type=int, nargs="+", default=[1, 2, 3], help="the cells' digits (a quick screen: 3)")
    ap.add_argument("--out", default="benchmarks/results/toggle_format.json")
    ap.add_argument("--pool", nargs="+", metavar="FILE", help="add up earlier results per difficulty (no --model)")
    args = ap.parse_args(argv)
    if args.pool:
        files = [str(f) for f in args.pool]
        pooled = pool([json.loads(Path(f).read_text()) for f in files])
        for model, modes in pooled.items():
            for mode, m in modes.items():
                worst = m["difficulties"][m["worst_difficulty"]]
                words = ", ".join(f"{k} {v['format_ok']:.4f}" for k, v in m["wordings"].items())
                print(f"{model} {mode:3s} all {m['all']['format_ok']:.4f} ({m['all']['n']}); {words}; worst "
                      f"difficulty {m['worst_difficulty']} {worst['format_ok']:.4f} of {worst['n']} "
                      f"(95% {worst['ci95'][0]:.4f}-{worst['ci95'][1]:.4f})")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "files": files, "pooled": pooled}, indent=1))
        print(f"wrote {args.out}")
        return 0
    if not args.model:
        ap.error("--model is required (or --pool FILE...)")
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
