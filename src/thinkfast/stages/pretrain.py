"""Stage ``pretrain``: train the nano-world parent, a small Llama, from scratch.

Paper: Llama-Nemotron starts from an existing Llama-3 parent (arXiv 2505.00949 section 2); the nano world
has no such model, so this stage makes one. It plays the part of Llama-3's pretraining, not of any
Llama-Nemotron stage.

What the parent learns: plain-text documents of the nano world (``thinkfast.nano.tasks``) in the mix of
the pipeline's ``data`` section (``thinkfast.data``; the whole world: its held-out part is for the later
stages' measurements), a ``think_fraction`` of them worked step by step after the cue "Let's think step by
step." and the rest answered directly. There is no chat format and no toggle: the toggle is taught later by SFT, as in the
paper (section 4.1). A parent that learned both document kinds can be *prompted* into either mode, which
is what makes reasoning measurably useful: it solves far more problems when it works step by step.

Departures / choices:
- Documents are packed into rows of ``seq_len + 1`` tokens, each row starting at a document boundary
  (so position 0 always opens a problem, as it does at evaluation) and documents separated by
  ``<|end_of_text|>``; the last document of a row is cut. With ``data.doc_mask`` (the nano config) each
  document attends only to itself, positions from 0 (as at evaluation); without, across the row.
- ``easy_steps`` (default 0): a curriculum by size, the first batches drawing 1-digit numbers only
  (``easy_digits``); tried for the parent's seed robustness and not adopted (docs/LOG.md, session 8).
- Batch ``k`` is a pure function of ``(seed, k)``, so a resumed run sees exactly the batches an
  uninterrupted run would have seen.
- AdamW with linear warm-up and cosine decay to ``min_lr_ratio * lr``; float32 weights with bf16
  autocast where the device computes bf16 natively (``precision: auto``), float32 elsewhere; the loop,
  schedule and checkpoints are :mod:`thinkfast.train.loop`.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import torch

from ..artifacts import write_model_sidecar
from ..data import DataConfig, doc_attention
from ..modeling.packed import use_packed_attention
from ..nano.corpus import documents, packed_rows
from ..nano.tokenizer import build_tokenizer
from ..rundir import StageDir, atomic_dir
from ..runtime import autocast, resolve_precision, setup_device
from ..train.loop import TrainLoop, adamw, optimizer_step, warmup_cosine
from ..train.settings import CadenceFields, OptimizerFields
from . import Inputs, check_device, positive

MAKES = "model"
DATA = "nano"  # the nano mix of the data section


def reads(cfg) -> dict:
    return {}  # the first model of the pipeline


@dataclass
class PretrainConfig(OptimizerFields, CadenceFields):
    """Model size and optimisation of the nano parent (its corpus is the data section's nano mix). The
    defaults are close to the configs/nano.yaml parent; docs/LOG.md records how they were chosen.
    The optimizer (``lr`` ... ``precision``) and cadence fields are :mod:`thinkfast.train.settings`'s."""

    # model: a LlamaForCausalLM
    hidden_size: int = 96
    num_layers: int = 8
    num_heads: int = 6
    num_kv_heads: int = 6
    intermediate_size: int = 256
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    # optimisation
    train_steps: int = 1600
    batch_size: int = 8
    seq_len: int = 512  # a worked 2-digit product is ~370 tokens: documents must fit in a row
    lr: float = 4e-3
    warmup_steps: int = 100
    # a curriculum by size: the first ``easy_steps`` batches draw their numbers from ``easy_digits`` only
    easy_steps: int = 0
    easy_digits: list[int] = field(default_factory=lambda: [1])
    weight_decay: float = 0.1
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        super().__post_init__()  # optimizer and cadence fields
        positive(self, "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                 "max_position_embeddings", "train_steps", "batch_size", "seq_len")
        positive(self, "easy_steps", minimum=0)
        if not self.easy_digits or any(d < 1 for d in self.easy_digits):
            raise ValueError(f"easy_digits={self.easy_digits} must be a non-empty list of digit counts >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads} and "
                             f"num_heads by num_kv_heads={self.num_kv_heads}")
        if self.seq_len + 1 > self.max_position_embeddings:
            raise ValueError(f"seq_len={self.seq_len} must be < max_position_embeddings")


Config = PretrainConfig


def make_batch(cfg: PretrainConfig, data: DataConfig, tokenizer, step: int) -> torch.Tensor:
    """Batch number ``step``: token ids [batch_size, seq_len + 1], rows packed from whole documents."""
    rng = random.Random(f"pretrain:{cfg.seed}:{step}")
    mix = data.mix()
    if step < cfg.easy_steps:
        mix["digits"] = list(cfg.easy_digits)
    return packed_rows(tokenizer, rng, cfg.batch_size, cfg.seq_len + 1, **mix)


def too_long_fraction(cfg: PretrainConfig, data: DataConfig, tokenizer, n: int = 400) -> float:
    """Share of corpus documents longer than a row: their ends (the answer) are never trained on."""
    docs = documents(random.Random(f"pretrain-lengths:{cfg.seed}"), n, **data.mix())
    lengths = [len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    return sum(length > cfg.seq_len + 1 for length in lengths) / n


def build_parent(cfg: PretrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(cfg.seed)
    return use_packed_attention(LlamaForCausalLM(config))  # documents of a row attend per document (doc_mask)


def lr_at(cfg: PretrainConfig, step: int) -> float:
    return warmup_cosine(step, lr=cfg.lr, total=cfg.train_steps, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio)


def _optimizer(model, cfg: PretrainConfig):
    return adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)


def run(cfg: PretrainConfig, stage: StageDir, inputs: Inputs | None = None) -> dict:
    """Train the parent; write ``model/`` (a LlamaForCausalLM folder with the nano tokenizer)."""
    data = inputs.data if inputs is not None else DataConfig()
    if not data.nano:
        raise ValueError("pretrain trains the nano parent on the nano world; data.files is set")
    device = setup_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    tokenizer = build_tokenizer()
    model = build_parent(cfg, tokenizer).to(device)
    opt = _optimizer(model, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    cut = too_long_fraction(cfg, data, tokenizer)
    if cut > 0.01:
        warnings.warn(f"pretrain: {cut:.0%} of documents are longer than seq_len={cfg.seq_len} tokens and are left "
                      "out (cut, their answers would never be trained on); raise pretrain.seq_len to keep them",
                      stacklevel=2)
    eos = data.doc_eos(tokenizer)  # with data.doc_mask documents attend only to themselves
    log = stage.logger()
    loop = TrainLoop(stage, "train", cfg.train_steps, opt, schedule=lambda step: lr_at(cfg, step), log=log,
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, device=device,
                     save=lambda: {"model": model.state_dict()}, load=lambda st: model.load_state_dict(st["model"]))
    log.log("start", resume_step=loop.start, parameters=n_params, device=str(device), precision=precision,
            docs_longer_than_row=cut)
    model.train()
    for step in loop:
        batch = make_batch(cfg, data, tokenizer, step).to(device)
        x = batch[:, :-1]
        with autocast(device, precision):
            out = model(input_ids=x, **doc_attention(x, eos))
        loss = torch.nn.functional.cross_entropy(
            out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        grad_norm = optimizer_step(opt, loss, clip=cfg.grad_clip)
        loop.end_step(step, loss=loss.item(), grad_norm=grad_norm, tokens=batch[:, :-1].numel())
    loop.close()
    seconds, tokens = loop.seconds, loop.counters.get("tokens", 0)
    model.eval()
    with atomic_dir(stage.model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Read by `eval`: this model was trained on plain text, so it is prompted with text cues.
        write_model_sidecar(tmp, prompting="text", made_by="pretrain")
    metrics = {
        "parameters": n_params,
        "final_loss_ema": loop.loss_ema,
        "train_steps": cfg.train_steps,
        "tokens": tokens,
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "device": str(device),
        "precision": precision,
        "docs_longer_than_row": cut,
    }
    log.log("done", **metrics)
    log.close()
    return metrics
