"""Config field groups that the training stages share (litgpt's ``TrainArgs``/``EvalArgs``, kept flat).

A stage config inherits the groups it uses, so its YAML section stays flat (``sft.lr``, not
``sft.optimizer.lr``) and one ``__post_init__`` per group validates those keys for every stage, naming the
key. A stage whose default differs re-declares just that field (``lr: float = 4e-3``): dataclass
inheritance keeps the field's name and place and takes the new default, so a stage's identity (the hash of
its fields by name) is what it was when each stage declared them itself.

The groups' ``__post_init__`` chain cooperatively: a stage config's own ``__post_init__`` calls
``super().__post_init__()``, which runs every inherited group's checks once::

    @dataclass
    class SFTConfig(OptimizerFields, PeriodicEvalFields, CadenceFields):
        eval_every: int = 100          # this stage's default
        def __post_init__(self):
            super().__post_init__()
            ...                        # the stage's own fields
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["OptimizerFields", "CadenceFields", "PeriodicEvalFields", "RolloutSampling"]


def _at_least(cfg, minimum: int, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"{name}={value} must be >= {minimum}")


def _positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"{name}={value} must be > 0")


class _Group:
    """The end of the ``__post_init__`` chain."""

    def __post_init__(self):
        pass


@dataclass
class OptimizerFields(_Group):
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio`` (``train.loop.warmup_cosine``),
    gradient clipping, and the precision the step computes in."""

    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # 1.0: constant after warmup
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm
    # bf16 autocast (weights and optimizer stay float32): 1.7x faster on a CPU with AVX512-BF16, 9x slower
    # on one without (emulated); "auto" takes bf16 only where the device computes it natively
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    def __post_init__(self):
        _positive(self, "lr", "grad_clip")
        _at_least(self, 0, "warmup_steps")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision={self.precision!r} must be one of 'auto', 'bf16', 'fp32'")
        super().__post_init__()


@dataclass
class CadenceFields(_Group):
    """How often a training loop saves a resumable checkpoint and writes a ``log.jsonl`` line (in steps).
    Neither changes what is produced, so neither is in a stage's identity (``pipeline._NOT_IN_HASH``)."""

    checkpoint_every: int = 50
    log_every: int = 10

    def __post_init__(self):
        _at_least(self, 1, "checkpoint_every", "log_every")
        super().__post_init__()


@dataclass
class PeriodicEvalFields(_Group):
    """A quick greedy check every ``eval_every`` steps (and before the first): ``eval_problems`` held-out
    problems (0: none), each answered in at most ``eval_max_new_tokens`` tokens."""

    eval_every: int = 50
    eval_problems: int = 40
    eval_max_new_tokens: int = 600

    def __post_init__(self):
        _at_least(self, 1, "eval_every", "eval_max_new_tokens")
        _at_least(self, 0, "eval_problems")
        super().__post_init__()


@dataclass
class RolloutSampling(_Group):
    """How the policy samples its rollouts (``generation.SamplingParams``): ``batch_size`` sequences per
    generation batch, each at most ``max_new_tokens`` long, at ``temperature`` and nucleus ``top_p``."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64  # sequences per generation batch

    def __post_init__(self):
        _at_least(self, 1, "max_new_tokens", "batch_size")
        _positive(self, "temperature")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        super().__post_init__()
