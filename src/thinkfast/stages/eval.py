"""Stage ``eval``: accuracy of any model folder on the nano-world suite, per mode and difficulty.

Paper: Llama-Nemotron evaluates every benchmark with reasoning on and off (arXiv 2505.00949 section 5;
REFERENCE.md section 7): "on" at temperature 0.6 / top-p 0.95 with pass@1 averaged over n samples,
"off" greedy; reasoning traces are stripped before grading and an unclosed think block is no answer.

Two ways to prompt a model, chosen by ``prompting`` (``auto`` reads ``thinkfast.json`` in the model
folder, written by the stage that made it, and falls back to ``chat`` when the tokenizer has a chat
template):
- ``text`` (a pretrained parent, which has never seen a chat format): mode ``think`` ends the prompt
  with "Let's think step by step." and mode ``direct`` with "Answer: "; both greedy.
- ``chat`` (a model taught the toggle): modes ``on`` / ``off`` through the chat template's
  ``enable_thinking``. Besides accuracy it reports how well the toggle is obeyed: the share of "on"
  responses with exactly one well-formed think block and of "off" responses with no think tags.

Departures: the nano suite replaces the paper's benchmarks (those come with the evaluation issue);
answers are graded by ``thinkfast.nano.tasks.verify`` (exact integer) rather than math-verify.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..artifacts import load_model, read_model_sidecar
from ..config import to_dict
from ..generation import SamplingParams, generate
from ..nano import tasks
from ..rundir import JsonlLogger, StageDir, atomic_dir, atomic_write_json, atomic_write_text
from ..toggle import format_ok, messages_for, parse_response, stop_token_ids
from . import Input, Inputs, check_device, resolve_device

MAKES = None  # a leaf: results, no model


def reads(cfg) -> dict:
    # every model made before it in the pipeline (or the folder named by eval.model), one row each
    return {"models": Input("model", field="model", many=True)}

TEXT_MODES = ("think", "direct")
CHAT_MODES = ("on", "off")


@dataclass
class EvalConfig:
    """What to evaluate and how (defaults follow REFERENCE.md section 7 where it applies)."""

    model: str | None = None  # a model folder; default: every model made earlier in the run
    prompting: Literal["auto", "text", "chat"] = "auto"
    kinds: list[str] = field(default_factory=lambda: list(tasks.KINDS))
    digits: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps: list[int] = field(default_factory=lambda: [2])
    per_cell: int = 50
    seed: int = 1234
    max_new_tokens: int = 1200
    batch_size: int = 64
    samples: int = 1  # samples per problem in the sampled mode ("on"); pass@1 is their mean
    on_temperature: float = 0.6
    on_top_p: float = 0.95
    headline_digits: int = 2  # the difficulty quoted as the headline figure
    save_samples: int = 3  # responses kept per cell and mode in samples.jsonl
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        unknown = sorted(set(self.kinds) - set(tasks.KINDS))
        if unknown:
            raise ValueError(f"kinds: unknown kind(s) {unknown}; choose from {list(tasks.KINDS)}")
        for name in ("per_cell", "max_new_tokens", "batch_size", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.save_samples < 0 or not self.on_temperature >= 0 or not 0 < self.on_top_p <= 1:
            raise ValueError("save_samples and on_temperature must be >= 0, on_top_p in (0, 1]")


Config = EvalConfig


def resolve_prompting(model_dir: Path, tokenizer, requested: str) -> str:
    if requested != "auto":
        return requested
    meta = read_model_sidecar(model_dir)
    if meta:
        return meta["prompting"]
    return "chat" if getattr(tokenizer, "chat_template", None) else "text"


def build_prompt(tokenizer, problem: tasks.Problem, prompting: str, mode: str) -> list[int]:
    if prompting == "text":
        return tokenizer(tasks.text_prompt(problem, mode), add_special_tokens=False)["input_ids"]
    messages = messages_for(tasks.chat_prompt(problem), thinking=None)
    ids = tokenizer.apply_chat_template(
        messages, enable_thinking=(mode == "on"), add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def grade(problem: tasks.Problem, text: str, prompting: str, mode: str) -> dict:
    """Grade one response: correct, and (chat) whether the toggle's format was obeyed."""
    if prompting == "text":
        # the prompt's own tail is part of the answer ("...\nAnswer: " + "85")
        return {"correct": tasks.verify(problem, tasks.text_prompt(problem, mode) + text), "format_ok": True}
    answer = parse_response(text).answer  # None for malformed think blocks: no guessing
    return {
        "correct": answer is not None and tasks.verify(problem, answer),
        "format_ok": format_ok(text, thinking=(mode == "on")),
    }


def evaluate(model, tokenizer, suite: dict, prompting: str, cfg: EvalConfig, log=None) -> tuple[dict, list]:
    """Evaluate every mode on every cell. Returns (metrics, kept sample records)."""
    modes = TEXT_MODES if prompting == "text" else CHAT_MODES
    stops = tuple(stop_token_ids(tokenizer))
    metrics: dict = {"prompting": prompting, "modes": {}}
    kept = []
    for mode in modes:
        sampled = prompting == "chat" and mode == "on"
        n = cfg.samples if sampled else 1
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.on_temperature if sampled else 0.0,
            top_p=cfg.on_top_p if sampled else 1.0,
            stop_token_ids=stops,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        items = [(cell, p) for cell, problems in suite.items() for p in problems for _ in range(n)]
        prompts = [build_prompt(tokenizer, p, prompting, mode) for _, p in items]
        completions = generate(model, prompts, params, progress=True)
        cells: dict = {}
        for (cell, problem), comp in zip(items, completions):
            text = tokenizer.decode(comp.token_ids, skip_special_tokens=True)
            g = grade(problem, text, prompting, mode)
            key = f"{cell[0]}/{cell[1]}d" + (f"/{cell[2]}s" if cell[0] == "word" else "")
            c = cells.setdefault(key, {"correct": [], "tokens": [], "format_ok": [], "truncated": []})
            c["correct"].append(g["correct"])
            c["format_ok"].append(g["format_ok"])
            c["tokens"].append(len(comp.token_ids))
            c["truncated"].append(comp.finish_reason == "length")
            if len(c["correct"]) <= cfg.save_samples:
                kept.append({"mode": mode, "cell": key, "question": problem.question, "answer": problem.answer,
                             "response": text, **g})
        summary = {
            key: {
                "accuracy": statistics.fmean(c["correct"]),
                "mean_tokens": statistics.fmean(c["tokens"]),
                "format_ok": statistics.fmean(c["format_ok"]),
                "truncated": statistics.fmean(c["truncated"]),
                "n": len(c["correct"]),
            }
            for key, c in cells.items()
        }
        everything = [x for c in cells.values() for x in c["correct"]]
        headline = [x for key, c in cells.items() if f"/{cfg.headline_digits}d" in key for x in c["correct"]]
        metrics["modes"][mode] = {
            "accuracy": statistics.fmean(everything),
            f"accuracy_{cfg.headline_digits}d": statistics.fmean(headline) if headline else None,
            "mean_tokens": statistics.fmean(t for c in cells.values() for t in c["tokens"]),
            "format_ok": statistics.fmean(x for c in cells.values() for x in c["format_ok"]),
            "cells": summary,
        }
        if log is not None:
            log.log("mode", mode=mode, **{k: v for k, v in metrics["modes"][mode].items() if k != "cells"})
    return metrics, kept


def format_table(metrics: dict) -> str:
    """A plain-text table: one row per cell, one column pair (accuracy, tokens) per mode."""
    modes = list(metrics["modes"])
    cells = list(next(iter(metrics["modes"].values()))["cells"])
    head = f"{'cell':<12}" + "".join(f"{m + ' acc':>11}{m + ' tok':>11}" for m in modes)
    lines = [head, "-" * len(head)]
    for key in cells:
        row = f"{key:<12}"
        for m in modes:
            c = metrics["modes"][m]["cells"][key]
            row += f"{c['accuracy']:>11.3f}{c['mean_tokens']:>11.1f}"
        lines.append(row)
    row = f"{'all':<12}"
    for m in modes:
        row += f"{metrics['modes'][m]['accuracy']:>11.3f}{metrics['modes'][m]['mean_tokens']:>11.1f}"
    lines.append(row)
    return "\n".join(lines)


def evaluate_folder(cfg: EvalConfig, path: Path, out: Path) -> dict:
    """Evaluate the model folder ``path``; write metrics.json, table.txt and samples.jsonl into ``out``."""
    from transformers import AutoTokenizer

    device = resolve_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path).to(device).eval()
    prompting = resolve_prompting(path, tokenizer, cfg.prompting)
    suite = tasks.eval_suite(seed=cfg.seed, per_cell=cfg.per_cell, kinds=tuple(cfg.kinds),
                             digits=tuple(cfg.digits), steps=tuple(cfg.steps))
    with atomic_dir(out) as tmp:
        with JsonlLogger(tmp / "log.jsonl") as log:
            log.log("start", model=str(path), prompting=prompting, cells=len(suite))
            with torch.no_grad():
                metrics, kept = evaluate(model, tokenizer, suite, prompting, cfg, log)
        metrics["model"] = str(path)
        atomic_write_text(tmp / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        atomic_write_text(tmp / "table.txt", format_table(metrics) + "\n")
        atomic_write_json(tmp / "metrics.json", metrics)
    return metrics


def models_table(results: dict[str, dict]) -> str:
    """One row per model: accuracy overall and at the headline difficulty, mean tokens, per mode."""
    head = f"{'model':<16}{'prompting':<11}{'mode':<8}{'accuracy':>10}{'headline':>10}{'tokens':>9}"
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        for mode, r in m["modes"].items():
            headline = next((v for k, v in r.items() if k.startswith("accuracy_")), None)
            lines.append(f"{name:<16}{m['prompting']:<11}{mode:<8}{r['accuracy']:>10.3f}"
                         f"{'' if headline is None else f'{headline:.3f}':>10}{r['mean_tokens']:>9.1f}")
    return "\n".join(lines)


def _reusable(folder: Path, record: dict) -> dict | None:
    """The metrics in ``folder`` when it holds a finished evaluation with exactly this record."""
    try:
        if json.loads((folder / "record.json").read_text()) == record:
            return json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        pass
    return None


def run(cfg: EvalConfig, stage: StageDir, inputs: Inputs) -> dict:
    """Evaluate every model in ``inputs["models"]`` into ``NAME/`` and write one table, a row per model.
    A model whose evaluation (same config, same model identity) is already in this stage's interrupted
    work or its previous output is not evaluated again."""
    models = inputs.get("models") or {}
    if not models:
        raise ValueError("eval: no model to evaluate (set eval.model or put a model-making stage before eval)")
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("device", "save_samples", "model")}
    previous = getattr(inputs, "previous", None)
    results = {}
    for name, path in models.items():
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"eval: no model folder at {path} (no config.json)")
        ref = inputs.ids.get("models", {}).get(name) if hasattr(inputs, "ids") else None
        record = {"settings": json.loads(json.dumps(settings)), "model": ref}
        out = stage.path / name
        done = _reusable(out, record) if ref else None
        if done is None and ref and previous is not None and _reusable(previous.path / name, record) is not None:
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(previous.path / name, out)
            done = _reusable(out, record)
            print(f"eval: {name}: reusing the evaluation of this very model from {previous.path / name}")
        if done is None:
            print(f"eval: {name}: {path}")
            shutil.rmtree(out, ignore_errors=True)
            done = evaluate_folder(cfg, path, out)
            atomic_write_json(out / "record.json", record)
        print(f"{name}:\n{format_table(done)}")
        results[name] = done
    table = models_table(results)
    atomic_write_text(stage.path / "table.txt", table + "\n")
    print(table)
    return {"models": results}
