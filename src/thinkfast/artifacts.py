"""The files that cross between pipeline stages: their schemas, readers and checks (one owner).

Every reader checks what it reads and raises :class:`ArtifactError` (a :class:`~thinkfast.config.ConfigError`)
naming the file, the field path and the value at fault, and what to do, e.g.::

    runs/x/costs/costs.json: attention.gqa_kv2.decode_s["16"] = -0.0008: a time must be a finite
    number >= 0 (re-run the costs stage, or fix the file)

A missing file raises :class:`MissingArtifact` (also a ``FileNotFoundError``). Extra keys are allowed
everywhere (a user may annotate the files); the keys below are required unless marked optional.

Library folder (stage ``library``): ``library.json`` and ``weights.safetensors`` (keys
``layers.{layer}.{weights}.{param}``)::

    {"format": "thinkfast-puzzle-library/1", "mode": "decoupled" | "coupled",
     "engine": "vllm" | "sglang" | "trtllm" | "hf",  # optional (hf): the serving engine it was made for
     "layers": [0, 1, ...],                       # distinct ints >= 0 (< parent_config.num_hidden_layers)
     "parent_config": {...},                      # the parent's nemotron-nas config
     "variants": [{"layer": 0, "part": "attention" | "ffn", "name": "gqa_kv1", "spec": {...},
                   "weights": "attention.gqa_kv1", ...}, ...]}

  coupled mode: ``part: "block"`` with ``attention``, ``ffn`` (names), ``attention_spec``, ``ffn_spec``
  instead of ``spec``. Every layer has variants (decoupled: an attention and an FFN one); no
  (layer, part, name) twice. The parent's own sub-blocks come first in each layer.

``scores.json`` (stage ``scores``)::

    {"format": "thinkfast-puzzle-scores/1", "metric_names": ["kl", "lm_loss"],   # non-empty, str
     "blocks": [{"layer": 0, "attention": "gqa_kv2", "ffn": "ffn_344", "kl": 0.0, "lm_loss": 0.41}, ...]}

  every metric of ``metric_names`` in every block, a finite number >= 0 (values in [-1e-6, 0), float
  rounding of a KL, read as 0); no (layer, attention, ffn) twice. Against a library: a score for
  exactly the blocks it offers (:func:`library_pairs`).

``costs.json`` (stage ``costs``)::

    {"format": "thinkfast-puzzle-costs/1", "device": "cpu: ...", "dtype": "float32",
     "batch_sizes": [1, 16],                      # distinct ints >= 1
     "prefill_len": 256, "decode_context": 256,   # ints >= 1 and >= 0
     "attention": {NAME: ENTRY, ...}, "ffn": {NAME: ENTRY, ...}, "fixed": ENTRY,
     "parent_model": {"prefill_s": TIMES, "decode_s": TIMES},          # optional
     "first_layer_model": {"prefill_s": TIMES, "decode_s": TIMES},     # optional: the parent cut to layer 0
     "layer": {"prefill_s": TIMES, "decode_s": TIMES}}                 # optional: per kept layer (measure: children)
    ENTRY = {"params": n, "param_bytes": n, "kv_bytes_per_token": n,   # finite >= 0; kv: attention only
             "prefill_s": TIMES, "decode_s": TIMES}                     # (optional elsewhere)
    TIMES = {"1": seconds, "16": seconds}        # a key str(b) for every batch size b

  Times: a variant's are finite and >= 0 (a no-op, or a block costed by hand, may be free); those of
  ``fixed``, ``parent_model`` and ``first_layer_model`` finite and > 0 (every model takes time; speedups divide by
  them).
  Against a library: an entry for every attention and FFN variant name it uses.

``thinkfast.json`` in a model folder (the sidecar: how to prompt the model, which stage made it)::

    {"prompting": "text" | "chat", "made_by": "pretrain", ...}

``curve.json`` of a training stage (distill, sft, grpo; :class:`Curve`, :func:`write_curve`, :func:`read_curve`),
what the report plots without knowing the stage::

    {"format": "thinkfast-curve/1",
     "points": [{"step": 0, "tokens": 0, "loss": 2.1, "on": {"accuracy": 0.5, ...}, ...}, ...],  # evaluations
     "steps": [{"step": 0, "reward": 0.25, ...}, ...],   # optional: one record per training step
     "plot": [{"label": "loss", "y": "loss"}, {"label": "accuracy on", "y": "on.accuracy"},
              {"label": "reward", "y": "reward", "of": "steps"}],  # y: a dotted key; of: points (default)
     "log_y": false}                                      # optional

  Earlier runs wrote a list of evaluation points (distill, sft) or ``{"eval": [...], "steps": [...]}`` (grpo);
  :func:`read_curve` reads both.

The names of the files themselves: a stage's output of each kind (:data:`OUTPUTS`), its completion marker
(:data:`COMPLETE`, written last) and the marker of a started run that owns its checkpoint (:data:`STARTED`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .atomic import atomic_write_json
from .config import ConfigError
from .modeling.engine_rules import ENGINES, library_engine

__all__ = ["ArtifactError", "COMPLETE", "COSTS_FORMAT", "CURVE", "CURVE_FORMAT", "Curve", "LIBRARY_FORMAT",
           "MissingArtifact", "OUTPUTS", "SCORES_FORMAT", "SIDECAR", "STARTED", "TOKENIZER_FILES", "check_costs",
           "check_scores", "check_weights", "check_weights_match_config", "copy_tokenizer_files", "library_pairs",
           "load_model", "load_sequence_classifier", "load_tensors", "read_costs", "read_curve", "read_json",
           "read_library", "read_model_sidecar", "read_scores", "write_curve", "write_model_sidecar"]

LIBRARY_FORMAT = "thinkfast-puzzle-library/1"
SCORES_FORMAT = "thinkfast-puzzle-scores/1"
COSTS_FORMAT = "thinkfast-puzzle-costs/1"
SIDECAR = "thinkfast.json"
CURVE = "curve.json"
CURVE_FORMAT = "thinkfast-curve/1"
COMPLETE = "COMPLETE.json"  # a stage's completion marker, written last
STARTED = "STARTED.json"  # the config of the run that owns a stage's checkpoint
# where each kind of output (a stage's MAKES) lives inside its stage's folder
OUTPUTS = {"model": "model", "library": "library", "scores": "scores.json", "costs": "costs.json",
           # a scalar-head model (stage reward_model): its own kind, so no later stage takes it for "the latest model"
           "reward_model": "reward_model"}
# what a model folder carries besides weights and config (a child made from it carries the same)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
PROMPTINGS = ("text", "chat")


class ArtifactError(ConfigError):
    """A stage's file is missing, unreadable or breaks its schema; the message names file and field."""


class MissingArtifact(ArtifactError, FileNotFoundError):
    """The file or folder does not exist."""


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class _Check:
    """Field checks of one file; each failure names ``where``, the field path and the value."""

    _NO = object()

    def __init__(self, where: Any, hint: str):
        self.where, self.hint = str(where), hint

    def fail(self, field: str, problem: str, value: Any = _NO) -> NoReturn:
        shown = "" if value is self._NO else f" = {_show(value)}"
        raise ArtifactError(f"{self.where}: {field}{shown}: {problem} ({self.hint})")

    def get(self, obj: dict, key: str, kind: type, at: str = "") -> Any:
        """``obj[key]``, required to be a ``kind`` (int excludes bool)."""
        field = f"{at}.{key}" if at else key
        if key not in obj:
            self.fail(field, f"missing (expected {_KINDS[kind]})")
        return self.kind(obj[key], kind, field)

    def kind(self, value: Any, kind: type, field: str) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.fail(field, f"expected {_KINDS[kind]}", value)
        return value

    def integer(self, obj: dict, key: str, low: int, at: str = "") -> int:
        value = self.get(obj, key, int, at)
        if value < low:
            self.fail(f"{at}.{key}" if at else key, f"must be >= {low}", value)
        return value

    def number(self, value: Any, field: str, what: str = "a number", positive: bool = False) -> float:
        """A finite int or float, >= 0 (> 0 with ``positive``)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (positive and value == 0):
            self.fail(field, f"{what} must be a finite number {'>' if positive else '>='} 0", value)
        return float(value)

    def top(self, data: Any, fmt: str | None = None) -> dict:
        if not isinstance(data, dict):
            self.fail("(top level)", "expected a JSON object", data)
        if fmt is not None and data.get("format") != fmt:
            self.fail("format", f"expected {fmt!r}", data.get("format"))
        return data


_KINDS = {int: "an int", str: "a string", dict: "an object", list: "a list"}


def read_json(path: str | Path, hint: str = "") -> Any:
    """Parsed JSON of ``path`` (``NaN``/``Infinity`` read as Python does; the checks reject them)."""
    path = Path(path)
    tail = f" ({hint})" if hint else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingArtifact(f"{path}: no such file{tail}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read it as text: {e}{tail}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg}); fix the file "
                            "or re-run the stage that wrote it") from None


# ------------------------------------------------------------------ library


def read_library(path: str | Path) -> dict:
    """``library.json`` of the library folder ``path``, checked (module docstring); its weights file
    must be there with a readable header."""
    path = Path(path)
    where = path / "library.json"
    lib = read_json(where, "run the library stage first")
    c = _Check(where, "re-run the library stage with --force, or fix the file")
    c.top(lib, LIBRARY_FORMAT)
    if library_engine(lib) not in ENGINES:  # optional
        c.fail("engine", "expected vllm, sglang, trtllm or hf", lib.get("engine"))
    mode = c.get(lib, "mode", str)
    if mode not in ("decoupled", "coupled"):
        c.fail("mode", "expected 'decoupled' or 'coupled'", mode)
    layers = c.get(lib, "layers", list)
    for k, i in enumerate(layers):
        if c.kind(i, int, f"layers[{k}]") < 0 or i in layers[:k]:
            c.fail(f"layers[{k}]", "layers must be distinct ints >= 0", i)
    n = c.get(lib, "parent_config", dict).get("num_hidden_layers")
    if isinstance(n, int) and any(i >= n for i in layers):
        c.fail("layers", f"the parent (parent_config.num_hidden_layers) has {n} layers", layers)
    parts = ("attention", "ffn") if mode == "decoupled" else ("block",)
    seen: dict[tuple, int] = {}
    have: dict[int, set] = {}
    for k, v in enumerate(c.get(lib, "variants", list)):
        at = f"variants[{k}]"
        c.kind(v, dict, at)
        layer = c.get(v, "layer", int, at)
        if layer not in layers:
            c.fail(f"{at}.layer", f"not one of the library's layers {layers}", layer)
        part = c.get(v, "part", str, at)
        if part not in parts:
            c.fail(f"{at}.part", f"a {mode} library's parts are {list(parts)}", part)
        name = c.get(v, "name", str, at)
        c.get(v, "weights", str, at)
        if part == "block":
            for key, kind in (("attention", str), ("ffn", str), ("attention_spec", dict), ("ffn_spec", dict)):
                c.get(v, key, kind, at)
        else:
            c.get(v, "spec", dict, at)
        if (layer, part, name) in seen:
            c.fail(f"{at}.name", f"layer {layer} already has {part} {name!r} (variants[{seen[layer, part, name]}])",
                   name)
        seen[layer, part, name] = k
        have.setdefault(layer, set()).add(part)
    for i in layers:
        lacking = [p for p in parts if p not in have.get(i, ())]
        if lacking:
            c.fail("variants", f"layer {i} has no {' or '.join(lacking)} variant")
    weights = path / "weights.safetensors"
    if not weights.is_file():
        raise MissingArtifact(f"{weights}: no such file (re-run the library stage with --force)")
    _check_safetensors(weights, "library")
    return lib


def library_pairs(lib: dict) -> dict[int, list[tuple[str, str]]]:
    """``{layer: [(attention, ffn), ...]}``: the whole-layer blocks a (checked) library offers, parent's
    own first. Decoupled: every attention variant with every FFN variant; coupled: the listed pairs."""
    out: dict[int, list[tuple[str, str]]] = {}
    for i in lib["layers"]:
        entries = [v for v in lib["variants"] if v["layer"] == i]
        if lib["mode"] == "coupled":
            out[i] = [(v["attention"], v["ffn"]) for v in entries]
        else:
            out[i] = [(a["name"], f["name"]) for a in entries if a["part"] == "attention"
                      for f in entries if f["part"] == "ffn"]
    return out


# ------------------------------------------------------------------ scores


def read_scores(path: str | Path, library: dict | None = None) -> dict:
    """``scores.json``, checked (module docstring); with ``library``, against the blocks it offers."""
    return check_scores(read_json(path, "run the scores stage first"), str(path), library)


def check_scores(data: Any, where: str, library: dict | None = None) -> dict:
    """Check scores data in memory as :func:`read_scores` does (``where`` names it in messages)."""
    c = _Check(where, "re-run the scores stage, or fix the file")
    c.top(data, SCORES_FORMAT)
    metrics = c.get(data, "metric_names", list)
    if not metrics:
        c.fail("metric_names", "list at least one metric", metrics)
    for k, m in enumerate(metrics):
        c.kind(m, str, f"metric_names[{k}]")
    seen: dict[tuple, int] = {}
    for k, b in enumerate(c.get(data, "blocks", list)):
        at = f"blocks[{k}]"
        c.kind(b, dict, at)
        key = (c.integer(b, "layer", 0, at), c.get(b, "attention", str, at), c.get(b, "ffn", str, at))
        for m in metrics:
            if m not in b:
                c.fail(f"{at}.{m}", "missing (every block needs every metric of metric_names)")
            if isinstance(b[m], float) and -1e-6 <= b[m] < 0:
                b[m] = 0.0  # float rounding of a KL that is 0
            c.number(b[m], f"{at}.{m}", "a score")
        if key in seen:
            c.fail(at, f"layer {key[0]} block {key[1]}+{key[2]} is already scored in blocks[{seen[key]}]")
        seen[key] = k
    if library is not None:
        offered = library_pairs(library)
        for (i, a, f), k in seen.items():
            if i not in offered:
                c.fail(f"blocks[{k}].layer", f"the library has no layer {i} (its layers: {library['layers']}); "
                       "were these scores measured on another library?", i)
            if (a, f) not in offered[i]:
                c.fail(f"blocks[{k}]", f"the library offers no block {a}+{f} in layer {i}; were these scores "
                       "measured on another library?")
        missing = [f"layer {i} {a}+{f}" for i, pairs in offered.items() for a, f in pairs if (i, a, f) not in seen]
        if missing:
            c.fail("blocks", f"no score for {len(missing)} block(s) of the library: {', '.join(missing[:5])}"
                   + (", ..." if len(missing) > 5 else ""))
    return data


# ------------------------------------------------------------------ costs


def check_costs(data: Any, where: str, library: dict | None = None) -> dict:
    """Check costs data in memory as :func:`read_costs` does (``where`` names it in messages)."""
    c = _Check(where, "re-run the costs stage, or fix the file")
    c.top(data, COSTS_FORMAT)
    c.get(data, "device", str)
    c.get(data, "dtype", str)
    batches = c.get(data, "batch_sizes", list)
    if not batches:
        c.fail("batch_sizes", "list at least one batch size", batches)
    for k, b in enumerate(batches):
        if c.kind(b, int, f"batch_sizes[{k}]") < 1 or b in batches[:k]:
            c.fail(f"batch_sizes[{k}]", "batch sizes must be distinct ints >= 1", b)
    c.integer(data, "prefill_len", 1)
    c.integer(data, "decode_context", 0)

    def times(entry: dict, at: str, positive: bool) -> None:
        for kind in ("prefill_s", "decode_s"):
            t = c.get(entry, kind, dict, at)
            for b in batches:
                if str(b) not in t:
                    c.fail(f"{at}.{kind}", f'no time for batch size {b} (key "{b}")')
                c.number(t[str(b)], f'{at}.{kind}["{b}"]', "a time", positive)

    def entry(e: Any, at: str, kv: bool, positive: bool) -> None:
        c.kind(e, dict, at)
        for key in ("params", "param_bytes") + (("kv_bytes_per_token",) if kv else ()):
            if key not in e:
                c.fail(f"{at}.{key}", "missing (expected a number)")
        for key in ("params", "param_bytes", "kv_bytes_per_token"):
            if key in e:
                c.number(e[key], f"{at}.{key}", key)
        times(e, at, positive)

    for part in ("attention", "ffn"):
        for name, e in c.get(data, part, dict).items():
            entry(e, f"{part}.{name}", part == "attention", False)
    entry(c.get(data, "fixed", dict), "fixed", False, True)
    if "layer" in data:  # measure: children: what each kept layer costs besides its blocks
        times(c.get(data, "layer", dict), "layer", False)
    for whole in ("parent_model", "first_layer_model"):
        if whole in data:
            times(c.get(data, whole, dict), whole, True)
    for part in ("attention", "ffn") if library is not None else ():
        used = {v["name"] if v["part"] == part else v[part] for v in library["variants"]
                if v["part"] in (part, "block")}
        missing = sorted(used - set(data[part]))
        if missing:
            _Check(where, "re-run the costs stage for this library").fail(
                part, f"no entry for {part} variant(s) {missing} of the library")
    return data


def read_costs(path: str | Path, library: dict | None = None) -> dict:
    """``costs.json``, checked (module docstring); with ``library``, an entry for each variant it uses."""
    return check_costs(read_json(path, "run the costs stage first, or set costs.file"), str(path), library)


# ------------------------------------------------------------------ training curves


@dataclass
class Curve:
    """A training stage's ``curve.json`` (module docstring): its evaluation ``points``, optionally one record per
    training step (``steps``), and what to plot of them: ``plot`` entries ``{"label", "y", "of"}`` where ``y`` is a
    dotted key into a point (``"on.accuracy"``) and ``of`` is ``"points"`` (the default) or ``"steps"``."""

    points: list[dict]
    plot: list[dict]
    steps: list[dict] = field(default_factory=list)
    log_y: bool = False

    def series(self) -> list[tuple[str, list, list]]:
        """``(label, steps, values)`` per plotted key, over the records that have the key (None where unset)."""
        out = []
        for spec in self.plot:
            records = self.steps if spec.get("of", "points") == "steps" else self.points
            have = [r for r in records if _has(r, spec["y"])]
            out.append((spec["label"], [r["step"] for r in have], [_dotted(r, spec["y"]) for r in have]))
        return out


def _has(record: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(record, dict) or part not in record:
            return False
        record = record[part]
    return True


def _dotted(record: dict, key: str):
    for part in key.split("."):
        record = record[part]
    return record


def write_curve(folder: str | Path, curve: Curve) -> Path:
    """Write ``folder/curve.json`` (atomically) in the one schema; its path."""
    path = Path(folder) / CURVE
    data = {"format": CURVE_FORMAT, "points": curve.points, "plot": curve.plot}
    if curve.steps:
        data["steps"] = curve.steps
    if curve.log_y:
        data["log_y"] = True
    atomic_write_json(path, data)
    return path


# what the curves of runs made before the one schema plotted: a list of evaluation points (distill: kl and
# accuracy on a log scale; sft: loss and accuracy per mode) or grpo's {"eval": points, "steps": records}
_OLD_PLOTS = [{"label": "loss", "y": "loss"}, {"label": "KL to the parent", "y": "kl"},
              {"label": "accuracy", "y": "accuracy"}, {"label": "reward", "y": "reward", "of": "steps"},
              {"label": "accuracy on", "y": "on.accuracy"}, {"label": "accuracy off", "y": "off.accuracy"}]


def read_curve(path: str | Path) -> Curve | None:
    """``curve.json`` at ``path`` (or in the folder ``path``) as a :class:`Curve`, in the one schema or either
    earlier shape; None when there is none, it is not JSON, or it has no points or steps."""
    path = Path(path)
    if path.is_dir():
        path = path / CURVE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if isinstance(data, dict) and data.get("format") == CURVE_FORMAT:
        curve = Curve(points=list(data.get("points") or []), plot=list(data.get("plot") or []),
                      steps=list(data.get("steps") or []), log_y=bool(data.get("log_y", False)))
    elif isinstance(data, list):  # distill, sft before the one schema
        curve = Curve(points=data, plot=[], log_y=any(isinstance(p, dict) and "kl" in p for p in data))
    elif isinstance(data, dict) and isinstance(data.get("eval"), list):  # grpo before the one schema
        curve = Curve(points=data["eval"], plot=[], steps=list(data.get("steps") or []))
    else:
        return None
    if not all(isinstance(r, dict) and "step" in r for r in curve.points + curve.steps):
        return None
    if not curve.points and not curve.steps:
        return None
    if not curve.plot:  # an earlier shape: the keys it has
        curve.plot = [spec for spec in _OLD_PLOTS
                      if any(_has(r, spec["y"]) for r in (curve.steps if spec.get("of") == "steps" else curve.points))]
    return curve


# ------------------------------------------------------------------ model folders


def write_model_sidecar(model_dir: str | Path, prompting: str | None, made_by: str, **extra: Any) -> None:
    """Write ``thinkfast.json`` into ``model_dir`` (atomically): how to prompt the model (None: unknown, eval
    guesses from the tokenizer), who made it, and ``extra`` (``engine``: the engine it was made for)."""
    if prompting is not None and prompting not in PROMPTINGS:
        raise ValueError(f"prompting={prompting!r}: expected one of {PROMPTINGS}")
    head = {"prompting": prompting} if prompting is not None else {}
    atomic_write_json(Path(model_dir) / SIDECAR, {**head, "made_by": made_by, **extra})


def read_model_sidecar(model_dir: str | Path) -> dict:
    """``thinkfast.json`` of ``model_dir``, checked; ``{}`` when the folder has none."""
    path = Path(model_dir) / SIDECAR
    if not path.is_file():
        return {}
    c = _Check(path, "fix the file, or delete it to let eval guess from the tokenizer")
    data = c.top(read_json(path))
    if "prompting" in data and data["prompting"] not in PROMPTINGS:
        c.fail("prompting", f"expected one of {list(PROMPTINGS)}", data["prompting"])
    if "layer_map" in data:  # fuse's: per layer, the input layers whose outputs it reproduces
        c = _Check(path, "the fuse stage writes it: re-run that stage with --force, or fix the file")
        spans = data["layer_map"]
        if not isinstance(spans, list):
            c.fail("layer_map", "expected a list (one entry per layer)", spans)
        # a map written before spans holds one layer each
        spans = [[t] if isinstance(t, int) and not isinstance(t, bool) else t for t in spans]
        for i, span in enumerate(spans):
            if (not isinstance(span, list) or not span
                    or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in span)):
                c.fail(f"layer_map[{i}]", "expected a non-empty list of layer indices", data["layer_map"][i])
        data["layer_map"] = spans
    return data


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy those of :data:`TOKENIZER_FILES` that ``src_dir`` has into ``dst_dir``; their names."""
    copied = [n for n in TOKENIZER_FILES if (Path(src_dir) / n).is_file()]
    for name in copied:
        shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
    return copied


def _damaged(stage: str | None, folder: Path | None = None) -> str:
    """What to do about a damaged file of a model ``folder`` that ``stage`` (its sidecar's made_by) wrote.
    Where the folder sits decides it: one the parent stage links to is the user's own (no stage can mend it),
    one the parent stage copied is copied again by that stage, whatever made_by says (it names the stage
    that made the folder in another run directory, if any)."""
    if folder is not None and folder.is_symlink():
        return (f"the model folder is {folder.resolve()} (linked as {folder}), which no stage of this run wrote: "
                "replace the damaged file with a good copy (download or save the model again)")
    if folder is not None and folder.name == "model" and folder.parent.name == "parent" and (
            folder.parent / COMPLETE).is_file():
        return ("the parent stage copied it from parent.path: check that folder's file, then re-run the parent "
                "stage with --force")
    who = f"the {stage} stage" if stage else "the stage"
    again = who if stage else "that stage"
    return f"{who} that wrote it was interrupted or the file is damaged; re-run {again} with --force"


def _check_safetensors(path: Path, stage: str | None = None) -> None:
    """Open the header of a safetensors file (cheap: no tensor is read); ArtifactError if it is bad."""
    _safetensors_shapes(path, _damaged(stage))


def _what_is_wrong_with_safetensors(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, in words, from its first bytes and its header (a u64
    header length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the tensor data); None if
    no reason is visible here."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
        if head.startswith(b"version https://git-lfs"):
            return "a Git LFS pointer, not the weights: fetch them (git lfs pull)"
        if size < 8:
            return f"not a safetensors file: {size} bytes, shorter than the 8-byte header length"
        n = int.from_bytes(head[:8], "little")
        if head[8:9] != b"{" or n > 100_000_000:  # the library's own limit on a header
            return f"not a safetensors file (it starts with {head[:12]!r})"
        if 8 + n > size:
            return f"truncated: the header is {n} bytes, the file has {size - 8} after its length"
        fh.seek(8)
        try:
            header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file: its header is not the JSON safetensors writes"
    if size - 8 - n < end:
        return f"truncated: header says {end} bytes of tensor data, file has {size - 8 - n}"
    return None


def _safetensors_shapes(path: Path, remedy: str) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, from its header through ``safe_open`` (no tensor is read;
    the library checks that the data offsets cover the file exactly); ArtifactError naming the file if not."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        problem = _what_is_wrong_with_safetensors(path) if path.is_file() else "no such file"
        raise ArtifactError(f"{path}: {problem or f'not a readable safetensors file ({e})'} ({remedy})") from None


def _check_torch_zip(path: Path, remedy: str) -> None:
    """A ``torch.save`` file (a zip archive since torch 1.6) must have its central directory (at the end of the
    file: a cut-off file has none) and every member's data inside the file; no tensor is read."""
    import zipfile

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"version https://git-lfs"):
        problem = "a Git LFS pointer, not the weights: fetch them (git lfs pull)"
    elif head[:1] == b"\x80":  # the legacy (pickle) format of torch.save: nothing cheap to check
        return
    else:
        try:
            with zipfile.ZipFile(path) as z:
                end = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
            problem = None if end <= size else f"truncated: its index says {end} bytes, the file has {size}"
        except zipfile.BadZipFile as e:
            problem = f"not a readable PyTorch checkpoint (truncated, or not a weights file: {e})"
    if problem:
        raise ArtifactError(f"{path}: {problem} ({remedy})")


def _index_files(folder: Path, index: Path, remedy: str) -> dict[str, list[str]]:
    """``{file: [tensor names]}`` of a sharded checkpoint's index; every file it names must exist."""
    c = _Check(index, remedy)
    weight_map = c.get(c.top(read_json(index)), "weight_map", dict)
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        files.setdefault(c.kind(file, str, f"weight_map.{name}"), []).append(name)
    for file in files:
        if not (folder / file).is_file():
            raise ArtifactError(f"{index}: the index names {file}, which is missing ({remedy})")
    return files


def check_weights(folder: str | Path, remedy: str = "replace the file with a good copy"
                  ) -> dict[str, tuple[str, list[int]]] | None:
    """Check a model folder's weights as ``from_pretrained`` would find them, without reading a tensor:
    ``model.safetensors.index.json`` and every shard it names (each must hold the tensors the index puts in
    it), else every ``*.safetensors``; without those, ``pytorch_model.bin.index.json`` and its shards, else
    every ``pytorch_model*.bin``. A missing, cut-off or foreign file is an ArtifactError naming it, what is
    wrong and ``remedy``. Returns ``{tensor: (file, shape)}`` for safetensors, None for .bin files (their
    tensor names are not read)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (_index_files(folder, index, remedy) if index.is_file()
             else {f.name: [] for f in sorted(folder.glob("*.safetensors"))})
    if files:
        out: dict[str, tuple[str, list[int]]] = {}
        for file, listed in files.items():
            shapes = _safetensors_shapes(folder / file, remedy)
            lacking = [k for k in listed if k not in shapes]
            if lacking:
                raise ArtifactError(f"{folder / file}: holds no tensor {lacking[0]}, which {index.name} puts in it"
                                    f"{f' (nor {len(lacking) - 1} more)' if len(lacking) > 1 else ''} ({remedy})")
            out.update((k, (file, v)) for k, v in shapes.items())
        return out
    index = folder / "pytorch_model.bin.index.json"
    bins = list(_index_files(folder, index, remedy)) if index.is_file() else [
        f.name for f in sorted(folder.glob("pytorch_model*.bin"))]
    if not bins:
        raise ArtifactError(f"{folder}: no weights (model.safetensors, sharded model-*.safetensors with "
                            f"model.safetensors.index.json, or pytorch_model.bin) ({remedy})")
    for file in bins:
        _check_torch_zip(folder / file, remedy)
    return None


def check_weights_match_config(folder: str | Path, tensors: dict[str, tuple[str, list[int]]],
                               remedy: str = "replace the file with a good copy") -> None:
    """The tensors ``config.json`` implies (the model built on the meta device: no memory, milliseconds) must
    all be in ``tensors`` (:func:`check_weights`) with their shapes; a tied copy (``lm_head`` of tied
    embeddings) may be absent, extra tensors are ignored (as ``from_pretrained`` ignores them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import thinkfast  # noqa: F401  (registers nemotron-nas with the Auto classes)

    folder = Path(folder)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    except Exception as e:  # noqa: BLE001 - whatever transformers makes of a bad config, name the file
        raise ArtifactError(f"{folder / 'config.json'}: transformers cannot build the model it describes "
                            f"({type(e).__name__}: {e})") from None
    tied: dict[int, list[str]] = {}  # one entry per distinct tensor, with all its names
    for name, t in model.state_dict(keep_vars=True).items():
        tied.setdefault(id(t), []).append(name)
    prefix = f"{model.base_model_prefix}."
    if not any(n in tensors for names in tied.values() for n in names):  # saved from the bare model
        tensors = {prefix + k: v for k, v in tensors.items()}
    state = model.state_dict()
    missing = [names[0] for names in tied.values() if not any(n in tensors for n in names)]
    if missing:
        raise ArtifactError(f"{folder}: config.json implies {len(tied)} weight tensors; the weights files lack "
                            f"{len(missing)} of them, e.g. {', '.join(missing[:3])} (weights of another model, or "
                            f"a file cut short?) ({remedy})")
    for names in tied.values():
        for n in names:
            if n in tensors and list(state[n].shape) != tensors[n][1]:
                raise ArtifactError(f"{folder / tensors[n][0]}: {n} has shape {tensors[n][1]}, config.json implies "
                                    f"{list(state[n].shape)} (weights of another model?) ({remedy})")


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file`` with errors that name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingArtifact(f"{path}: no such file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        problem = _what_is_wrong_with_safetensors(path) or f"not a readable safetensors file ({e})"
        raise ArtifactError(f"{path}: {problem}: {_damaged(None)}") from None


def load_model(path: str | Path, device: Any = "cpu", **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` (nemotron-nas registered), moved to
    ``device``; a missing folder, a bad ``config.json`` or a damaged weights file is an ArtifactError
    naming the file."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    import thinkfast  # noqa: F401  (registers nemotron-nas with the Auto classes)

    path = Path(path)
    if not path.is_dir():
        raise MissingArtifact(f"{path}: no such model folder")
    c = _Check(path / "config.json", "fix the file, or re-run the stage that made this model with --force")
    config = c.top(read_json(path / "config.json", "not a model folder: save_pretrained writes config.json"))
    c.get(config, "model_type", str)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (SafetensorError, OSError) as e:
        try:
            made_by = read_model_sidecar(path).get("made_by")
        except ArtifactError:
            made_by = None
        remedy = _damaged(made_by if isinstance(made_by, str) else None, path)
        check_weights(path.resolve() if path.is_symlink() else path, remedy)
        raise ArtifactError(f"{path}: cannot load the model ({e}): {remedy}") from e
    return model.to(device)


def load_sequence_classifier(path: str | Path, device: Any = "cpu", **kwargs: Any):
    """A reward model folder (stage ``reward_model``) through ``AutoModelForSequenceClassification`` (nemotron-nas
    registered), moved to ``device``; a missing folder or damaged weights are an ArtifactError naming the file, as
    in :func:`load_model`."""
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification

    import thinkfast  # noqa: F401  (registers nemotron-nas with the Auto classes)

    path = Path(path)
    if not path.is_dir():
        raise MissingArtifact(f"{path}: no such reward model folder")
    c = _Check(path / "config.json", "fix the file, or re-run the reward_model stage with --force")
    c.get(c.top(read_json(path / "config.json", "not a model folder: save_pretrained writes config.json")),
          "model_type", str)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), **kwargs)
    except (SafetensorError, OSError) as e:
        remedy = _damaged("reward_model", path)
        check_weights(path.resolve() if path.is_symlink() else path, remedy)
        raise ArtifactError(f"{path}: cannot load the reward model ({e}): {remedy}") from e
    return model.to(device)


def load_decilm(model_dir: str | Path, device: Any = "cpu"):
    """A folder written by ``save_pretrained`` (Llama or nemotron-nas) as a float32 DeciLM in eval mode
    (loaded by :func:`thinkfast.artifacts.load_model`: a damaged folder is an ArtifactError naming the file)."""
    from .modeling import DeciLMForCausalLM
    from .modeling.convert import convert_llama_model

    model = load_model(model_dir)
    if not isinstance(model, DeciLMForCausalLM):
        if model.config.model_type != "llama":
            raise ValueError(f"{model_dir}: a {model.config.model_type!r} model; Puzzle needs a Llama-layout or "
                             "nemotron-nas parent")
        model = convert_llama_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.float().to(device).eval()


def convert_checkpoint(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> dict:
    """Convert the Llama folder ``src`` into a nemotron-nas folder ``dst`` (written atomically).

    Returns a summary dict (layers, parameters, files copied).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .atomic import atomic_dir
    from .modeling.convert import ConversionError, convert_llama_model, decilm_config_from_llama

    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{src}: no config.json (expected a Hugging Face model folder)")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists; pass --overwrite to replace it")
    llama_cfg = json.loads(cfg_path.read_text())
    decilm_config_from_llama(llama_cfg, where=str(cfg_path))  # validate before loading weights
    dtype = llama_cfg.get("torch_dtype") or llama_cfg.get("dtype") or "float32"
    model = AutoModelForCausalLM.from_pretrained(src, **{_dtype_kwarg(): getattr(torch, dtype)})
    out = convert_llama_model(model)
    with atomic_dir(dst) as tmp:
        out.save_pretrained(tmp)
        copied = copy_tokenizer_files(src, tmp)
        if (src / SIDECAR).is_file():  # how the model is prompted does not change with its format
            shutil.copy2(src / SIDECAR, tmp / SIDECAR)
            copied.append(SIDECAR)
    return {
        "layers": out.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in out.parameters()),
        "dtype": dtype,
        "copied": copied,
    }


def _dtype_kwarg() -> str:
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
