"""Pipeline stages: one module per stage. Each has a config dataclass and

    MAKES = "model"                      # what its output is: model, library, scores, costs (or None)
    DATA = "corpus"                      # optional: reads the data section ("nano": pretrain's mix only)
    def reads(cfg) -> {role: Input}      # what it reads, by role
    def run(cfg, stage: StageDir, inputs: Inputs) -> metrics

The runner (``thinkfast.pipeline``) resolves each role to a file or folder: the output of the latest
earlier stage that makes that kind, or the path named by the config field ``Input.field`` when it is
set (a file from outside the run directory, identified by a hash of its content). Stages never import
each other; the files that cross between them are owned by :mod:`thinkfast.artifacts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifacts import OUTPUTS  # noqa: F401  (where each kind of output lives inside its stage's folder)
from ..runtime import check_device, resolve_device  # noqa: F401  (re-exported for the stages)


@dataclass(frozen=True)
class Input:
    """One thing a stage reads: a ``kind`` of output (a key of :data:`thinkfast.artifacts.OUTPUTS`); ``field``, a
    config field that names a path instead when set; ``many``: every earlier stage that makes one (as a
    ``{name: path}`` mapping), not just the latest."""

    kind: str
    field: str | None = None
    many: bool = False


class Inputs(dict):
    """role -> path (``{name: path}`` for a ``many`` role). ``ids`` holds each role's identity as the
    run directory records it, ``previous`` the stage's earlier completed output (or None), which a stage
    may reuse parts of when their own records match (eval does, per model), ``data`` the pipeline's data
    section (:class:`thinkfast.data.DataConfig`, files resolved) for a stage that declares ``DATA``."""

    def __init__(self, paths: dict | None = None, ids: dict | None = None, previous=None, data=None):
        super().__init__(paths or {})
        self.ids = ids or {}
        self.previous = previous
        if data is None:
            from ..data import DataConfig

            data = DataConfig()
        self.data = data


def positive(cfg, *names: str, minimum: int = 1) -> None:
    """Raise a ValueError naming the first of ``names`` below ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name}={value} must be >= {minimum}")


def model_path(inputs: Inputs, role: str = "parent") -> Path:
    """The model folder a stage reads under ``role``, with a message naming the missing producer."""
    path = inputs.get(role)
    if path is None:
        raise ValueError(f"no {role} model: put a stage that makes one (e.g. pretrain) before this one")
    return Path(path)


def check_nano_mix(cfg, instructions: bool = False) -> None:
    """The nano-world prompt fields a stage config shares (``kinds``, ``digits``, ``steps``; with ``instructions``,
    its ``[min, max]`` instructions per prompt): a ValueError naming the bad one."""
    from ..nano import tasks

    unknown = sorted(set(cfg.kinds) - set(tasks.KINDS))
    if unknown or not cfg.kinds or not cfg.digits or not cfg.steps:
        raise ValueError(f"kinds {cfg.kinds}, digits {cfg.digits}, steps {cfg.steps}: non-empty, kinds "
                         f"from {list(tasks.KINDS)}")
    if instructions and (len(cfg.instructions) != 2 or not 1 <= cfg.instructions[0] <= cfg.instructions[1]):
        raise ValueError(f"instructions={cfg.instructions} must be [min, max] with 1 <= min <= max")


def require_chat(model_dir: Path, stage: str, fix: str = "") -> dict:
    """The model folder's sidecar; a ValueError when the model was never taught the chat template's toggle."""
    from ..artifacts import read_model_sidecar

    sidecar = read_model_sidecar(model_dir)
    if sidecar.get("prompting") == "text":
        raise ValueError(f"{model_dir} was not taught the chat template's toggle (prompting: text): put sft "
                         f"before {stage}{fix}")
    return sidecar


def save_chat_model(model, stage_dir, source_dir: Path, sidecar: dict, made_by: str) -> None:
    """A trained chat policy written atomically to the stage's model folder, with the source folder's tokenizer
    files and a sidecar (``prompting: chat``, the source's target engine carried)."""
    from ..artifacts import copy_tokenizer_files, write_model_sidecar
    from ..rundir import atomic_dir

    with atomic_dir(stage_dir.model_dir) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(source_dir, tmp)
        write_model_sidecar(tmp, prompting="chat", made_by=made_by,
                            **{k: sidecar[k] for k in ("engine",) if k in sidecar})
