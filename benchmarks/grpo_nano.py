"""GRPO in the nano world (issue 12): what reasoning RL buys the toggle-SFT child, and the paper's ablation of
the pass-rate curriculum against random order at the same budget, over several seeds.

Starts from a toggle-SFT model (default: the main job's ``runs/nano/sft/model``) and, for every seed and
every arm (``gaussian``: the paper's easy-to-hard curriculum; ``random``: the same kept prompts in random
order), runs the pipeline's own ``grpo`` stage on it in ``--work/ARM-sSEED`` (stages ``[parent, grpo]``; the
configuration is configs/nano.yaml's ``grpo`` section plus ``--set`` overrides, so the benchmark measures
what the main job runs). Then evaluates, side by side on the same held-out problems:

- the SFT model and every GRPO result in both modes: "on" sampled as the paper evaluates reasoning
  (temperature 0.6, top-p 0.95, ``--samples`` per problem; pass@1 = mean over them), "off" greedy;
- the same models "on" at the rollouts' own sampling (temperature 1, top-p 1; ``on_t1``) on the cells the SFT
  teacher covered: the distribution GRPO optimises, where the SFT model still has room;
- the nano parent (``--parent``, the pretrained model, step-by-step text prompting, greedy), for the
  paper's question whether the RL child surpasses the model it came from;

- for every GRPO run, its kept prompts (pass rate in (0, 0.75) before) answered ``pass_rate_samples`` times
  again by the trained model, and by the starting model with another sampling seed (the control for
  regression to the mean): how much of what it trained on it learned;

per cell of kind x digits (``--digits``) x word-problem steps (``--steps``). Cells with 3 digits or 3 steps
lie beyond every example of the SFT teacher's data (``sft.digits`` / ``sft.steps`` of configs/nano.yaml:
1-2), the paper's student-surpasses-teacher question.

    python benchmarks/grpo_nano.py [--model runs/nano/sft/model] [--seeds 0,1] [--arms gaussian,random]
                                   [--set grpo.lr=5e-5 ...] [--train-only]
    -> benchmarks/results/grpo_nano.{json,md}

Each GRPO run and each evaluation is kept in ``--work`` and reused: seeds can train side by side, one process
each (``--seeds 1 --train-only``, ``OMP_NUM_THREADS=1``), before one run over all of them evaluates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from thinkfast.evaluation import EvalSettings, evaluate
from thinkfast.generation import LocalBackend, SamplingParams
from thinkfast.nano import tasks
from thinkfast.pipeline import load_pipeline, run_stage
from thinkfast.artifacts import load_decilm
from thinkfast.rl.curriculum import keep_hard
from thinkfast.rl.pass_rates import pass_rates
from thinkfast.rl.prompts import nano_prompts
from thinkfast.rl.rewards import RewardRunner, load_reward
from thinkfast.toggle import stop_token_ids


def cell_groups(cells: dict, teacher_digits: int, teacher_steps: int) -> dict[str, float]:
    """Accuracy over the cells the SFT teacher's data covered ("seen") and the ones beyond it ("beyond"),
    and per digit count; cells are keyed ``kind/Nd`` or ``word/Nd/Ss``, each weighted by its problems.

    >>> c = {"add/2d": {"accuracy": 1.0, "n": 2}, "add/3d": {"accuracy": 0.5, "n": 2},
    ...      "word/2d/3s": {"accuracy": 0.0, "n": 2}}
    >>> cell_groups(c, 2, 2)
    {'seen': 1.0, 'beyond': 0.25, '2d': 0.5, '3d': 0.5}
    """
    groups: dict[str, list[tuple[float, int]]] = {}
    for key, c in cells.items():
        parts = key.split("/")
        digits = int(parts[1][:-1])
        steps = int(parts[2][:-1]) if len(parts) > 2 else 1
        beyond = digits > teacher_digits or steps > teacher_steps
        for g in ("beyond" if beyond else "seen", f"{digits}d"):
            groups.setdefault(g, []).append((c["accuracy"], c["n"]))
    return {g: sum(a * n for a, n in v) / sum(n for _, n in v) for g, v in sorted(groups.items(), key=_order)}


def _order(item):
    return {"seen": (0, 0), "beyond": (1, 0)}.get(item[0], (2, item[0]))


def _identity(folder: Path, settings: dict) -> str:
    """A model folder's weights (size and mtime of every file) plus the measurement's settings."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())
    return json.dumps({"files": files, "settings": settings}, sort_keys=True, default=str)


def cached(path: Path, identity: str, compute):
    """``compute()``, or its earlier result saved at ``path`` for the same ``identity``: a re-run measures only
    what changed."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("identity") == identity:
            return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"identity": identity, "value": value}) + "\n")
    return value


def kept_pass(cfg, stage: Path, start: Path) -> dict:
    """The kept prompts' pass rates before training (``pass_rates.json``), after (the trained model answers
    each of them ``pass_rate_samples`` times again, with the same sampling) and, as the control, the starting
    model answering them again with another sampling seed: prompts kept for a pass rate below 0.75 in 8
    samples were partly unlucky, and a second look at the untrained model is higher already (regression to
    the mean)."""
    before = json.loads((stage / "pass_rates.json").read_text())["pass_rates"]
    kept = keep_hard(before, cfg.easy_threshold, cfg.drop_unsolved)
    tokenizer = AutoTokenizer.from_pretrained(str(stage / "model"))
    prompts, columns = nano_prompts(tokenizer, cfg.prompts, seed=cfg.seed, kinds=cfg.kinds, digits=cfg.digits,
                                    steps=cfg.steps, thinking=cfg.thinking)
    prompts = [prompts[i] for i in kept]
    columns = {k: [v[i] for i in kept] for k, v in columns.items()}
    name = cfg.pass_reward or cfg.rewards[0]

    def measure(folder: Path, seed: int) -> list[float]:
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                stop_token_ids=tuple(stop_token_ids(tokenizer)), batch_size=cfg.batch_size, seed=seed)
        return pass_rates(LocalBackend(load_decilm(folder).eval()), tokenizer, prompts, columns,
                          RewardRunner([(name, load_reward(name), 1.0)]), params, cfg.pass_rate_samples)

    if not kept:
        return {"kept": 0}
    return {"kept": len(kept), "kept_pass_before": statistics.fmean(before[i] for i in kept),
            "kept_pass_start_resampled": statistics.fmean(measure(start, cfg.seed + 1000)),
            "kept_pass_after": statistics.fmean(measure(stage / "model", cfg.seed))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/nano.yaml")
    ap.add_argument("--model", default="runs/nano/sft/model", help="the toggle-SFT model GRPO starts from")
    ap.add_argument("--parent", default="runs/nano/pretrain/model", help="the nano parent ('' to skip)")
    ap.add_argument("--work", default="runs/grpo_bench")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--arms", default="gaussian,random")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. grpo.lr=5e-5 (repeatable)")
    ap.add_argument("--digits", default="1,2,3")
    ap.add_argument("--steps", default="2,3", help="word-problem steps of the evaluation")
    ap.add_argument("--per-cell", type=int, default=25)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/grpo_nano.json")
    ap.add_argument("--train-only", action="store_true",
                    help="run the GRPO runs (and their kept-prompt checks) and stop: seeds side by side in separate "
                         "processes, then one run over every seed evaluates (each result is cached in --work)")
    a = ap.parse_args(argv)
    model_dir, work = Path(a.model), Path(a.work)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir}: no model there; run `thinkfast run` on {a.config} first (or give --model)")
    base = load_pipeline(a.config, list(a.set))
    sft_cfg = base.configs.get("sft")
    teacher_digits = max(sft_cfg.digits) if sft_cfg else 2
    teacher_steps = max(sft_cfg.steps) if sft_cfg else 2

    folders: dict[str, Path] = {"sft": model_dir}
    runs: dict[str, dict] = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        first = None  # the seed's first arm measures the pass rates, the others reuse them (same prompts)
        for arm in a.arms.split(","):
            name = f"{arm}-s{seed}"
            reuse = [f"grpo.pass_rates_from={(work / first / 'grpo' / 'pass_rates.json').resolve()}"] if first else []
            pipe = load_pipeline(a.config, [f"run_dir={work / name}", "stages=[parent,grpo]",
                                            f"parent.path={model_dir.resolve()}", f"grpo.curriculum={arm}",
                                            f"grpo.seed={seed}", *a.set, *reuse])
            first = first or name
            t = time.perf_counter()
            run_stage(pipe, "parent")
            metrics, ran = run_stage(pipe, "grpo")
            runs[name] = {"arm": arm, "seed": seed, "wall_s": round(time.perf_counter() - t, 1), "ran": ran,
                          **{k: v for k, v in metrics.items()}}
            folders[name] = work / name / "grpo" / "model"
            runs[name].update(cached(work / "cache" / f"kept-{name}.json", _identity(folders[name], {"control": 1}),
                                     lambda: kept_pass(pipe.configs["grpo"], work / name / "grpo", model_dir)))
            print(name, json.dumps(runs[name]), flush=True)

    if a.train_only:
        return 0
    digits = tuple(int(d) for d in a.digits.split(","))
    suite = tasks.eval_suite(seed=1234, per_cell=a.per_cell, digits=digits,
                             steps=tuple(int(s) for s in a.steps.split(",")))
    ecfg = EvalSettings(samples=a.samples, max_new_tokens=1200, save_samples=0)
    seen_suite = tasks.eval_suite(seed=1234, per_cell=a.per_cell, digits=tuple(range(1, teacher_digits + 1)),
                                  steps=tuple(range(1, teacher_steps + 1)))
    t1cfg = EvalSettings(samples=a.samples, max_new_tokens=1200, save_samples=0, on_temperature=1.0, on_top_p=1.0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    results: dict[str, dict] = {}
    settings = {"digits": digits, "steps": a.steps, "per_cell": a.per_cell, "samples": a.samples}
    if a.parent:
        def parent_eval():
            m, _ = evaluate(LocalBackend(load_decilm(a.parent).eval()), AutoTokenizer.from_pretrained(a.parent), suite,
                            "text", ecfg)
            t = m["modes"]["think"]
            return {"think": {"accuracy": t["accuracy"], **cell_groups(t["cells"], teacher_digits, teacher_steps),
                              "tokens": t["mean_tokens"]}}

        results["parent"] = cached(work / "cache" / "eval-parent.json", _identity(Path(a.parent), settings),
                                   parent_eval)
    for name, folder in folders.items():
        def chat_eval(folder=folder):
            backend = LocalBackend(load_decilm(folder).eval())
            m, _ = evaluate(backend, tokenizer, suite, "chat", ecfg)
            t1, _ = evaluate(backend, tokenizer, seen_suite, "chat", t1cfg)
            m["modes"]["on_t1"] = t1["modes"]["on"]
            r = {mode: {"accuracy": v["accuracy"], **cell_groups(v["cells"], teacher_digits, teacher_steps),
                        "tokens": v["mean_tokens"], "format_ok": v["format_ok"]} for mode, v in m["modes"].items()}
            r["cells_on"] = {k: c["accuracy"] for k, c in m["modes"]["on"]["cells"].items()}
            return r

        results[name] = cached(work / "cache" / f"eval-{name}.json", _identity(folder, settings), chat_eval)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "cells_on"}), flush=True)

    arms: dict[str, dict] = {}
    for arm in a.arms.split(","):
        names = [n for n in runs if runs[n]["arm"] == arm]
        arms[arm] = {f"{mode}:{g}": statistics.fmean(results[n][mode][g] for n in names)
                     for mode in ("on", "on_t1") for g in ("accuracy", "seen", "beyond")
                     if g in results["sft"][mode]}
        arms[arm].update({k: statistics.fmean(runs[n][k] for n in names)
                          for k in ("kept_pass_before", "kept_pass_start_resampled", "kept_pass_after")
                          if all(runs[n].get(k) is not None for n in names)})
        # the spread over seeds and each run against the SFT child: a claim holds on every seed or it does not
        arms[arm].update({f"on:{g}:{edge}": f(results[n]["on"][g] for n in names)
                          for g in ("seen", "beyond") if g in results["sft"]["on"]
                          for edge, f in (("min", min), ("max", max))})
        arms[arm]["on:vs_sft"] = {n: {g: round(results[n]["on"][g] - results["sft"]["on"][g], 4)
                                      for g in ("seen", "beyond") if g in results["sft"]["on"]} for n in names}
    groups = [g for g in results["sft"]["on"] if g not in ("tokens", "format_ok")]
    lines = ["| model | mode | " + " | ".join(groups) + " | tokens | format ok |",
             "|---|---|" + "---|" * (len(groups) + 2)]
    for name, r in results.items():
        for mode, v in r.items():
            if mode == "cells_on":
                continue
            lines.append(f"| {name} | {mode} | " + " | ".join(f"{v[g]:.3f}" if g in v else "-" for g in groups)
                         + f" | {v['tokens']:.0f} | {v.get('format_ok', 1.0):.3f} |")
    lines += ["", "| GRPO run | kept prompts | their pass rate when kept | start model again (control) | after GRPO "
                  "| reward first step | last 5 | seconds |", "|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r.get('kept', r.get('prompts_kept'))} | {r.get('kept_pass_before', 0):.3f} | "
                     f"{r.get('kept_pass_start_resampled', 0):.3f} | {r.get('kept_pass_after', 0):.3f} | "
                     f"{r['reward_first']:.3f} | {r['reward_last']:.3f} | {r['seconds']:.0f} |")
    out = {"model": str(model_dir), "parent": a.parent, "work": str(work), "overrides": a.set,
           "teacher": {"digits": teacher_digits, "steps": teacher_steps}, "per_cell": a.per_cell,
           "samples_on": a.samples, "sampling_on": {"temperature": ecfg.on_temperature, "top_p": ecfg.on_top_p},
           "runs": runs, "results": results, "arms_mean_on": arms}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    Path(a.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("arm means (on):", json.dumps(arms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
