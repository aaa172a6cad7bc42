"""Stage ``sft``: supervised fine-tuning that teaches the reasoning toggle, on the latest model of the run.

Paper: Llama-Nemotron (arXiv 2505.00949) section 4 (stage 3); REFERENCE.md section 4. Paired data: each
prompt as an "on" example (system ``detailed thinking on``, response ``<think>trace</think>answer``) and an
"off" one (system ``detailed thinking off``, the answer alone); token-level cross entropy on the assistant's
tokens only; the nano model was trained with reasoning data first (``order: reasoning_first``). Data: the
nano world's programmatic teacher (no ``files``), or JSON lines in the Llama-Nemotron post-training schema
or as chat messages (:mod:`thinkfast.train.sft`). ``on_share`` sets the mix of modes.

Samples are packed best-fit into rows of ``seq_len`` tokens; a sample attends to itself only (block-diagonal
causal mask, position ids from 0 per sample), so packing changes no logits. Every ``eval_every`` steps and at
the end, ``eval_problems`` held-out nano problems are answered greedily in both modes: accuracy, toggle
obedience (on: one well-formed think block; off: none), response length; a mode obeyed less than half the
time is reported as a collapse (the paper's known failure of mixed SFT). With ``files``, whole prompts of the files
are held out for the held-out loss (``held_out_rows``) and the check asks ``eval_files`` prompts instead (graded by
math-verify where they carry a ``solution``; none: no check). The toggle goes into the model's own template layout
(Llama-3 or ChatML, :func:`thinkfast.toggle.install_chat_template`). ``curve.json`` / ``curve.png``.
The model is written with ``prompting: chat``. Resumable (:mod:`thinkfast.train.loop`).

Departures: the paper's data is DeepSeek-R1 / Llama-3.3 responses to real prompts; lr, epochs and sequence
length here suit the nano world (Nano: lr 1e-4, 4 epochs; Super: 5e-6, 1 epoch, 16k sequences).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..artifacts import Curve, copy_tokenizer_files, read_model_sidecar, write_curve, write_model_sidecar
from ..data import DataError, packed_attention
from ..evaluation import toggle_check
from ..evaluation.checks import prompt_toggle_check
from ..generation import LocalBackend
from ..nano import tasks
from ..artifacts import load_decilm
from ..rundir import StageDir, atomic_dir
from ..toggle import install_chat_template
from ..runtime import autocast, resolve_precision, setup_device
from ..train.loop import TrainLoop, adamw, optimizer_step, warmup_cosine
from ..train.sft import mix_modes, nano_examples, nano_if_examples, pack, packed_batch, read_examples, sft_model_loss
from ..train.settings import CadenceFields, OptimizerFields, PeriodicEvalFields
from ..train.sft import tokenize_example
from . import Input, Inputs, check_device, check_nano_mix, positive

MAKES = "model"


def reads(cfg) -> dict:
    return {"model": Input("model")}


def files(cfg) -> list[tuple[str, list[str]]]:
    """The data files and the check's prompt files (identified by content: a changed file makes the stage stale)."""
    return [("files", list(cfg.files)), ("eval_files", list(cfg.eval_files))]


@dataclass
class SFTConfig(OptimizerFields, PeriodicEvalFields, CadenceFields):
    """The optimizer (``lr`` ... ``precision``), periodic evaluation (held-out nano problems per mode; 0: no
    toggle check) and cadence fields are :mod:`thinkfast.train.settings`'s."""

    files: list[str] = field(default_factory=list)  # JSON lines; none: the nano world's paired examples
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping at the first
    # with files: examples held out of them for the held-out loss (whole prompts: both modes of one go together;
    # a tenth of the prompts at most)
    held_out_rows: int = 16
    # with files: prompt files (thinkfast.rl.prompts' schema; a "solution" column is graded by the math check) whose
    # first eval_problems prompts the periodic toggle check asks in both modes; none: no check
    eval_files: list[str] = field(default_factory=list)
    nano_prompts: int = 4000  # nano world: prompts, each an "on" and an "off" example
    # nano world: instruction-following prompts besides (a problem with 1-3 of IFEval's instructions, the teacher's
    # answer rewritten to follow them), each an "on" and an "off" example; drawn apart from rloo's and rpo's prompts
    if_prompts: int = 0
    kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "word"])
    digits: list[int] = field(default_factory=lambda: [1, 2])
    steps: list[int] = field(default_factory=lambda: [1, 2])
    # nano world: the user turn's wording, one canonical template or the "train" templates of
    # thinkfast.nano.tasks.PHRASINGS drawn per example (the "held_out" ones are eval's nano_phrased suite)
    phrasing: Literal["canonical", "varied"] = "canonical"
    # nano world: prompts of off_digits / off_steps as "off" examples only (the answer alone), so that "off" holds
    # beyond the difficulties the traces cover
    off_prompts: int = 0
    off_digits: list[int] = field(default_factory=lambda: [1, 2, 3])
    off_steps: list[int] = field(default_factory=lambda: [1, 2, 3])
    on_share: float | None = 0.5  # share of "on" examples among those with a mode; null: keep all as they come
    order: Literal["mixed", "reasoning_first"] = "mixed"
    epochs: float = 1.0
    batch_size: int = 8  # packed rows per step
    seq_len: int = 512
    eval_every: int = 100
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        if isinstance(self.files, str):
            self.files = [self.files]
        if isinstance(self.eval_files, str):
            self.eval_files = [self.eval_files]
        if self.eval_files and not self.files:
            raise ValueError("eval_files is the check of a model trained on files: give files too (the nano world's "
                             "check is its own held-out problems)")
        if self.held_out_rows < 1:
            raise ValueError(f"held_out_rows={self.held_out_rows} must be >= 1")
        super().__post_init__()  # optimizer, periodic evaluation and cadence fields
        positive(self, "nano_prompts", "batch_size")
        if self.if_prompts < 0 or self.off_prompts < 0:
            raise ValueError(f"if_prompts={self.if_prompts} and off_prompts={self.off_prompts} must be >= 0")
        if not self.off_digits or not self.off_steps or min(self.off_digits) < 1 or min(self.off_steps) < 1:
            raise ValueError(f"off_digits={self.off_digits} and off_steps={self.off_steps} must be non-empty lists "
                             "of counts >= 1")
        if self.seq_len < 16:
            raise ValueError(f"seq_len={self.seq_len} must be >= 16")
        if not self.epochs > 0:
            raise ValueError(f"epochs={self.epochs} must be > 0")
        if self.on_share is not None and not 0.0 <= self.on_share <= 1.0:
            raise ValueError(f"on_share={self.on_share} must be in [0, 1] (or null: keep every example)")
        check_nano_mix(self)


Config = SFTConfig


def schedule(samples: list, modes: list, cfg: SFTConfig) -> list[list[int]]:
    """Every packed row of the whole run, in training order: per epoch the samples are shuffled and packed
    (``reasoning_first``: the "on" samples' rows, then the others'), the rows shuffled within each group;
    a fractional last epoch takes the first rows of its order."""
    lengths = [len(s[0]) for s in samples]
    out: list[list[int]] = []
    for epoch in range(math.ceil(cfg.epochs)):
        rng = random.Random(f"sft:{cfg.seed}:{epoch}")
        groups = ([[i for i, m in enumerate(modes) if m is True], [i for i, m in enumerate(modes) if m is not True]]
                  if cfg.order == "reasoning_first" else [list(range(len(samples)))])
        rows: list[list[int]] = []
        for group in groups:
            rng.shuffle(group)
            packed = [[group[j] for j in r] for r in pack([lengths[i] for i in group], cfg.seq_len)]
            rng.shuffle(packed)
            rows += packed
        if epoch + 1 > cfg.epochs:
            rows = rows[:round(len(rows) * (cfg.epochs - epoch))]
        out += rows
    return out


def _examples(cfg: SFTConfig) -> tuple[list, list[str]]:
    if cfg.files:
        examples, skipped = read_examples(cfg.files, skip_bad=cfg.skip_bad_rows)
        if not examples:
            raise DataError(f"sft.files {cfg.files}: no usable rows ({len(skipped)} skipped)")
        return examples, skipped
    examples = nano_examples(cfg.nano_prompts, cfg.seed, cfg.kinds, cfg.digits, cfg.steps, split="train",
                             phrasing=cfg.phrasing, off_prompts=cfg.off_prompts, off_digits=cfg.off_digits,
                             off_steps=cfg.off_steps)
    if cfg.if_prompts:  # another seed than the RL stages' instruction prompts (same split), so none is seen twice
        examples += nano_if_examples(cfg.if_prompts, cfg.seed + _IF_SEED, cfg.kinds, cfg.digits, cfg.steps)
    return examples, []


_IF_SEED = 1_000_003


def _hold_out(examples: list, rows: int, seed: int) -> tuple[list, list]:
    """(train, held out): whole prompts (every example of one user turn) drawn by ``seed`` until ``rows``
    examples are held out, from a tenth of the prompts at most (one at least); a DataError when nothing would be
    left to train on."""
    def prompt(ex) -> str:
        return next((m["content"] for m in reversed(ex.messages) if m["role"] == "user"), "")

    keys = sorted({prompt(e) for e in examples})
    random.Random(f"sft-held-out:{seed}").shuffle(keys)
    chosen: set[str] = set()
    count = 0
    for k in keys[:max(1, len(keys) // 10)]:  # a tenth of the prompts at most (one at least)
        if count >= rows:
            break
        chosen.add(k)
        count += sum(prompt(e) == k for e in examples)
    train = [e for e in examples if prompt(e) not in chosen]
    if not train:
        raise DataError(f"sft.held_out_rows={rows} holds out every example of sft.files; lower it")
    return train, [e for e in examples if prompt(e) in chosen]


def _file_checks(cfg: SFTConfig) -> tuple[list, list] | None:
    """The periodic toggle check's prompts (messages, solutions) from ``eval_files``; None without them."""
    if not cfg.eval_files or not cfg.eval_problems:
        return None
    from ..rl.prompts import read_prompts

    rows, _ = read_prompts(cfg.eval_files, skip_bad=cfg.skip_bad_rows)
    rows = rows[:cfg.eval_problems]
    if not rows:
        raise DataError(f"sft.eval_files {cfg.eval_files}: no usable prompt")
    return [list(r.messages) for r in rows], [r.columns.get("solution") for r in rows]


def _plot(path, curve: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [p["tokens"] / 1e6 for p in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(tokens, [p["loss"] for p in curve], "o-", color="tab:blue", label="held-out loss")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out assistant loss", color="tab:blue")
    if curve and "on" in curve[0]:
        right = ax.twinx()
        for mode, style in (("on", "s--"), ("off", "^:")):
            right.plot(tokens, [p[mode]["accuracy"] for p in curve], style, color="tab:red", label=f"accuracy {mode}")
            right.plot(tokens, [p[mode]["format_ok"] for p in curve], style, color="tab:green",
                       label=f"toggle obeyed {mode}")
        right.set_ylim(0, 1.02)
        right.legend(loc="center right", fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: SFTConfig, stage: StageDir, inputs: Inputs) -> dict:
    from transformers import AutoTokenizer

    model_dir = inputs["model"]
    device = setup_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    own_template = tokenizer.chat_template
    added = install_chat_template(tokenizer)  # the toggle, in the layout of the model's own template
    examples, skipped = _examples(cfg)
    held = nano_examples(16, cfg.seed, cfg.kinds, cfg.digits, cfg.steps, split="eval")
    if cfg.files:  # held-out examples of the files themselves, whole prompts at a time
        examples, held = _hold_out(examples, cfg.held_out_rows, cfg.seed)
    examples = mix_modes(examples, cfg.on_share, cfg.seed)
    samples, modes, too_long = [], [], 0
    for ex in examples:
        ids, mask = tokenize_example(tokenizer, ex)
        if len(ids) > cfg.seq_len:
            too_long += 1
            continue
        samples.append((ids, mask))
        modes.append(ex.thinking)
    if not samples:
        raise DataError(f"sft: no example fits seq_len={cfg.seq_len}")
    rows = schedule(samples, modes, cfg)
    total = max(1, math.ceil(len(rows) / cfg.batch_size))
    held_samples = [tokenize_example(tokenizer, e) for e in held]
    held_batch = packed_batch(held_samples, pack([len(s[0]) for s in held_samples], max(cfg.seq_len, 1024)),
                              max(cfg.seq_len, 1024), pad_id=tokenizer.pad_token_id or 0)
    problems = (tasks.make_problems(cfg.eval_problems, seed=cfg.seed, kinds=tuple(cfg.kinds), digits=(1, 2),
                                    split="eval") if cfg.eval_problems and not cfg.files else [])
    checks = _file_checks(cfg) if cfg.files else None

    model = load_decilm(model_dir, device).requires_grad_(True)
    if added or len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    opt = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[dict] = []

    def load(state):
        model.load_state_dict(state["model"])
        curve[:] = state["curve"]

    log = stage.logger()
    loop = TrainLoop(stage, "sft", total, opt, log=log, device=device,
                     schedule=lambda s: warmup_cosine(s, lr=cfg.lr, total=total, warmup=cfg.warmup_steps,
                                                      min_ratio=cfg.min_lr_ratio),
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, load=load,
                     save=lambda: {"model": model.state_dict(), "curve": list(curve)})
    n_on = sum(m is True for m in modes)
    print(f"sft: {len(samples)} examples ({n_on} on, {sum(m is False for m in modes)} off) in {len(rows)} rows, "
          f"{total} steps of {cfg.batch_size} x {cfg.seq_len}, {precision}; {len(skipped)} rows skipped, "
          f"{too_long} longer than seq_len")
    log.log("start", resume_step=loop.start, model=str(model_dir), examples=len(samples), on=n_on,
            rows=len(rows), steps=total, skipped=len(skipped), skipped_rows=skipped[:100], too_long=too_long,
            added_tokens=added, precision=precision)

    @torch.no_grad()
    def point(step: int, tokens: int) -> None:
        model.eval()
        b = {k: v.to(device) for k, v in held_batch.items()}
        loss, _ = sft_model_loss(model, b, **packed_attention(b["seq_ids"]))
        p = {"step": step, "tokens": tokens, "loss": float(loss)}
        if problems:
            p.update(toggle_check(LocalBackend(model), tokenizer, problems, max_new_tokens=cfg.eval_max_new_tokens))
        if checks:
            p.update(prompt_toggle_check(LocalBackend(model), tokenizer, checks[0], checks[1],
                                         max_new_tokens=cfg.eval_max_new_tokens))
        curve.append(p)
        log.log("eval", **p)
        model.train()

    model.train()
    if loop.start == 0 and not curve:
        point(0, 0)
    pad = tokenizer.pad_token_id or 0
    for step in loop:
        b = packed_batch(samples, rows[step * cfg.batch_size:(step + 1) * cfg.batch_size], cfg.seq_len, pad)
        b = {k: v.to(device) for k, v in b.items()}
        with autocast(device, precision):
            loss, n_tokens = sft_model_loss(model, b, **packed_attention(b["seq_ids"]))
        grad_norm = optimizer_step(opt, loss, clip=cfg.grad_clip)
        tokens = int((b["seq_ids"] >= 0).sum())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
            point(step + 1, loop.counters.get("tokens", 0) + tokens)
        loop.end_step(step, loss=loss.item(), grad_norm=grad_norm, tokens=tokens, loss_tokens=n_tokens)
    loop.close()
    model.eval()
    with atomic_dir(stage.model_dir) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(model_dir, tmp)
        if added or tokenizer.chat_template != own_template:
            tokenizer.save_pretrained(tmp)
        sidecar = read_model_sidecar(model_dir)
        extra = {k: sidecar[k] for k in ("engine",) if k in sidecar}
        write_model_sidecar(tmp, prompting="chat", made_by="sft", **extra)
    write_curve(stage.path, Curve(points=curve, plot=[{"label": "loss", "y": "loss"}] + [
        {"label": f"accuracy {mode}", "y": f"{mode}.accuracy"} for mode in ("on", "off")]))
    _plot(stage.path / "curve.png", curve, f"toggle SFT of {model_dir.parent.name}")
    last = curve[-1]
    metrics = {"examples": len(samples), "on_examples": n_on, "rows": len(rows), "steps": total,
               "tokens": loop.counters.get("tokens", 0), "seconds": round(loop.seconds, 1), "precision": precision,
               "skipped_rows": len(skipped), "too_long": too_long, "loss_before": curve[0]["loss"],
               "loss_after": last["loss"]}
    for mode in ("on", "off"):
        if mode in last:
            metrics.update({f"{k}_{mode}": v for k, v in last[mode].items()})
    if problems or checks:
        metrics["collapsed"] = last["collapsed"]
        if last["collapsed"]:
            print(f"sft: WARNING: the model does not obey the toggle in mode(s) {last['collapsed']} "
                  "(collapse to one mode); see curve.json")
    log.log("done", **metrics)
    log.close()
    return metrics
