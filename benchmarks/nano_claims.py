"""The nano world's headline claims (issue 26), read from a finished run directory: nothing is re-measured.

- search: the target, the child's predicted and measured speedup (``search/metrics.json``), their ratio;
- recovery: the distilled child's accuracy on 1-2 digit problems against the parent's (``eval/*/metrics.json``,
  both prompted step by step as text) and its decode throughput against the parent's at batch 16
  (``eval/throughput.json``, timed side by side);
- the toggle, per chat model, suite (``nano``: the training wording; ``nano_phrased``: wordings toggle SFT never
  saw) and mode: format compliance overall and in its worst cell, "on" accuracy in each wording and their gap;
- RL: "on" accuracy of the GRPO child against the SFT child on the cells the SFT teacher's traces covered
  (``--teacher-digits`` / ``--teacher-steps``) and on those past them (``grpo_nano.cell_groups``).

    python benchmarks/nano_claims.py [--run runs/nano] [--out benchmarks/results/nano_claims.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grpo_nano import cell_groups  # benchmarks/ is on the path when this file runs as a script


def _cells(metrics: dict, suite: str, mode: str) -> dict | None:
    block = metrics["modes"] if suite == "nano" else metrics.get("suites", {}).get(suite)
    if not block or mode not in block:
        return None
    return block[mode].get("cells")


def _mean(cells: dict, keep) -> float | None:
    picked = [(c["accuracy"], c["n"]) for name, c in cells.items() if keep(name)]
    n = sum(k for _, k in picked)
    return sum(a * k for a, k in picked) / n if n else None


def _small(name: str) -> bool:
    """1-2 digit cells (``kind/Nd`` or ``word/Nd/Ss``), every step count."""
    return name.split("/")[1] in ("1d", "2d")


def claims(run: Path, teacher_digits: int, teacher_steps: int) -> dict:
    out: dict = {"run": str(run)}
    search = json.loads((run / "search" / "metrics.json").read_text())
    target = search.get("target_speedup") or (search["calibration"][0]["predicted_target"]
                                              if search.get("calibration") else None)
    out["search"] = {"target": target, "predicted": search.get("speedup"),
                     "measured": search.get("measured_speedup"),
                     "measured_over_target": (search["measured_speedup"] / target
                                              if target and search.get("measured_speedup") else None),
                     "walk": [(c["predicted_target"], c["measured_speedup"]) for c in search.get("calibration", [])]}
    evals = {d.name: json.loads((d / "metrics.json").read_text())
             for d in sorted((run / "eval").iterdir()) if (d / "metrics.json").is_file()}
    if "pretrain" in evals and "distill" in evals:
        mode = "think"
        parent = _mean(_cells(evals["pretrain"], "nano", mode), _small)
        child = _mean(_cells(evals["distill"], "nano", mode), _small)
        tp = json.loads((run / "eval" / "throughput.json").read_text())["models"]
        out["recovery"] = {"parent_1_2_digits": parent, "distilled_1_2_digits": child, "kept": child / parent,
                           "decode_speedup_at_16": tp.get("distill", {}).get("x_decode_tok_s@16"),
                           "decode_speedup_at_1": tp.get("distill", {}).get("x_decode_tok_s@1")}
    out["toggle"] = {}
    for model, m in evals.items():
        if m.get("prompting") != "chat":
            continue
        row = {}
        for suite in ("nano", "nano_phrased"):
            for mode in ("on", "off"):
                cells = _cells(m, suite, mode)
                if not cells:
                    continue
                worst = min(cells, key=lambda c: cells[c]["format_ok"])
                total = sum(c["n"] for c in cells.values())
                row[f"{suite}/{mode}"] = {
                    "format_ok": sum(c["format_ok"] * c["n"] for c in cells.values()) / total,
                    "worst_cell": worst, "worst_format_ok": cells[worst]["format_ok"],
                    "accuracy": _mean(cells, lambda _: True)}
        if "nano/on" in row and "nano_phrased/on" in row:
            row["on_accuracy_gap"] = row["nano/on"]["accuracy"] - row["nano_phrased/on"]["accuracy"]
        out["toggle"][model] = row
    if "sft" in evals and "grpo" in evals:
        rl = {}
        for model in ("sft", "grpo"):
            cells = _cells(evals[model], "nano", "on")
            groups = cell_groups(cells, teacher_digits, teacher_steps)
            rl[model] = {"covered": groups["seen"], "beyond": groups["beyond"],
                         "cells": {c: v["accuracy"] for c, v in cells.items()}}
        rl["gain_covered"] = rl["grpo"]["covered"] - rl["sft"]["covered"]
        rl["gain_beyond"] = rl["grpo"]["beyond"] - rl["sft"]["beyond"]
        out["rl"] = rl
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/nano")
    ap.add_argument("--teacher-digits", type=int, default=2, help="the SFT teacher's most digits (sft.digits)")
    ap.add_argument("--teacher-steps", type=int, default=2, help="the SFT teacher's most word steps (sft.steps)")
    ap.add_argument("--out", default="benchmarks/results/nano_claims.json")
    args = ap.parse_args(argv)
    result = claims(Path(args.run), args.teacher_digits, args.teacher_steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rl"}, indent=1))
    if "rl" in result:
        print(json.dumps({k: v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "cells"}
                          for k, v in result["rl"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
