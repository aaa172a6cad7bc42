"""Recovery in the nano world, side by side in one run (issue 11): what distillation and FFN Fusion do to
a Puzzle child, and whether the MIP child still beats the baselines once each is distilled.

Reads a run directory whose ``pretrain``, ``library``, ``scores`` and ``costs`` stages are complete
(``thinkfast run`` on configs/nano.yaml) and copies them into ``--work`` (the main run is not touched).
Then, with the pipeline's own stages:

- ``mip``: the search stage's child at ``--speedup`` (measured decode throughput at the costs' batch,
  verified and calibrated as the main job does);
- ``greedy`` and ``drop_attention``: the baselines of benchmarks/puzzle_nano.py at the MIP child's
  predicted runtime (equal cost);
- ``mip_ffn``: the MIP at the same predicted runtime with every layer keeping a SwiGLU FFN (no FFN
  removed or made linear: attention goes, FFNs shrink), the kind of child FFN Fusion was made for; and
  ``mip_ffn+fuse``, the fuse stage on it;
- ``layers``: the MIP at the same predicted runtime over whole-layer children (``search.structure:
  layers``: each layer removed, or kept with its FFN and its attention or fewer KV heads);
- ``whole_layers``: the MIP at the same predicted runtime keeping each layer whole or removing it (layer
  pruning);
- ``mip+fuse``: the fuse stage on the MIP child (the main job's order), when it finds a run to fuse;
- each of these distilled from the parent with the same budget (the distill stage, ``--distill-steps``).

For every model: measured decode speedup against the parent at ``--batch`` sequences and at batch 1
(``--context`` cached tokens, ``--steps`` steps, ``--repeats`` interleaved rounds, median), held-out KL
to the parent, and step-by-step accuracy on 1-2 digit problems (``--per-cell`` per kind and digit count).

    python benchmarks/recovery_nano.py [--run-dir runs/nano] [--speedup 2.5] [--distill-steps 1600] [--models a,b]
    -> benchmarks/results/recovery_nano.{json,md}
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
from transformers import AutoTokenizer

from thinkfast.artifacts import (OUTPUTS, copy_tokenizer_files, read_costs, read_library, read_scores,
                                 write_model_sidecar)
from thinkfast.evaluation import EvalSettings, evaluate
from thinkfast.generation import LocalBackend
from thinkfast.nano import tasks
from thinkfast.nano.corpus import packed_rows
from thinkfast.pipeline import load_pipeline, run_stage
from thinkfast.puzzle.assemble import assemble, build_problem, describe, restrict
from thinkfast.puzzle.mip import solve_mip
from thinkfast.artifacts import load_decilm

sys.path.insert(0, str(Path(__file__).parent))
from puzzle_nano import decode_seconds, drop_attention, greedy, held_out_kl, run_doc_eos  # noqa: E402

UPSTREAM = ("pretrain", "library", "scores", "costs")


def mip_keep_ffn(problem, key: str, limit: float):
    """The MIP with no-op and linear FFNs priced out of reach: each layer keeps a SwiGLU FFN."""
    scores = problem.scores.copy()
    for i, names in enumerate(problem.names):
        for k, (_, ffn) in enumerate(names):
            if ffn in ("no_op", "linear"):
                scores[i, k] += 1e3
    sol = solve_mip(scores, {key: problem.costs[key]}, {key: limit})[0]
    return list(sol.choice) if sol.objective < 1e3 else None


def mip_restricted(problem, key: str, limit: float, allowed) -> list[int] | None:
    """The MIP at ``limit`` over the blocks ``allowed(layer, attention, ffn, parent_attention, parent_ffn)``
    accepts (the others priced out of reach)."""
    scores = problem.scores.copy()
    for i, names in enumerate(problem.names):
        pa, pf = names[problem.parent_choice[i]]
        for k, (a, f) in enumerate(names):
            if not allowed(a, f, pa, pf):
                scores[i, k] += 1e3
    sol = solve_mip(scores, {key: problem.costs[key]}, {key: limit})[0]
    return list(sol.choice) if sol.objective < 1e3 else None


def whole_layers(a, f, pa, pf) -> bool:
    """Layer pruning: each layer kept whole or removed."""
    return (a, f) in ((pa, pf), ("no_op", "no_op"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/nano.yaml")
    ap.add_argument("--run-dir", default="runs/nano")
    ap.add_argument("--work", default="runs/recovery")
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--distill-steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-cell", type=int, default=25)
    ap.add_argument("--models", default="mip,mip_ffn,greedy,drop_attention,layers,whole_layers",
                    help="children to build and distill (comma-separated; the parent is always measured)")
    ap.add_argument("--out", default="benchmarks/results/recovery_nano.json")
    a = ap.parse_args(argv)
    src, work = Path(a.run_dir), Path(a.work)
    for name in UPSTREAM:
        if not (src / name).is_dir() and not (work / name).is_dir():  # a stage's folder appears when it completes
            raise SystemExit(f"{src / name} is not complete: run `thinkfast run --config {a.config}` first")
        if not (work / name).is_dir():
            shutil.copytree(src / name, work / name, symlinks=True)
    common = [f"search.speedup={a.speedup}", f"search.batch_size={a.batch}", "search.sweep=[]", "fuse.engine=hf",
              "search.structure=any",  # the MIP over every block; "layers" is one of the children below
              f"distill.train_steps={a.distill_steps}"]

    def pipe(run_dir, stages, *extra):
        return load_pipeline(a.config, [f"run_dir={run_dir}", f"stages=[{','.join(stages)}]", *common, *extra])

    main_pipe = pipe(work, [*UPSTREAM, "search", "fuse", "distill"])
    for name in [*UPSTREAM, "search", "fuse"]:
        run_stage(main_pipe, name)
    fused_any = json.loads((work / "fuse" / "fusion.json").read_text())["groups"]
    if fused_any and "mip" in a.models.split(","):  # the main job's order: search, fuse, distill
        run_stage(main_pipe, "distill")
    parent_dir = work / "pretrain" / "model"
    lib_dir = work / "library" / "library"
    lib = read_library(lib_dir)
    costs = read_costs(work / "costs" / OUTPUTS["costs"])
    problem = build_problem(lib, read_scores(work / "scores" / OUTPUTS["scores"]), costs)
    key = f"decode_s@{a.batch}"
    parent = load_decilm(parent_dir)
    tensors = load_file(str(lib_dir / "weights.safetensors"))
    found = json.loads((work / "search" / "search.json").read_text())["solutions"][0]["choice"]
    mip = [problem.names[i].index(tuple(n)) for i, n in enumerate(found)]
    limit = problem.totals(mip)[key] - problem.fixed[key]
    builders = {"mip": lambda: mip, "mip_ffn": lambda: mip_keep_ffn(problem, key, limit),
                "greedy": lambda: greedy(problem, key, limit),
                "drop_attention": lambda: drop_attention(problem, key, limit),
                "layers": lambda: list(solve_mip(restrict(problem, "layers").scores, {key: problem.costs[key]},
                                                 {key: limit})[0].choice),
                "whole_layers": lambda: mip_restricted(problem, key, limit, whole_layers)}
    wanted = a.models.split(",")
    unknown = sorted(set(wanted) - set(builders))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(builders)}")
    choices = {name: builders[name]() for name in wanted}
    folders = {"parent": parent_dir}
    if "mip" in choices:
        folders["mip"] = work / "search" / "model"
    if fused_any and "mip" in choices:
        folders.update({"mip+fuse": work / "fuse" / "model", "mip+fuse+distill": work / "distill" / "model"})

    def distilled(name: str, stages: list[str]) -> Path:
        p = pipe(work / f"{'-'.join(stages[1:])}-{name}", stages, f"parent.path={folders[name].resolve()}",
                 f"distill.teacher={parent_dir.resolve()}")
        for stage in stages:
            run_stage(p, stage)
        return work / f"{'-'.join(stages[1:])}-{name}"

    for name, choice in choices.items():
        if choice is None:
            print(f"{name}: cannot reach the MIP child's cost", flush=True)
            continue
        if name != "mip":
            folder = work / "baselines" / name
            if not (folder / "config.json").is_file():
                child = assemble(parent, lib, tensors, [problem.names[i][k] for i, k in enumerate(choice)])
                child.save_pretrained(folder)
                copy_tokenizer_files(parent_dir, folder)
                write_model_sidecar(folder, prompting="text", made_by=f"benchmark:{name}", engine="hf")
            folders[name] = folder
        folders[f"{name}+distill"] = distilled(name, ["parent", "distill"]) / "distill" / "model"
        if name == "mip_ffn":  # fusion, then the same distillation
            run = distilled(name, ["parent", "fuse", "distill"])
            folders["mip_ffn+fuse"], folders["mip_ffn+fuse+distill"] = run / "fuse" / "model", run / "distill" / "model"

    models = {name: load_decilm(f) for name, f in folders.items()}
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    ids = packed_rows(tokenizer, random.Random("puzzle-bench-heldout"), 16, 513)
    eos = run_doc_eos(work, tokenizer)  # the copied stages: the run measured under its own data section
    suite = tasks.eval_suite(seed=1234, per_cell=a.per_cell, digits=(1, 2), steps=(2,))
    ecfg = EvalSettings(max_new_tokens=600)
    times = {b: {name: [] for name in models} for b in (a.batch, 1)}
    for b in times:
        for m in models.values():
            decode_seconds(m, b, a.context, 4)  # warm-up
        for _ in range(a.repeats):  # interleaved, median per model: the machine is noisy
            for name, m in models.items():
                times[b][name].append(decode_seconds(m, b, a.context, a.steps))
    med = {b: {n: statistics.median(t) for n, t in ts.items()} for b, ts in times.items()}
    rows_idx = np.arange(len(problem.names))
    results = {}
    for name, m in models.items():
        base = name.split("+")[0]
        r = {"layers": m.config.num_hidden_layers, "architecture": describe(m.config),
             "params": sum(p.numel() for p in m.parameters()),
             f"speedup_batch{a.batch}": med[a.batch]["parent"] / med[a.batch][name],
             "speedup_batch1": med[1]["parent"] / med[1][name],
             "kl": 0.0 if name == "parent" else held_out_kl(parent, m, ids, eos_id=eos)}
        if base in choices and choices[base] is not None and "fuse" not in name:
            r["predicted_speedup"] = problem.totals(problem.parent_choice)[key] / problem.totals(choices[base])[key]
            r["summed_score"] = float(problem.scores[rows_idx, choices[base]].sum())
        metrics, _ = evaluate(LocalBackend(m), tokenizer, suite, "text", ecfg)
        r["accuracy"] = metrics["modes"]["think"]["accuracy"]
        r["accuracy_2d"] = metrics["modes"]["think"]["accuracy_2d"]
        results[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "architecture"}), flush=True)
    top = results["parent"]["accuracy"]
    lines = [f"| model | layers | decode speedup @{a.batch} | @1 | held-out KL | step-by-step acc (1-2 digit) "
             "| of parent's |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['layers']} | {r[f'speedup_batch{a.batch}']:.2f}x | {r['speedup_batch1']:.2f}x | "
                     f"{r['kl']:.3f} | {r['accuracy']:.3f} | {r['accuracy'] / top:.1%} |")
    out = {"run_dir": str(src), "work": str(work), "speedup_target": a.speedup, "distill_steps": a.distill_steps,
           "batch": a.batch, "context": a.context, "steps": a.steps, "repeats": a.repeats, "per_cell": a.per_cell,
           "costs_device": costs["device"], "models": results,
           "fusion": {"mip": json.loads((work / "fuse" / "fusion.json").read_text()),
                      "mip_ffn": json.loads((work / "fuse-distill-mip_ffn" / "fuse" / "fusion.json").read_text())
                      if (work / "fuse-distill-mip_ffn").is_dir() else None}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
