"""The parts of a training stage that must not drift between stages: optimizer and schedule, a
resumable checkpoint with RNG state, the log / checkpoint cadence and progress (device and precision:
:mod:`thinkfast.runtime`).

Not a framework: each stage writes its own step (its loss, its batches) and calls these around it
(``setup_device`` and ``autocast`` from :mod:`thinkfast.runtime`)::

    device = setup_device(cfg.device)
    opt = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loop = TrainLoop(stage, "pretrain", cfg.train_steps, opt,
                     schedule=lambda s: warmup_cosine(s, lr=cfg.lr, total=cfg.train_steps, warmup=cfg.warmup_steps),
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                     save=lambda: {"model": model.state_dict()}, load=lambda st: model.load_state_dict(st["model"]))
    for step in loop:                       # resumes after the last checkpoint; sets each step's lr
        with autocast(device, cfg.precision):
            loss = ...
        grad_norm = optimizer_step(opt, loss, clip=cfg.grad_clip)
        loop.end_step(step, loss=loss.item(), grad_norm=grad_norm, tokens=n)   # logs, checkpoints
    loop.close()

A checkpoint (:mod:`thinkfast.train.checkpoint`, no pickle) holds what ``save()`` returns plus the
optimizer, the step, the elapsed seconds, the counters given to ``end_step`` (``tokens``: summed) and
the RNG states of Python, NumPy and torch (CPU and CUDA), so a resumed run draws what an uninterrupted
one would have drawn. Checkpoints of earlier versions (without RNG state or counters) still resume.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from .checkpoint import has_state, load_state, save_state

__all__ = ["TrainLoop", "adamw", "get_rng_state", "optimizer_step", "set_rng_state", "warmup_cosine"]


def warmup_cosine(step: int, *, lr: float, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up over ``warmup`` steps to ``lr``, then cosine
    decay to ``min_ratio * lr`` at step ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_ratio + (1 - min_ratio) * cosine)


def adamw(params, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW as every thinkfast stage uses it. Given a module, weight decay applies to its matrices only
    (not to norms and biases); given parameters, to all of them."""
    if isinstance(params, torch.nn.Module):
        named = list(params.named_parameters())
        groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": list(params), "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, *, clip: float | None = None,
                   params: Iterable[torch.Tensor] | None = None) -> float | None:
    """``zero_grad``, ``backward``, optional gradient clipping (returns the norm before clipping), ``step``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = None
    if clip is not None:
        if params is None:
            params = [p for g in opt.param_groups for p in g["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    opt.step()
    return norm


def get_rng_state() -> dict:
    state = {"python": list(random.getstate()), "numpy": list(np.random.get_state()), "torch": torch.get_rng_state()}
    state["numpy"][1] = torch.from_numpy(np.asarray(state["numpy"][1]).astype(np.int64))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class TrainLoop:
    """Steps ``start .. total - 1`` of a resumable stage (see the module docstring).

    ``save()`` returns the stage's own state (tensors, numbers, nested dicts/lists); ``load(state)``
    restores it from a checkpoint's dict. ``log`` is the stage's JSON-lines logger (``None``: the
    stage folder's ``log.jsonl``); each logged line has event ``desc``."""

    def __init__(self, stage, desc: str, total: int, optimizer: torch.optim.Optimizer | None, *,
                 schedule: Callable[[int], float] | None = None, log_every: int = 10, checkpoint_every: int = 100,
                 save: Callable[[], dict] | None = None, load: Callable[[dict], None] | None = None,
                 log=None, device: torch.device | None = None, ema: float = 0.95):
        self.stage, self.desc, self.total, self.opt = stage, desc, total, optimizer
        self.schedule, self.log_every, self.checkpoint_every = schedule, log_every, checkpoint_every
        self._save, self.ema_decay = save or dict, ema
        self.log = log if log is not None else stage.logger()
        self.start, self.counters, self.loss_ema, self._bar = 0, {}, None, None
        elapsed = 0.0
        if optimizer is not None and has_state(stage.checkpoint_dir):
            state = load_state(stage.checkpoint_dir, device if device is not None else "cpu")
            if load is not None:
                load(state)
            optimizer.load_state_dict(state["optimizer"])
            if "rng" in state:
                set_rng_state(state["rng"])
            self.start, elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
            self.counters = dict(state.get("counters", {}))
            for key in ("tokens",):  # checkpoints of earlier versions kept counters at the top level
                if key in state and key not in self.counters:
                    self.counters[key] = state[key]
            self.loss_ema = state.get("loss_ema")
            self.log.log("resume", step=self.start)
        self.t0 = time.perf_counter() - elapsed

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def lr(self, step: int) -> float | None:
        return None if self.schedule is None else self.schedule(step)

    def __iter__(self) -> Iterator[int]:
        from tqdm.auto import tqdm

        end = self.total if self.opt is not None else self.start
        self._bar = tqdm(range(self.start, end), initial=self.start, total=self.total, desc=self.desc, unit="step")
        for step in self._bar:
            if self.schedule is not None:
                lr = self.schedule(step)
                for group in self.opt.param_groups:
                    group["lr"] = lr
            yield step
        self._bar.close()

    def end_step(self, step: int, *, loss: float, postfix: str = "loss", **fields) -> None:
        """After ``step``: update the loss average and the bar, log every ``log_every`` steps and at the
        end, checkpoint every ``checkpoint_every`` steps (not at the end: the stage writes its output).
        ``fields`` go to the log; an int field named in ``counters`` (``tokens``) is summed over steps."""
        for key in ("tokens",):
            if key in fields:
                self.counters[key] = self.counters.get(key, 0) + int(fields.pop(key))
        self.loss_ema = loss if self.loss_ema is None else self.ema_decay * self.loss_ema + (1 - self.ema_decay) * loss
        if self._bar is not None:
            self._bar.set_postfix({postfix: f"{self.loss_ema:.4f}"})
        done = step + 1
        if done % self.log_every == 0 or done == self.total:
            extra = {"lr": self.lr(step)} if self.schedule is not None else {}
            self.log.log(self.desc, step=done, loss=loss, loss_ema=self.loss_ema, **extra, **fields,
                         **self.counters, seconds=self.seconds)
        if done % self.checkpoint_every == 0 and done < self.total:
            self.checkpoint(done)

    def checkpoint(self, done: int) -> None:
        save_state(self.stage.checkpoint_dir, {**self._save(), "optimizer": self.opt.state_dict(), "step": done,
                                               "elapsed": self.seconds, "counters": self.counters,
                                               "loss_ema": self.loss_ema, "rng": get_rng_state()})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
