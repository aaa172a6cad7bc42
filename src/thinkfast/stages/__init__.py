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

import re
from dataclasses import dataclass
from pathlib import Path

import torch

# where each kind of output lives inside its stage's folder
OUTPUTS = {"model": "model", "library": "library", "scores": "scores.json", "costs": "costs.json"}


@dataclass(frozen=True)
class Input:
    """One thing a stage reads: a ``kind`` of output (a key of :data:`OUTPUTS`); ``field``, a config
    field that names a path instead when set; ``many``: every earlier stage that makes one (as a
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


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(name: str) -> None:
    """Validate a ``device`` value when the config loads (whether it exists is checked before a stage runs)."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ValueError(f"device={name!r}: choose auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu. A device this machine lacks is a clear error."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}, but this machine has no CUDA device; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r}, but MPS is not available here; use auto or cpu")
    return device


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
