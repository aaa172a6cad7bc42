"""Stage ``distill``: recovery training of the latest model: knowledge distillation from the parent, or
continued pretraining.

Paper: Puzzle (arXiv 2411.19146) global knowledge distillation; Llama-Nemotron (arXiv 2505.00949) section
2.1 (stage 2, "knowledge distillation, then continued pretraining"); REFERENCE.md sections 0-1. The
student is the latest model of the run (the Puzzle child, or the fused model); the teacher is the first
(the parent), or the folder named by ``teacher``. Loss (:mod:`thinkfast.train.distill`):
``kl_weight * KL(p_teacher || p_student) + cosine_weight * sum_layers (1 - cos(h_student, h_teacher))
+ lm_weight * LM loss``; hidden states are compared layer by layer where the student's layers map onto the
teacher's at the state the next kept layer reads (a Puzzle child: a layer to the last of the identity
layers after it, or to itself; a fused model: through the map ``fuse`` records, to the last parent layer
whose output it reproduces, the identity layers dropped after it included; otherwise the last layer
only). ``mode: lm`` is continued pretraining: the LM loss alone, no teacher needed. Teacher logits are
computed on the fly, or, with ``teacher_top_k: k`` (a teacher too big to run beside the student), once
before training: the teacher's k largest logits per token for every step's rows, kept in shards under
``teacher_cache/`` (deleted when the stage ends), and the KL is taken over those k tokens (no cosine loss:
the cache keeps no hidden states).

Every ``eval_every`` steps (and at the start and the end) it measures, on held-out rows, the KL to the
teacher and the student's LM loss, and, for a nano-world model, the step-by-step accuracy on
``eval_problems`` 1-2 digit problems (greedy); ``curve.json`` and ``curve.png`` plot them against training
tokens. Resumable (:mod:`thinkfast.train.loop`), the curve included.

Departures: the paper distils on 0.5-90B tokens of a pretraining mix; the nano world uses its own mix for
a few thousand steps. A fused layer is compared with the parent only where the next kept layer reads (the
paper's per-layer sum over a child with its no-op layers also pairs it with every identity in between).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..artifacts import Curve, copy_tokenizer_files, read_model_sidecar, write_curve, write_model_sidecar
from ..data import Corpus, doc_attention
from ..evaluation import quick_accuracy
from ..generation import LocalBackend
from ..nano import tasks
from ..puzzle.fusion import identity_layers
from ..puzzle.parent import kl_and_lm_loss
from ..artifacts import load_decilm
from ..rundir import StageDir, atomic_dir
from ..runtime import autocast, resolve_precision, setup_device
from ..train.distill import TeacherCache, distill_loss, layer_map, topk_kl
from ..train.loop import TrainLoop, adamw, optimizer_step, warmup_cosine
from ..train.settings import CadenceFields, OptimizerFields, PeriodicEvalFields
from . import Input, Inputs, check_device, positive

MAKES = "model"
DATA = "corpus"  # trains on the train rows, measures on the held-out rows


def reads(cfg) -> dict:
    if cfg.teacher:
        return {"student": Input("model"), "teacher": Input("model", field="teacher")}
    return {"models": Input("model", many=True)}  # the first is the teacher, the latest the student


@dataclass
class DistillConfig(OptimizerFields, PeriodicEvalFields, CadenceFields):
    """The optimizer (``lr`` ... ``precision``), periodic evaluation and cadence fields are
    :mod:`thinkfast.train.settings`'s; ``eval_problems`` counts for nano-world models only."""

    mode: Literal["distill", "lm"] = "distill"  # lm: continued pretraining (LM loss only)
    kl_weight: float = 1.0
    cosine_weight: float = 1.0
    lm_weight: float = 0.0  # the paper found that adding it hurt
    temperature: float = 1.0
    teacher: str | None = None  # a model folder; default: the run's first model
    teacher_top_k: int | None = None  # cache the teacher's top-k logits first, then train without it
    train_steps: int = 300
    batch_size: int = 8
    seq_len: int = 512
    eval_rows: int = 16
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        super().__post_init__()  # optimizer, periodic evaluation and cadence fields
        positive(self, "train_steps", "batch_size", "eval_rows")
        if self.seq_len < 2 or not self.temperature > 0:
            raise ValueError("seq_len must be >= 2 and temperature > 0")
        if min(self.kl_weight, self.cosine_weight, self.lm_weight) < 0:
            raise ValueError("kl_weight, cosine_weight and lm_weight must be >= 0")
        if self.mode == "distill" and not (self.kl_weight or self.cosine_weight or self.lm_weight):
            raise ValueError("every loss weight is 0: set kl_weight, cosine_weight or lm_weight")
        if self.teacher_top_k is not None:
            if self.teacher_top_k < 1 or self.mode != "distill":
                raise ValueError(f"teacher_top_k={self.teacher_top_k}: a positive k, with mode: distill")
            if self.cosine_weight:
                raise ValueError("teacher_top_k caches the teacher's logits only, no hidden states: set "
                                 "cosine_weight: 0 with it")


Config = DistillConfig


def _models(cfg: DistillConfig, inputs: Inputs):
    if "student" in inputs:
        return inputs["student"], inputs["teacher"]
    models = list(inputs.get("models", {}).values())
    if not models:
        raise ValueError("no model to train: put a stage that makes one (pretrain, search, fuse) before distill")
    if len(models) < 2 and cfg.mode == "distill":
        raise ValueError("distill needs a teacher and a student: the run has one model; put it after search "
                         "(or fuse), set distill.teacher to a model folder, or use distill.mode=lm")
    return models[-1], (models[0] if len(models) > 1 else None)


@torch.no_grad()
def _measure(student, teacher, held_out: torch.Tensor, batch: int, problems, tokenizer, prompting, cfg,
             held_topk=None, eos_id: int | None = None) -> dict:
    student.eval()
    out: dict = {}
    kls, lms, n = 0.0, 0.0, 0
    for i in range(0, held_out.shape[0], batch):
        ids = held_out[i:i + batch]
        attn = doc_attention(ids[:, :-1], eos_id)
        s = student(ids[:, :-1], **attn).logits
        if teacher is not None:
            kl, lm = kl_and_lm_loss(teacher(ids[:, :-1], **attn).logits, s, ids[:, 1:])
        else:  # the cached teacher (KL over its top k), or none
            lm = float(torch.nn.functional.cross_entropy(s.float().flatten(0, 1), ids[:, 1:].flatten()))
            kl = (float(topk_kl(held_topk[0][i:i + batch], held_topk[1][i:i + batch], s))
                  if held_topk is not None else float("nan"))
        kls, lms, n = kls + kl * ids.shape[0], lms + lm * ids.shape[0], n + ids.shape[0]
    out["kl"] = kls / n if teacher is not None or held_topk is not None else None
    out["lm_loss"] = lms / n
    if problems:
        mode = "think" if prompting == "text" else "on"
        out["accuracy"] = quick_accuracy(LocalBackend(student), tokenizer, problems, prompting, mode,
                                         max_new_tokens=cfg.eval_max_new_tokens)
    student.train()
    return out


def _plot(path, curve: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [p["tokens"] / 1e6 for p in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    key = "kl" if curve and curve[0].get("kl") is not None else "lm_loss"
    ax.plot(tokens, [p[key] for p in curve], "o-", color="tab:blue", label=f"held-out {key}")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel(key, color="tab:blue")
    if curve and "accuracy" in curve[0]:
        right = ax.twinx()
        right.plot(tokens, [p["accuracy"] for p in curve], "s--", color="tab:red", label="accuracy")
        right.set_ylabel("step-by-step accuracy (1-2 digits)", color="tab:red")
        right.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: DistillConfig, stage: StageDir, inputs: Inputs) -> dict:
    from transformers import AutoTokenizer

    student_dir, teacher_dir = _models(cfg, inputs)
    device = setup_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    corpus = Corpus(inputs.data, tokenizer)
    held_out = corpus.rows("held_out", f"distill-eval:{cfg.seed}", cfg.eval_rows, cfg.seq_len).to(device)

    def rows(step: int) -> torch.Tensor:
        return corpus.rows("train", f"distill:{cfg.seed}:{step}", cfg.batch_size, cfg.seq_len)

    teacher = load_decilm(teacher_dir, device) if teacher_dir is not None else None
    t_layers, t_vocab = (teacher.config.num_hidden_layers, teacher.config.vocab_size) if teacher else (0, None)
    cache = held_topk = None
    if cfg.teacher_top_k:  # the teacher's top-k logits first; it leaves memory before the student comes
        k = min(cfg.teacher_top_k, t_vocab)
        cache = TeacherCache(stage.path / "teacher_cache", k)
        cache.build(teacher, rows, cfg.train_steps, eos_id=corpus.doc_eos)
        with torch.no_grad():
            tops = [teacher(x, **doc_attention(x, corpus.doc_eos)).logits.float().topk(k, dim=-1)
                    for x in (held_out[i:i + cfg.batch_size, :-1] for i in range(0, held_out.shape[0], cfg.batch_size))]
        held_topk = (torch.cat([t.values for t in tops]).to(torch.bfloat16), torch.cat([t.indices for t in tops]))
        teacher = None
    student = load_decilm(student_dir, device).requires_grad_(True)
    if t_vocab is not None and t_vocab != student.config.vocab_size:
        raise ValueError(f"the teacher {teacher_dir} has {t_vocab} tokens, the student {student_dir} "
                         f"{student.config.vocab_size}: they must share a tokenizer")
    sidecar = read_model_sidecar(student_dir)
    weights = ({"kl_weight": 0.0, "cosine_weight": 0.0, "lm_weight": 1.0} if cfg.mode == "lm" else
               {"kl_weight": cfg.kl_weight, "cosine_weight": cfg.cosine_weight, "lm_weight": cfg.lm_weight})
    pairs = (layer_map(student.config.num_hidden_layers, t_layers, sidecar.get("layer_map"),
                       identity_layers(student.config))
             if teacher is not None and weights["cosine_weight"] else [])
    train_teacher = teacher if cfg.mode == "distill" else None
    prompting = sidecar.get("prompting") or "text"
    problems = (tasks.make_problems(cfg.eval_problems, seed=cfg.seed, kinds=tasks.KINDS, digits=(1, 2),
                                    split="eval") if inputs.data.nano and cfg.eval_problems else [])
    opt = adamw(student, lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[dict] = []

    def load(state):
        student.load_state_dict(state["model"])
        curve[:] = state["curve"]

    log = stage.logger()
    loop = TrainLoop(stage, cfg.mode, cfg.train_steps, opt, log=log, device=device,
                     schedule=lambda s: warmup_cosine(s, lr=cfg.lr, total=cfg.train_steps, warmup=cfg.warmup_steps,
                                                      min_ratio=cfg.min_lr_ratio),
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, load=load,
                     save=lambda: {"model": student.state_dict(), "curve": list(curve)})
    print(f"distill: {cfg.mode} of {student_dir} ({student.config.num_hidden_layers} layers) from "
          f"{teacher_dir if cfg.mode == 'distill' else 'its corpus'}, {cfg.train_steps} steps, {precision}")
    log.log("start", resume_step=loop.start, student=str(student_dir), teacher=str(teacher_dir), pairs=pairs,
            precision=precision, **weights)

    def point(step: int, tokens: int) -> None:
        m = _measure(student, teacher, held_out, cfg.batch_size, problems, tokenizer, prompting, cfg, held_topk,
                     corpus.doc_eos)
        curve.append({"step": step, "tokens": tokens, **m})
        log.log("eval", **curve[-1])

    student.train()
    if loop.start == 0 and not curve:
        point(0, 0)
    for step in loop:
        topk = None
        if cache is not None:
            ids, values, indices = cache.get(step)
            ids, topk = ids.to(device), (values.to(device), indices.to(device))
        else:
            ids = rows(step).to(device)
        x, labels = ids[:, :-1], ids[:, 1:]
        attn = doc_attention(x, corpus.doc_eos)
        with autocast(device, precision):
            t_out = None
            if train_teacher is not None:
                with torch.no_grad():
                    t_out = train_teacher(x, output_hidden_states=bool(weights["cosine_weight"]), **attn)
            s_out = student(x, output_hidden_states=bool(weights["cosine_weight"]), **attn)
            loss, parts = distill_loss(s_out, t_out, labels, pairs, temperature=cfg.temperature,
                                       teacher_topk=topk, **weights)
        grad_norm = optimizer_step(opt, loss, clip=cfg.grad_clip)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:  # before a checkpoint saves the curve
            point(step + 1, loop.counters.get("tokens", 0) + x.numel())
        loop.end_step(step, loss=loss.item(), grad_norm=grad_norm, tokens=x.numel(), **parts)
    loop.close()
    student.eval()
    with atomic_dir(stage.model_dir) as tmp:
        student.save_pretrained(tmp)
        copy_tokenizer_files(student_dir, tmp)
        extra = {k: sidecar[k] for k in ("engine", "layer_map") if k in sidecar}
        write_model_sidecar(tmp, prompting=sidecar.get("prompting"), made_by="distill", **extra)
    write_curve(stage.path, Curve(points=curve, plot=[{"label": "KL to the parent", "y": "kl"},
                                                      {"label": "accuracy", "y": "accuracy"}], log_y=True))
    if cache is not None:
        shutil.rmtree(cache.path, ignore_errors=True)
    source = f" from {Path(teacher_dir).parent.name}" if cfg.mode == "distill" else ""
    _plot(stage.path / "curve.png", curve, f"{cfg.mode} of {Path(student_dir).parent.name}{source}")
    first, last = curve[0], curve[-1]
    metrics = {"mode": cfg.mode, "steps": cfg.train_steps, "tokens": loop.counters.get("tokens", 0),
               "seconds": round(loop.seconds, 1), "precision": precision, "layer_pairs": len(pairs),
               "teacher": None if cfg.mode != "distill" else f"top-{cache.k} cache" if cache else "on the fly",
               "kl_before": first.get("kl"), "kl_after": last.get("kl"),
               "lm_loss_before": first["lm_loss"], "lm_loss_after": last["lm_loss"],
               "accuracy_before": first.get("accuracy"), "accuracy_after": last.get("accuracy")}
    log.log("done", **metrics)
    log.close()
    return metrics
