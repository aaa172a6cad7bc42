"""Accuracy against a thinking budget in the nano world (issue 13): the toggle-SFT (or GRPO) child answers the
same held-out problems with reasoning on, its thinking capped at each budget by the rollout engine's hook
(:class:`thinkfast.budget.ThinkingBudget`: at the budget, thinking ends at the next newline, or after
``--grace`` more tokens; then ``</think>`` and the answer), from 0 (an empty think block) to unlimited.

Greedy decoding (so the budget is the only thing that changes between points); the "off" mode is measured
alongside as the no-reasoning reference. Writes benchmarks/results/budget_nano.{json,png}.

    python benchmarks/budget_nano.py [--model runs/nano/grpo/model] [--budgets 0,8,16,32,64,128,256,none]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from transformers import AutoTokenizer

from thinkfast.evaluation import budget_sweep, build_prompt, grade
from thinkfast.generation import SamplingParams, generate
from thinkfast.nano import tasks
from thinkfast.puzzle.parent import load_decilm
from thinkfast.toggle import stop_token_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/nano/grpo/model")
    ap.add_argument("--budgets", default="0,8,16,32,64,128,256,none")
    ap.add_argument("--grace", type=int, default=16)
    ap.add_argument("--digits", default="1,2")
    ap.add_argument("--per-cell", type=int, default=25)
    ap.add_argument("--max-new-tokens", type=int, default=800)
    ap.add_argument("--out", default="benchmarks/results/budget_nano.json")
    a = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = load_decilm(a.model).eval()
    suite = tasks.eval_suite(seed=1234, per_cell=a.per_cell, digits=tuple(int(d) for d in a.digits.split(",")))
    problems = [p for cell in suite.values() for p in cell]
    params = SamplingParams(max_new_tokens=a.max_new_tokens, stop_token_ids=tuple(stop_token_ids(tok)), seed=0)
    points = []
    off = generate(model, [build_prompt(tok, p, "chat", "off") for p in problems], params)
    texts = [tok.decode(c.token_ids, skip_special_tokens=True) for c in off]
    points.append({"mode": "off", "budget": None,
                   "accuracy": statistics.fmean(grade(p, t, "chat", "off")["correct"] for p, t in zip(problems, texts)),
                   "mean_tokens": statistics.fmean(len(c.token_ids) for c in off)})
    budgets = [None if b == "none" else int(b) for b in a.budgets.split(",")]
    points += [{"mode": "on", **p} for p in budget_sweep(model, tok, problems, budgets, grace=a.grace,
                                                          max_new_tokens=a.max_new_tokens)]
    for p in points:
        print(json.dumps(p), flush=True)
    out = {"model": a.model, "problems": len(problems), "digits": a.digits, "grace": a.grace, "decoding": "greedy",
           "points": points}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(points, Path(a.out).with_suffix(".png"), a.model)
    return 0


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on = [p for p in points if p["mode"] == "on"]
    finite = [p for p in on if p["budget"] is not None]
    unlimited = next((p for p in on if p["budget"] is None), None)
    off = next(p for p in points if p["mode"] == "off")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [max(p["budget"], 0.5) for p in finite]
    ax.plot(xs, [p["accuracy"] for p in finite], "o-", color="tab:red", label="reasoning on, budget")
    if unlimited:
        ax.axhline(unlimited["accuracy"], color="tab:red", ls="--", label="on, no budget")
    ax.axhline(off["accuracy"], color="tab:gray", ls=":", label="reasoning off")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("thinking budget (tokens; 0 plotted at 0.5)")
    ax.set_ylabel("accuracy (held-out, greedy)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"Accuracy against thinking budget: {Path(title).parent.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
