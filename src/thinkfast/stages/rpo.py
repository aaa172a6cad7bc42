"""Stage ``rpo``: being built (issue 25)."""

from __future__ import annotations

from dataclasses import dataclass

MAKES = "model"


def reads(cfg) -> dict:
    from . import Input

    return {"model": Input("model")}


@dataclass
class Config:
    seed: int = 0


def run(cfg, stage, inputs) -> dict:
    raise NotImplementedError("stage rpo is being built (issue 25)")
