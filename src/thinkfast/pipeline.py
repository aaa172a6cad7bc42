"""The pipeline: one YAML file, one section per stage, stages run in order through the run directory.

A config file looks like::

    run_dir: runs/nano          # relative paths are relative to the current directory
    stages: [pretrain, eval]    # the order `thinkfast run` follows
    pretrain: {...}             # one section per stage, fields of that stage's config dataclass
    eval: {...}

Each stage module has a config dataclass and ``run(cfg, stage: StageDir, model_dir) -> metrics``, where
``model_dir`` is the ``model/`` folder of the latest earlier stage that made one (None for the first).
The runner owns the run-directory protocol: skip a completed stage, resume an interrupted one, write
metrics and the completion marker last. A stage's identity is the hash of its config *and* of the
completion marker of the stage it reads from, so a redone upstream stage invalidates what follows.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import ConfigError, apply_overrides, config_hash, from_dict, load_yaml, to_dict
from .rundir import StageDir, _read_json, previous_model_dir
from .stages import costs, library, pretrain, scores, search
from .stages import eval as eval_stage

# name -> (config dataclass, entry function). A plain table: adding a stage is one line here.
STAGES = {
    "pretrain": (pretrain.PretrainConfig, pretrain.run),
    "eval": (eval_stage.EvalConfig, eval_stage.run),
    "library": (library.LibraryConfig, library.run),
    "scores": (scores.ScoresConfig, scores.run),
    "costs": (costs.CostsConfig, costs.run),
    "search": (search.SearchConfig, search.run),
}
# Fields that change how fast a stage runs but not what it produces; left out of its identity.
_NOT_IN_HASH = {"device", "log_every", "checkpoint_every", "save_samples"}


@dataclass
class PipelineConfig:
    run_dir: str = "runs/nano"
    stages: list[str] = field(default_factory=lambda: ["pretrain", "eval"])

    def __post_init__(self):
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


def default_config_path(name: str = "nano") -> Path:
    """A config shipped inside the package (``nano``, ``smoke``)."""
    path = Path(str(resources.files("thinkfast") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise ConfigError(f"no embedded config named {name!r}")
    return path


def load_pipeline(path: str | Path | None, overrides: list[str] = ()) -> Pipeline:
    """Read a pipeline YAML (default: the embedded nano world), apply overrides, validate every section."""
    path = Path(path) if path is not None else default_config_path()
    data, lines = load_yaml(path)
    data = apply_overrides(data, list(overrides))
    where = str(path)
    top = {k: v for k, v in data.items() if k not in STAGES}
    pipe = from_dict(PipelineConfig, top, where=where, lines=lines)
    configs = {name: from_dict(cls, data.get(name), where=where, lines=lines, prefix=name)
               for name, (cls, _) in STAGES.items()}
    return Pipeline(where, Path(pipe.run_dir), list(pipe.stages), configs)


def stage_identity(pipe: Pipeline, name: str) -> str:
    cfg = {k: v for k, v in to_dict(pipe.configs[name]).items() if k not in _NOT_IN_HASH}
    upstream = None
    earlier = pipe.stages[: pipe.stages.index(name)] if name in pipe.stages else []
    if earlier:
        marker = StageDir(pipe.run_dir, earlier[-1]).marker_path
        if marker.is_file():
            m = _read_json(marker)
            upstream = [m.get("config_hash"), m.get("finished_at")]
    return config_hash({"stage": name, "config": cfg, "upstream": upstream})


def input_model_dir(pipe: Pipeline, name: str) -> Path | None:
    """The model the stage reads: None for the first stage or when its config names one itself
    (``eval.model``), else the model/ of the latest earlier stage that wrote one."""
    if getattr(pipe.configs[name], "model", None) or name not in pipe.stages or pipe.stages[0] == name:
        return None
    return previous_model_dir(pipe.run_dir, pipe.stages, name)


def run_stage(pipe: Pipeline, name: str, force: bool = False, index: str = "") -> tuple[dict, bool]:
    """Run one stage through the run-directory protocol. Returns (metrics, ran)."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known: {list(STAGES)}")
    cfg = pipe.configs[name]
    _, entry = STAGES[name]
    stage = StageDir(pipe.run_dir, name)
    ident = stage_identity(pipe, name)
    mode = stage.begin(ident, force=force)
    if mode == "skip":
        print(f"{index}{name}: complete, skipped ({stage.marker_path})")
        return stage.read_metrics(), False
    print(f"{index}{name}: {'resuming' if mode == 'resume' else 'starting'} in {stage.path}")
    model_dir = input_model_dir(pipe, name)
    t0 = time.perf_counter()
    metrics = entry(cfg, stage, model_dir)
    metrics["stage_seconds"] = round(time.perf_counter() - t0, 1)
    stage.finish(metrics, ident)
    shutil.rmtree(stage.checkpoint_dir, ignore_errors=True)  # the finished model supersedes it
    print(f"{index}{name}: done in {metrics['stage_seconds']} s")
    return metrics, True


def run_all(pipe: Pipeline, force: bool = False) -> dict:
    """Run every stage in order. Once a stage has (re)run, the stages after it run again too."""
    results, ran_any = {}, False
    for i, name in enumerate(pipe.stages):
        results[name], ran = run_stage(pipe, name, force=force or ran_any, index=f"step {i + 1}/{len(pipe.stages)} ")
        ran_any = ran_any or ran
    return results
