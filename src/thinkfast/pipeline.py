"""The pipeline: one YAML file, one section per stage, stages run in order through the run directory.

A config file looks like::

    run_dir: runs/nano          # relative paths are relative to the current directory
    stages: [pretrain, library, scores, costs, search, eval]   # the order `thinkfast run` follows
    data: {...}                 # the text stages read (thinkfast.data): the nano world, or your files
    pretrain: {...}             # one section per stage, fields of that stage's config dataclass

Dependencies are exact. Each stage declares what it reads, by role (``thinkfast.stages``): a kind of
output made by an earlier stage (the latest earlier one that makes it; eval reads every model), or a
path from its config. A stage's identity is its config (without fields that only change speed) plus
the identity of every input: for a stage's output, the ``output_id`` its completion marker records
(new each time the stage completes); for a path outside the run directory, a hash of its content.
So:

- a completed stage whose identity still matches is reused; one whose config or inputs changed is
  redone (its old output stays whole until the new one completes: ``thinkfast.rundir.StageRun``);
- a single-stage command (``thinkfast search``) runs only that stage and refuses when something it reads
  is missing or out of date for this config, naming the stage to run first;
- ``thinkfast run --from STAGE`` redoes STAGE and every stage that depends on it, and nothing else.

The run directory is locked while a command writes it (``thinkfast.rundir.RunDir``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .artifacts import COMPLETE, OUTPUTS
from .config import ConfigError, apply_overrides, config_hash, from_dict, load_yaml, to_dict
from .data import NANO_MIX, DataConfig, DataError, expand_files
from .runtime import PeakMemory
from .rundir import MARKER_FORMAT, RunDir, RunDirError, StageConfigMismatch, StageDir, StageRun, atomic_write_json
from .stages import (Input, Inputs, costs, distill, fuse, library, parent, pretrain, resolve_device, scores, search,
                     sft)
from .stages import grpo, reward_model, rloo, rpo
from .stages import eval as eval_stage

# name -> stage module (config class, MAKES, reads, run). A plain table: adding a stage is one line here.
STAGES = {
    "parent": parent,
    "pretrain": pretrain,
    "library": library,
    "scores": scores,
    "costs": costs,
    "search": search,
    "fuse": fuse,
    "distill": distill,
    "sft": sft,
    "grpo": grpo,
    "rloo": rloo,
    "reward_model": reward_model,
    "rpo": rpo,
    "eval": eval_stage,
}
# Fields that change how fast a stage runs, how much it logs or when it gives up on a failure, not what it
# produces: not in its identity.
_NOT_IN_HASH = {"device", "log_every", "checkpoint_every", "save_samples", "max_failing_steps", "endpoint_timeout",
                "endpoint_retries"}


def _config_class(name: str):
    return STAGES[name].Config


@dataclass
class PipelineConfig:
    run_dir: str = "runs/nano"
    stages: list[str] = field(default_factory=lambda: ["pretrain", "library", "scores", "costs", "search", "eval"])

    def __post_init__(self):
        if not str(self.run_dir).strip():
            raise ValueError("run_dir is empty; name a folder for the run (e.g. run_dir=runs/nano)")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages: a stage is listed twice in {self.stages}")


@dataclass
class Pipeline:
    source: str
    run_dir: Path
    stages: list[str]
    configs: dict  # stage name -> config dataclass instance
    overridden: dict = field(default_factory=dict)  # dotted key -> the command-line override that set it
    data: DataConfig = field(default_factory=DataConfig)  # the data section, shared by the stages that read text

    def where(self, key: str) -> str:
        """Where a key's value came from, for messages: the override, or the config file."""
        return f"override {self.overridden[key]}" if key in self.overridden else f"{self.source}: {key}"


def default_config_path(name: str = "nano") -> Path:
    """A config shipped inside the package (``nano``, ``smoke``)."""
    path = Path(str(resources.files("thinkfast") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no embedded config named {name!r}")
    return path


def load_pipeline(path: str | Path | None, overrides: list[str] = ()) -> Pipeline:
    """Read a pipeline YAML (default: the embedded nano world), apply overrides, validate every section
    and the stage order (every listed stage's inputs are made by a stage before it)."""
    from .config import override_locations

    path = Path(path) if path is not None else default_config_path()
    data, lines = load_yaml(path)
    data = apply_overrides(data, list(overrides))
    where = str(path)
    overridden = override_locations(list(overrides))
    top = {k: v for k, v in data.items() if k not in STAGES and k != "data"}
    pipe = from_dict(PipelineConfig, top, where=where, lines=lines, overridden=overridden)
    _moved_keys(data, where, lines, overridden)
    configs = {name: from_dict(_config_class(name), data.get(name), where=where, lines=lines, prefix=name,
                               overridden=overridden)
               for name in STAGES}
    data_cfg = from_dict(DataConfig, data.get("data"), where=where, lines=lines, prefix="data", overridden=overridden)
    pipeline = Pipeline(where, Path(pipe.run_dir), list(pipe.stages), configs, overridden, data_cfg)
    if data_cfg.files and "pretrain" in pipeline.stages:
        raise ConfigError(f"{pipeline.where('data.files')}: pretrain trains the nano parent on the nano world, but "
                          "data.files names your own text: give your own parent with the parent stage instead "
                          "(stages: [parent, library, ...])")
    for name in pipeline.stages:
        for role, inp in reads(pipeline, name).items():
            if _explicit(pipeline, name, inp) is None and not _producers(pipeline, name, inp):
                makers = [s for s in STAGES if STAGES[s].MAKES == inp.kind and s != name]
                fix = f"list {' or '.join(makers)} before {name}"
                fix = f"set {name}.{inp.field}, or {fix}" if inp.field else fix
                at = f"override {overridden['stages']}" if "stages" in overridden else f"{where}: stages"
                raise ConfigError(f"{at}: '{name}' reads a {inp.kind} ({role}) but no stage before it makes one; {fix}")
    return pipeline


def _moved_keys(data: dict, where: str, lines: dict, overridden: dict) -> None:
    """Keys that moved to the data section (one nano mix for every stage): say so, not just 'unknown'."""
    for stage in ("pretrain", "library", "scores"):
        section = data.get(stage)
        for key in NANO_MIX:
            if isinstance(section, dict) and key in section:
                dotted = f"{stage}.{key}"
                at = (f"override {overridden[dotted]}" if dotted in overridden else
                      f"{where} line {lines[dotted]}" if dotted in lines else where)
                raise ConfigError(f"{at}: '{dotted}' moved to 'data.{key}': every stage reads one data section "
                                  "(thinkfast.data)")


# ------------------------------------------------------------------ dependencies

def reads(pipe: Pipeline, name: str) -> dict[str, Input]:
    return STAGES[name].reads(pipe.configs[name])


def _explicit(pipe: Pipeline, name: str, inp: Input):
    return getattr(pipe.configs[name], inp.field) if inp.field else None


def _earlier(pipe: Pipeline, name: str) -> list[str]:
    """The stages a stage may read from: those listed before it (all listed stages, for a stage that is
    not in the list and is run on its own)."""
    return pipe.stages[: pipe.stages.index(name)] if name in pipe.stages else list(pipe.stages)


def _producers(pipe: Pipeline, name: str, inp: Input) -> list[str]:
    makers = [s for s in _earlier(pipe, name) if STAGES[s].MAKES == inp.kind]
    return makers if inp.many else makers[-1:]


def upstream(pipe: Pipeline, name: str) -> list[str]:
    """The stages whose output this stage reads (directly)."""
    out = []
    for inp in reads(pipe, name).values():
        if _explicit(pipe, name, inp) is None:
            out += [p for p in _producers(pipe, name, inp) if p not in out]
    return out


def dependents(pipe: Pipeline, name: str) -> list[str]:
    """The listed stages that read ``name``'s output, directly or through others, in pipeline order."""
    hit = {name}
    for s in pipe.stages:
        if s != name and set(upstream(pipe, s)) & hit:
            hit.add(s)
    return [s for s in pipe.stages if s in hit and s != name]


def _resolve(pipe: Pipeline, rd: RunDir, name: str) -> tuple[Inputs, list[str]]:
    """(inputs: role -> path(s) with their identities, producers that have not completed)."""
    paths, ids, missing = {}, {}, []
    for role, inp in reads(pipe, name).items():
        value = _explicit(pipe, name, inp)
        if value is not None:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            refs = {}
            for i, v in enumerate(items):
                p = Path(v).resolve()  # existence checked by _preflight before any stage ran
                key = f"{i}:{p.name}" if isinstance(value, (list, tuple)) else p.name
                refs[key] = (p, {"path": str(p), "id": rd.fingerprint(p)})
        else:
            refs = {}
            for producer in _producers(pipe, name, inp):
                sd = StageDir(pipe.run_dir, producer)
                marker = sd.marker()
                if marker is None:
                    missing.append(producer)
                    continue
                refs[producer] = (sd.path / OUTPUTS[inp.kind], {"stage": producer, "id": marker.get("output_id")})
        if inp.many:
            paths[role] = {k: p for k, (p, _) in refs.items()}
            ids[role] = {k: r for k, (_, r) in refs.items()}
        elif refs:
            (p, r), = refs.values()
            paths[role], ids[role] = p, r
    return Inputs(paths, ids), missing


def _defaults(cls, prefix: str = "") -> dict:
    """The value of each field that reproduces what a stage did before the field existed: its default,
    or ``metadata["before"]`` when the default changes behaviour (``library.engine`` defaults to vllm,
    but libraries made before it existed were unrestricted, as with ``hf``)."""
    out = {}
    for f in dataclasses.fields(cls):
        if "before" in f.metadata:
            out[prefix + f.name] = f.metadata["before"]
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[prefix + f.name] = f.default_factory()
    return out


def _data_files(pipe: Pipeline) -> list[Path]:
    try:
        return expand_files(pipe.data.files)
    except DataError as e:
        raise ConfigError(f"{pipe.where('data.files')}: {str(e).removeprefix('data.files: ')}") from None


def stage_run(pipe: Pipeline, rd: RunDir, name: str) -> tuple[StageRun, Inputs, list[str]]:
    """The stage's run-directory protocol object, its resolved inputs and any producer not yet complete."""
    inputs, missing = _resolve(pipe, rd, name)
    cfg = pipe.configs[name]
    path_fields = {inp.field for inp in reads(pipe, name).values() if inp.field}
    config = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_HASH and k not in path_fields}
    defaults = _defaults(type(cfg))
    use = getattr(STAGES[name], "DATA", None)  # "nano" (the mix: pretrain) or "corpus" (the split text)
    if use:
        config.update(pipe.data.identity(use))
        defaults.update(_defaults(DataConfig, "data."))
        files = _data_files(pipe) if use == "corpus" else []
        if files:  # identified by content, as every path from outside the run directory
            unique = len({p.name for p in files}) == len(files)
            inputs.ids["data"] = {p.name if unique else f"{i}:{p.name}": {"path": str(p), "id": rd.fingerprint(p)}
                                  for i, p in enumerate(files)}
        inputs.data = dataclasses.replace(pipe.data, files=[str(p) for p in files])
    own = getattr(STAGES[name], "files", None)  # files a stage's own config names (sft: its data)
    if own is not None:
        named = own(cfg)  # (field, patterns), or a list of them: the first is recorded as "files"
        for k, (field, patterns) in enumerate([named] if isinstance(named, tuple) else named):
            try:
                paths = expand_files(patterns) if patterns else []
            except DataError as e:
                raise ConfigError(f"{pipe.where(f'{name}.{field}')}: {str(e).removeprefix('data.files: ')}") from None
            if k == 0 or paths:
                inputs.ids["files" if k == 0 else f"files.{field}"] = {
                    f"{i}:{p.name}": {"path": str(p), "id": rd.fingerprint(p)} for i, p in enumerate(paths)}
    models = _reward_models(pipe, name, cfg)
    if models:  # a reward model named as a reward: retraining it makes the stage stale
        inputs.ids["reward_models"] = {f"{i}:{p.name}": {"path": str(p), "id": rd.fingerprint(p)}
                                       for i, p in enumerate(models)}
    run = StageRun(pipe.run_dir, name, {"config": config, "inputs": inputs.ids}, defaults)
    return run, inputs, missing


def _reward_models(pipe: Pipeline, name: str, cfg) -> list[Path]:
    """The reward-model folders a stage's ``rewards`` name (``reward_model:PATH``; a reward_model stage's folder
    stands for its ``reward_model/`` output), which must exist."""
    out = []
    for r in getattr(cfg, "rewards", None) or []:
        if isinstance(r, str) and r.startswith("reward_model:"):
            path = Path(r.partition(":")[2])
            if (path / OUTPUTS["reward_model"]).is_dir():
                path = path / OUTPUTS["reward_model"]
            if not path.is_dir():
                raise ConfigError(f"{pipe.where(f'{name}.rewards')}: {r}: no reward-model folder at {path}")
            out.append(path)
    return out


def status(pipe: Pipeline, rd: RunDir, name: str) -> tuple[str, list[str]]:
    """``complete`` / ``stale`` / ``partial`` / ``partial-stale`` / ``missing``, with reasons; a stage
    whose inputs are not all complete and current is ``stale`` (or ``missing``) too."""
    run, _, missing = stage_run(pipe, rd, name)
    state, reasons = run.state()
    if missing and state == "complete":
        return "stale", [f"stage {m} has not completed" for m in missing]
    if state == "complete":
        return _recheck(pipe, name, run)
    return state, reasons


def _recheck(pipe: Pipeline, name: str, run: StageRun) -> tuple[str, list[str]]:
    """A stage may say why a matching output cannot be reused here (costs: measured on another device)."""
    check = getattr(STAGES[name], "reuse_problems", None)
    reasons = check(pipe.configs[name], run.final.marker()) if check else []
    return ("stale", reasons) if reasons else ("complete", [])


def _check_upstream(pipe: Pipeline, rd: RunDir, name: str, seen: set | None = None) -> None:
    """Refuse to run ``name`` alone unless everything it reads is complete and current."""
    seen = set() if seen is None else seen
    for p in upstream(pipe, name):
        if p in seen:
            continue
        seen.add(p)
        _check_upstream(pipe, rd, p, seen)
        state, reasons = status(pipe, rd, p)
        if state == "complete":
            continue
        if state in ("missing", "partial", "partial-stale"):
            what = "has not completed" if state == "missing" else "was interrupted"
            raise StageConfigMismatch(
                f"{name} reads the output of stage '{p}', which {what} in {pipe.run_dir}: "
                f"run `thinkfast {p}` first (or `thinkfast run` for every stage)")
        raise StageConfigMismatch(
            f"{name} reads the output of stage '{p}', which is out of date for this config ("
            + "; ".join(reasons) + f"): run `thinkfast {p}` first, or `thinkfast run` to bring every stage "
            f"up to date (or give the same overrides that stage was run with)")


def adopt_legacy(pipe: Pipeline, rd: RunDir) -> list[str]:
    """Keep work finished by a thinkfast that predates recorded inputs (a marker with only a config hash).

    That version identified a stage by ``config_hash({"stage", "config", "upstream"})``, ``upstream``
    being the config hash and finish time of the stage listed just before it. A legacy marker whose hash
    is reproduced by today's config (with any completed stage, or none, as that upstream) is rewritten
    in today's form, its inputs being the current outputs of its producers, instead of being redone.
    Eval is not adopted: it now evaluates every model of the run. Returns the adopted stages."""
    markers = {}
    for child in pipe.run_dir.iterdir() if pipe.run_dir.is_dir() else ():
        m = child / COMPLETE
        if child.is_dir() and not child.name.endswith(".partial") and m.is_file():
            try:
                markers[child.name] = StageDir(pipe.run_dir, child.name).marker()
            except RunDirError:
                continue
    upstreams = [None] + [[m.get("legacy_config_hash", m.get("config_hash")), m.get("finished_at")]
                          for m in markers.values()]
    adopted = []
    for name in pipe.stages:
        m = markers.get(name)
        if name == "eval" or m is None or "format" in m or not m.get("config_hash"):
            continue
        cfg = {k: v for k, v in to_dict(pipe.configs[name]).items() if k not in _NOT_IN_HASH}
        if getattr(STAGES[name], "DATA", None) == "nano":  # the mix was pretrain's own then
            cfg.update(pipe.data.mix())
        if not any(config_hash({"stage": name, "config": cfg, "upstream": u}) == m["config_hash"] for u in upstreams):
            continue
        run, _, missing = stage_run(pipe, rd, name)
        refs = [r for v in run.record["inputs"].values() for r in ([v] if "id" in v else v.values())]
        if missing or not all(r.get("id") for r in refs):  # a producer that was not kept: redo this too
            continue
        marker = {**m, "format": MARKER_FORMAT, **run.record, "config_hash": config_hash(run.record),
                  "legacy_config_hash": m["config_hash"], "output_id": f"legacy-{m.get('finished_at')}"}
        atomic_write_json(run.final.marker_path, marker)
        adopted.append(name)
        print(f"{name}: completed by an older thinkfast with this same config: kept ({run.final.marker_path})")
    return adopted


# ------------------------------------------------------------------ running

def _run_one(pipe: Pipeline, rd: RunDir, name: str, force: bool, index: str) -> tuple[dict, bool]:
    run, inputs, missing = stage_run(pipe, rd, name)
    if missing:
        raise StageConfigMismatch(f"{name}: stage(s) {missing} it reads have not completed; run them first")
    try:
        state, reasons = run.state()
        if state == "complete":
            state, reasons = _recheck(pipe, name, run)
    except RunDirError:
        if not force:  # a damaged marker of this stage: --force replaces it
            raise
        state, reasons = "damaged", []
    if state == "complete" and not force:
        print(f"{index}{name}: complete, reused ({run.final.marker_path})")
        return run.final.read_metrics(), False
    if state == "stale" and not force:
        print(f"{index}{name}: redoing, because " + "; ".join(reasons))
    elif state == "partial-stale" and not force:
        print(f"{index}{name}: discarding interrupted work of another config (" + "; ".join(reasons) + ")")
    mode = run.begin(force=force)
    print(f"{index}{name}: {'resuming' if mode == 'resume' else 'starting'} in {run.work.path}")
    # parts of the previous output a stage may reuse (never when forced: then everything is redone)
    inputs.previous = run.final if state in ("complete", "stale") and not force else None
    t0 = time.perf_counter()
    with PeakMemory() as peak:
        metrics = STAGES[name].run(pipe.configs[name], run.work, inputs)
    metrics["stage_seconds"] = round(time.perf_counter() - t0, 1)
    # this process's peak while the stage ran, and its worker processes' (vLLM, graders), in MiB
    metrics["peak_rss_mib"] = round(peak.self_bytes / 2**20)
    if peak.children_bytes:
        metrics["peak_rss_workers_mib"] = round(peak.children_bytes / 2**20)
    run.commit(metrics)
    print(f"{index}{name}: done in {metrics['stage_seconds']} s -> {run.final.path}")
    return metrics, True


_SHAPES = {"model": ("folder", "config.json"), "library": ("folder", "library.json"), "scores": ("file", None),
           "costs": ("file", None),
           "reward_model": ("folder", "config.json")}


def _preflight(pipe: Pipeline, names: list[str]) -> None:
    """What can be checked before any stage starts: every device exists on this machine, and every path
    named in the config exists and has the right shape."""
    if any(getattr(STAGES[n], "DATA", None) == "corpus" for n in names):
        _data_files(pipe)
    for name in names:
        device = getattr(pipe.configs[name], "device", None)
        if device is not None:
            try:
                resolve_device(device)
            except ValueError as e:
                raise ConfigError(f"{pipe.where(f'{name}.device')}: {e}") from None
        for inp in reads(pipe, name).values():
            value = _explicit(pipe, name, inp)
            if value is None:
                continue
            shape, needs = _SHAPES[inp.kind]
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                p, at = Path(v), pipe.where(f"{name}.{inp.field}")
                if not p.exists():
                    raise ConfigError(f"{at}: {v} does not exist")
                if shape == "file" and not p.is_file():
                    raise ConfigError(f"{at}: {v} is a folder; name the {inp.kind} file itself")
                if shape == "folder" and inp.kind == "model" and _is_gguf(p, at):
                    continue  # a GGUF parent: the parent stage converts it
                if shape == "folder" and not (p / needs).is_file():
                    raise ConfigError(f"{at}: {v} is not a {inp.kind} folder (it has no {needs})")


def _is_gguf(path: Path, at: str) -> bool:
    from .modeling.convert import ConversionError, gguf_file

    try:
        return gguf_file(path) is not None
    except ConversionError as e:
        raise ConfigError(f"{at}: {e}") from None


def run_stage(pipe: Pipeline, name: str, force: bool = False, index: str = "") -> tuple[dict, bool]:
    """Run one stage on its own: everything it reads must be complete and current. Returns (metrics, ran)."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known: {list(STAGES)}")
    for role, inp in reads(pipe, name).items():
        if _explicit(pipe, name, inp) is None and not _producers(pipe, name, inp):
            raise ConfigError(f"{pipe.source}: {name} reads a {inp.kind} ({role}) but no stage in 'stages' "
                              f"makes one" + (f"; set {name}.{inp.field}" if inp.field else ""))
    _preflight(pipe, [name])
    with RunDir(pipe.run_dir, command=f"thinkfast {name}") as rd:
        adopt_legacy(pipe, rd)
        _check_upstream(pipe, rd, name)
        return _run_one(pipe, rd, name, force, index)


def run_all(pipe: Pipeline, force: bool = False, from_stage: str | None = None) -> dict:
    """Run every stage in order: reuse what is complete and current, redo what changed (and so what
    depends on it). ``force`` redoes every stage; ``from_stage`` redoes that stage and its dependents."""
    redo: set[str] = set()
    if force:
        redo = set(pipe.stages)
    if from_stage is not None:
        if from_stage not in pipe.stages:
            raise ConfigError(f"--from {from_stage}: not a stage of this pipeline ({', '.join(pipe.stages)})")
        # its dependents follow by themselves: a redone stage gets a new output_id, so every stage that
        # reads it is stale (and may still reuse what did not change, as eval does per model)
        redo.add(from_stage)
    _preflight(pipe, pipe.stages)
    results = {}
    with RunDir(pipe.run_dir, command="thinkfast run") as rd:
        adopt_legacy(pipe, rd)
        for i, name in enumerate(pipe.stages):
            results[name], _ = _run_one(pipe, rd, name, name in redo, f"step {i + 1}/{len(pipe.stages)} ")
    return results


__all__ = ["STAGES", "Pipeline", "PipelineConfig", "RunDirError", "default_config_path", "dependents",
           "load_pipeline", "run_all", "run_stage", "status", "upstream"]
