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
  responses with exactly one well-formed think block and of "off" responses with no think tags. A chat model
  whose template has no toggle (a parent such as SmolLM2-135M-Instruct, whose own template ignores
  ``enable_thinking``: :func:`thinkfast.toggle.has_toggle`) is asked once per prompt, greedy, in its template's
  one mode, ``single`` ("single (no toggle)" in the tables, toggle compliance "-"), with a note saying so.

The harness itself (prompts, grading, the batched evaluation, tables) is :mod:`thinkfast.evaluation`;
this module is the stage around it: which models, where results go, what is reused.

Suites (``suites``): ``nano`` (the nano world's cells, graded exactly by ``thinkfast.nano.tasks.verify``)
and the real math benchmarks of :mod:`thinkfast.evaluation.suites` read from the shared data folder (``gsm8k``,
``math500``, ``aime24``, ``aime25``; the first ``suite_limit`` items of each), graded by math-verify in
worker processes (:class:`thinkfast.tasks.math.MathGrader`) on the answer after the think block, with pass@1
averaged over ``samples``, pass@k for ``pass_k``, maj@n and the no-answer rate (:func:`evaluate_items`); and
``ifeval`` (IFEval's prompts as they are, graded by :mod:`thinkfast.tasks.ifeval`'s checkers on the answer after the
think block: prompt- and instruction-level accuracy, strict and loose; :func:`evaluate_ifeval`); ``nano_if``
(``if_problems`` held-out nano problems with 1-3 of IFEval's instructions, each asked greedily in both modes, the
same checkers: instruction-following strict accuracy as pass@1, with the arithmetic accuracy and the toggle's
format beside it; :func:`thinkfast.evaluation.if_check`; chat models only).

The model can be a server (``endpoint``: any OpenAI-compatible URL, e.g. a vLLM server of the same folder):
prompts are still built here with the folder's tokenizer (``model`` names the folder) and sent as token ids
(:mod:`thinkfast.generation.endpoint`), so local and served models are graded on the same prompts. The thinking-budget
sweep and throughput need a local model: with an endpoint they are skipped with a note (``eval: note: ...``, and in
the metrics' ``notes``), as is a budget sweep without the nano suite or of a model without a think block to
budget (text-prompted, or a chat template without the toggle), so that one config (the embedded one sets both)
serves every kind of evaluation: ``thinkfast eval --model DIR eval.suites=[ifeval]`` needs nothing else. A server
that fails, answers garbage or stops answering ends the evaluation with one line naming the request and the answer
(:mod:`thinkfast.generation.endpoint`).
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from ..artifacts import load_model
from ..config import to_dict
from ..generation import LocalBackend
from ..evaluation import (EvalSettings, budget_sweep, evaluate, evaluate_ifeval, evaluate_items, evaluate_phrased,
                          format_table, if_check, models_table, resolve_prompting, suites_table)
from ..evaluation.harness import SINGLE, chat_modes
from ..nano import tasks
from ..rundir import JsonlLogger, StageDir, atomic_dir, atomic_write_json, atomic_write_text
from . import Input, Inputs, check_device, positive, resolve_device

MAKES = None  # a leaf: results, no model


def reads(cfg) -> dict:
    # every model made before it in the pipeline (or the folder named by eval.model), one row each
    return {"models": Input("model", field="model", many=True)}

@dataclass
class EvalConfig(EvalSettings):
    """What to evaluate and how (the harness's sampling and reporting fields are :class:`EvalSettings`';
    defaults follow REFERENCE.md section 7 where it applies)."""

    model: str | None = None  # a model folder; default: every model made earlier in the run
    # stages whose models are not evaluated (e.g. [search, fuse]: the children before recovery answer nothing and
    # generate to max_new_tokens, most of the stage's time); their speed is the search's and fuse's own record
    skip: list[str] = field(default_factory=list)
    prompting: Literal["auto", "text", "chat"] = "auto"
    kinds: list[str] = field(default_factory=lambda: list(tasks.KINDS))
    digits: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps: list[int] = field(default_factory=lambda: [2])
    per_cell: int = 50
    # nano, nano_phrased (the nano problems worded as toggle SFT never saw: thinkfast.nano.tasks.PHRASINGS), nano_if
    # (nano problems with IFEval's instructions), gsm8k, math500, aime24, aime25, ifeval
    suites: list[str] = field(default_factory=lambda: ["nano"])
    if_problems: int = 100  # nano_if: held-out instruction prompts, each asked in both modes
    suite_limit: int | None = None  # the first N items of each real suite (None: all)
    suite_limits: dict[str, int | None] = field(default_factory=dict)  # per suite, over suite_limit (null: all)
    grade_workers: int = 2  # math-verify worker processes
    grade_timeout: float = 20.0  # seconds per answer; a hanging one is wrong
    # prefill / decode tokens per second of every model at these batch sizes, measured side by side (rounds
    # interleaved, medians); empty: not measured
    throughput_batches: list[int] = field(default_factory=list)
    throughput_prefill: int = 256  # tokens per sequence of the timed prefill
    throughput_context: int = 256  # cached tokens of the timed decode step
    throughput_rounds: int = 5
    # chat models: accuracy with reasoning on (greedy, the nano suite) at each thinking budget (tokens; null: no
    # budget), enforced by the rollout engine (thinkfast.generation.budget); empty: no sweep
    budgets: list[int | None] = field(default_factory=list)
    budget_grace: int = 16  # tokens past the budget before a hard close
    # which models the sweep runs on: every chat model, or only the last one evaluated (the run's product)
    budget_models: Literal["all", "last"] = "all"
    # an OpenAI-compatible server (http://host:port/v1) to evaluate instead of loading the model; the folder in
    # `model` gives the tokenizer and prompting
    endpoint: str | None = None
    endpoint_model: str | None = None  # the served model's name (default: the first the server lists)
    endpoint_concurrency: int = 16  # requests in flight
    # seconds a request may wait for its answer before it is retried (a long thinking answer on a busy server
    # takes minutes)
    endpoint_timeout: float = 300.0
    # extra attempts of a request that timed out, failed to connect or got HTTP 429 / 5xx (0.5 s backoff,
    # doubling); an answer of the wrong shape is never retried. Retries are counted in metrics["endpoint"]
    endpoint_retries: int = 2
    # the engine that generates the answers of a model folder: thinkfast's rollout engine, or real vLLM in a worker
    # process (thinkfast.generation.vllm_backend; vllm_python: a Python with vLLM, default .venv-vllm's). vLLM runs
    # no thinking budget (the sweep is skipped with a note); throughput stays thinkfast's own measurement
    engine: Literal["thinkfast", "vllm"] = "thinkfast"
    vllm_python: str | None = None
    vllm_dtype: str = "bfloat16"
    vllm_max_model_len: int = 4096
    device: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_device(self.device)
        unknown = sorted(set(self.kinds) - set(tasks.KINDS))
        if unknown:
            raise ValueError(f"kinds: unknown kind(s) {unknown}; choose from {list(tasks.KINDS)}")
        if self.per_cell < 1:
            raise ValueError(f"per_cell={self.per_cell} must be >= 1")
        from ..evaluation.suites import SUITES

        unknown = sorted(set(self.suites) - {*NANO_SUITES, "ifeval", *SUITES})
        if unknown or not self.suites:
            raise ValueError(f"suites: unknown {unknown}; choose from {[*NANO_SUITES, *sorted(SUITES), 'ifeval']}")
        positive(self, "if_problems")
        if self.suite_limit is not None and self.suite_limit < 1:
            raise ValueError(f"suite_limit={self.suite_limit} must be >= 1 (or null: every item)")
        for name, limit in self.suite_limits.items():
            if name not in self.suites:
                raise ValueError(f"suite_limits: {name!r} is not in suites {self.suites}")
            if limit is not None and limit < 1:
                raise ValueError(f"suite_limits.{name}={limit} must be >= 1 (or null: every item)")
        if self.grade_workers < 1 or not self.grade_timeout > 0:
            raise ValueError("grade_workers must be >= 1, grade_timeout > 0")
        if any(b is not None and b < 0 for b in self.budgets) or self.budget_grace < 0:
            raise ValueError("budgets (tokens, or null for none) and budget_grace must be >= 0")
        if any(b < 1 for b in self.throughput_batches) or min(self.throughput_prefill, self.throughput_context,
                                                               self.throughput_rounds) < 1:
            raise ValueError("throughput_batches entries, throughput_prefill, _context and _rounds must be >= 1")
        if self.endpoint is not None:
            if not self.endpoint.startswith(("http://", "https://")):
                raise ValueError(f"endpoint={self.endpoint!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
            if self.model is None:
                raise ValueError("endpoint: set eval.model to the served model's folder (its tokenizer builds the "
                                 "prompts)")
        if self.endpoint_concurrency < 1:
            raise ValueError(f"endpoint_concurrency={self.endpoint_concurrency} must be >= 1")
        if not self.endpoint_timeout > 0:
            raise ValueError(f"endpoint_timeout={self.endpoint_timeout} must be > 0 (seconds per request)")
        if self.endpoint_retries < 0:
            raise ValueError(f"endpoint_retries={self.endpoint_retries} must be >= 0")
        if self.engine == "vllm" and self.endpoint is not None:
            raise ValueError("engine: vllm generates from the model folder; endpoint evaluates a server: choose one")
        if self.vllm_max_model_len < 16:
            raise ValueError(f"vllm_max_model_len={self.vllm_max_model_len} must be >= 16")


    def limit(self, suite: str) -> int | None:
        """How many items of a real suite are evaluated (None: all)."""
        return self.suite_limits.get(suite, self.suite_limit)


Config = EvalConfig
NANO_SUITES = ("nano", "nano_phrased", "nano_if")


def budget_note(cfg: EvalConfig, prompting: str | None = None, modes: tuple[str, ...] | None = None) -> str | None:
    """Why ``budgets`` do not apply (None: they do, or there are none); ``modes``: the chat model's
    (:func:`thinkfast.evaluation.harness.chat_modes`), when known. A setting that does not apply is skipped with a
    note, not refused: the embedded config sweeps budgets, and evaluating a server, only the real suites or a
    parent without the toggle with it should just work."""
    if not cfg.budgets:
        return None
    if cfg.endpoint is not None:
        return "budgets skipped: the thinking budget runs inside the local engine, not on a server (eval.endpoint)"
    if cfg.engine == "vllm":
        return "budgets skipped: the thinking budget runs inside thinkfast's engine, not in vLLM (eval.engine)"
    if "nano" not in cfg.suites:
        return "budgets skipped: the sweep runs on the nano suite, which is not in eval.suites"
    if prompting == "text":
        return "budgets skipped: the model is prompted as text, with no think block to budget"
    if modes == (SINGLE,):
        return "budgets skipped: the model's chat template has no reasoning toggle, so no think block to budget"
    return None


def _note(notes: list[str], note: str | None) -> None:
    if note is not None:
        print(f"eval: note: {note}")
        notes.append(note)


def _suite_paths(cfg: EvalConfig) -> dict[str, Path]:
    """The data file of every real suite in ``cfg.suites``."""
    from ..evaluation.suites import IFEVAL_FILE, SUITES, data_root

    return {name: data_root() / (IFEVAL_FILE if name == "ifeval" else SUITES[name][0])
            for name in cfg.suites if name not in NANO_SUITES}


def check_suite_data(cfg: EvalConfig) -> None:
    """Every suite's file is there, checked before a model is loaded or a prompt sent: a missing one found
    after the other suites ran would throw their results away."""
    from ..evaluation.suites import data_root

    missing = {name: path for name, path in _suite_paths(cfg).items() if not path.is_file()}
    if missing:
        raise FileNotFoundError(
            f"eval: no data for suite(s) {', '.join(f'{n} ({p})' for n, p in missing.items())}: put the files "
            f"under {data_root()} (the shared data folder; see its SOURCES.md), set THINKFAST_DATA to a folder "
            f"that has them, or drop the suites from eval.suites")


def evaluate_folder(cfg: EvalConfig, path: Path, out: Path) -> dict:
    """Evaluate the model folder ``path``; write metrics.json, table.txt and samples.jsonl into ``out``."""
    from transformers import AutoTokenizer

    check_suite_data(cfg)
    device = resolve_device(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompting = resolve_prompting(path, tokenizer, cfg.prompting)
    modes = chat_modes(tokenizer) if prompting == "chat" else None
    notes: list[str] = []
    if modes == (SINGLE,):
        _note(notes, f"the chat template has no reasoning toggle (enable_thinking changes nothing): every prompt is "
                     f"asked once, greedy, in its own mode '{SINGLE}'; no toggle compliance")
    skip_budgets = budget_note(cfg, prompting, modes)
    _note(notes, skip_budgets)
    with atomic_dir(out) as tmp:
        with JsonlLogger(tmp / "log.jsonl") as log:
            if cfg.endpoint is not None:
                from ..generation.endpoint import Endpoint

                lock = threading.Lock()

                def on_retry(line: str) -> None:  # from the request threads: one at a time
                    with lock:
                        print(f"eval: {line}")
                        log.log("endpoint_retry", message=line)

                backend = Endpoint(cfg.endpoint, tokenizer, cfg.endpoint_model, concurrency=cfg.endpoint_concurrency,
                                 timeout=cfg.endpoint_timeout, retries=cfg.endpoint_retries, on_retry=on_retry)
            elif cfg.engine == "vllm":
                from ..generation.vllm_backend import VLLMBackend

                backend = VLLMBackend(path, python=cfg.vllm_python, dtype=cfg.vllm_dtype,
                                      max_model_len=cfg.vllm_max_model_len)
            else:
                backend = LocalBackend(load_model(path).to(device).eval())
            metrics, kept = {"prompting": prompting, "modes": {}}, []
            # the nano cells: the nano suite's problems, and nano_phrased's in other wordings
            suite = tasks.eval_suite(seed=cfg.seed, per_cell=cfg.per_cell, kinds=tuple(cfg.kinds),
                                     digits=tuple(cfg.digits), steps=tuple(cfg.steps))
            if "nano" in cfg.suites:
                log.log("start", model=str(path), prompting=prompting, cells=len(suite))
                with torch.no_grad():
                    metrics, kept = evaluate(backend, tokenizer, suite, prompting, cfg, log)
            if cfg.budgets and skip_budgets is None:
                with torch.no_grad():
                    metrics["budget"] = budget_sweep(backend, tokenizer, [p for c in suite.values() for p in c],
                                                     cfg.budgets,
                                                     grace=cfg.budget_grace, max_new_tokens=cfg.max_new_tokens,
                                                     batch_size=cfg.batch_size)
                for point in metrics["budget"]:
                    log.log("budget", **point)
            real = [s for s in cfg.suites if s not in (*NANO_SUITES, "ifeval")]
            if "nano_phrased" in cfg.suites and prompting == "text":
                _note(notes, "nano_phrased skipped: a text-prompted model is asked in its one text format")
            elif "nano_phrased" in cfg.suites:
                log.log("suite", suite="nano_phrased", items=sum(len(c) for c in suite.values()))
                with torch.no_grad():
                    metrics.setdefault("suites", {})["nano_phrased"], more = evaluate_phrased(backend, tokenizer, suite,
                                                                                             cfg, log)
                kept += more
            if "nano_if" in cfg.suites and prompting == "text":
                _note(notes, "nano_if skipped: a text-prompted model has no chat turn to carry instructions")
            elif "nano_if" in cfg.suites:
                from ..tasks.instructions import nano_if_items

                items = nano_if_items(cfg.if_problems, seed=cfg.seed, kinds=tuple(cfg.kinds), digits=tuple(cfg.digits),
                                      steps=tuple(cfg.steps), split="eval")
                log.log("suite", suite="nano_if", items=len(items))
                with torch.no_grad():
                    result = if_check(backend, tokenizer, items, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size, modes=modes)
                metrics.setdefault("suites", {})["nano_if"] = {
                    mode: {"pass@1": r["if_strict"], **r} for mode, r in result.items()}
            if "ifeval" in cfg.suites:
                from ..tasks.ifeval import load_ifeval
                from ..evaluation.suites import IFEVAL_FILE, data_root

                items = load_ifeval(data_root() / IFEVAL_FILE, limit=cfg.limit("ifeval"))
                log.log("suite", suite="ifeval", items=len(items))
                with torch.no_grad():
                    metrics.setdefault("suites", {})["ifeval"], more = evaluate_ifeval(backend, tokenizer, items,
                                                                                      prompting, cfg, log)
                kept += [{"suite": "ifeval", **r} for r in more]
            if real:
                from ..tasks.math import MathGrader
                from ..evaluation.suites import load_suite

                metrics.setdefault("suites", {})
                with MathGrader(cfg.grade_workers, cfg.grade_timeout) as grader, torch.no_grad():
                    for name in real:
                        items = load_suite(name, limit=cfg.limit(name))
                        log.log("suite", suite=name, items=len(items))
                        metrics["suites"][name], more = evaluate_items(backend, tokenizer, items, prompting, cfg,
                                                                       grader, log)
                        kept += [{"suite": name, **r} for r in more]
            if hasattr(backend, "close"):  # the vLLM worker (it also ends when this process does)
                backend.close()
        metrics["model"] = str(path) if cfg.endpoint is None else f"{backend.model} at {cfg.endpoint}"
        metrics["notes"] = notes
        if cfg.engine == "vllm":
            metrics["engine"] = f"vllm ({cfg.vllm_dtype})"
        if cfg.endpoint is not None:
            metrics["endpoint"] = backend.stats()
        atomic_write_text(tmp / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        tables = ([format_table(metrics)] if metrics["modes"] else []) + (
            [suites_table({path.name: metrics})] if metrics.get("suites") else [])
        atomic_write_text(tmp / "table.txt", "\n\n".join(tables) + "\n")
        atomic_write_json(tmp / "metrics.json", metrics)
    return metrics


def _suite_files(cfg: EvalConfig) -> dict:
    """The real suites' files, by content (an evaluation is redone when one changes)."""
    import hashlib

    return {name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
            for name, path in _suite_paths(cfg).items()}


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
    unknown = [n for n in cfg.skip if n not in models]
    if unknown and cfg.model is None:
        raise ValueError(f"eval.skip: {unknown} made no model in this run (models: {list(models)})")
    models = {n: p for n, p in models.items() if n not in cfg.skip}
    if not models:
        raise ValueError("eval: no model to evaluate (set eval.model or put a model-making stage before eval)")
    check_suite_data(cfg)
    # what decides the results: not how a server is waited for, nor budgets that do not apply (a model's
    # evaluation with such budgets is the one without)
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("device", "save_samples", "model", "skip", "endpoint_timeout", "endpoint_retries",
                             "budget_models")
                and not k.startswith("throughput")}
    if budget_note(cfg) is not None:
        settings["budgets"] = []
    notes: list[str] = []
    if cfg.throughput_batches and cfg.endpoint is not None:
        _note(notes, "throughput_batches skipped: throughput is timed on the local model, not a server "
                     "(eval.endpoint)")
    previous = getattr(inputs, "previous", None)
    results = {}
    last = list(models)[-1]
    for name, path in models.items():
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"eval: no model folder at {path} (no config.json)")
        model_cfg = cfg if cfg.budget_models == "all" or name == last else replace(cfg, budgets=[])
        ref = inputs.ids.get("models", {}).get(name) if hasattr(inputs, "ids") else None
        record = {"settings": json.loads(json.dumps({**settings, "budgets": settings["budgets"] if model_cfg.budgets
                                                     else []})),
                  "model": ref, "suites": _suite_files(cfg)}
        out = stage.path / name
        done = _reusable(out, record) if ref and cfg.endpoint is None else None  # a server may change: redo
        if (done is None and ref and cfg.endpoint is None and previous is not None
                and _reusable(previous.path / name, record) is not None):
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(previous.path / name, out)
            done = _reusable(out, record)
            print(f"eval: {name}: reusing the evaluation of this very model from {previous.path / name}")
        if done is None:
            print(f"eval: {name}: {path}")
            shutil.rmtree(out, ignore_errors=True)
            done = evaluate_folder(model_cfg, path, out)
            atomic_write_json(out / "record.json", record)
        if done.get("modes"):
            print(f"{name}:\n{format_table(done)}")
        results[name] = done
    # the nano suite's table, and the real suites' (a model folder evaluated on real suites only has no empty one)
    tables = [models_table(results)] if any(m.get("modes") for m in results.values()) else []
    if any(m.get("suites") for m in results.values()):
        tables.append(suites_table(results))
    out: dict = {"models": results, "notes": notes}
    if cfg.throughput_batches and cfg.endpoint is None:
        out["throughput"] = measure_throughput(cfg, {name: Path(p) for name, p in models.items()})
        atomic_write_json(stage.path / "throughput.json", out["throughput"])
        tables.append(throughput_table(out["throughput"]))
    table = "\n\n".join(tables)
    atomic_write_text(stage.path / "table.txt", table + "\n")
    print(table)
    return out


def measure_throughput(cfg: EvalConfig, folders: dict[str, Path]) -> dict:
    """Every model's prefill and decode tokens/s, side by side
    (:func:`thinkfast.puzzle.timing.interleaved_throughput`), and each one's ratio to the first model's (the
    parent, in a pipeline)."""
    from ..artifacts import load_decilm
    from ..puzzle.timing import device_name, interleaved_throughput

    device = resolve_device(cfg.device)
    models = {name: load_decilm(path, device).eval() for name, path in folders.items()}
    tps = interleaved_throughput(models, cfg.throughput_batches, cfg.throughput_prefill, cfg.throughput_context,
                                 device, rounds=cfg.throughput_rounds)
    first = next(iter(tps.values()))
    return {"device": device_name(device), "prefill_len": cfg.throughput_prefill,
            "decode_context": cfg.throughput_context, "rounds": cfg.throughput_rounds,
            "models": {name: {**v, **{f"x_{k}": v[k] / first[k] for k in v}} for name, v in tps.items()}}


def throughput_table(t: dict) -> str:
    """One row per model: tokens/s per kind and batch, and the ratio to the first model."""
    keys = [k for k in next(iter(t["models"].values())) if not k.startswith("x_")]
    head = f"{'model':<16}" + "".join(f"{k:>24}" for k in keys)
    lines = [f"throughput on {t['device']} (prefill {t['prefill_len']} tokens, decode over {t['decode_context']})",
             head, "-" * len(head)]
    for name, v in t["models"].items():
        lines.append(f"{name:<16}" + "".join(f"{v[k]:>15.0f} ({v['x_' + k]:.2f}x)" for k in keys))
    return "\n".join(lines)
