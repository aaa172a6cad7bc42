"""Stage ``fuse``: FFN Fusion of the latest model (normally the Puzzle child).

Paper: FFN Fusion (arXiv 2503.18908) sections 3-4; Llama-Nemotron (arXiv 2505.00949) section 2.1 (stage
1b); REFERENCE.md section 3. The algorithm is :mod:`thinkfast.puzzle.fusion`; this stage measures the block
dependency matrix on the data section's train rows, picks the groups (or takes ``groups``), fuses them,
checks the result against the target engine, and measures what fusion cost and bought: layers before and
after, KL to the unfused model on held-out rows, and decode speedup (fused vs unfused, timed in
back-to-back pairs) at each of ``timing_batches``: batch 1, where fusion pays most, and the search's batch.

Writes ``model/`` (nemotron-nas), ``dependency.json`` (the matrix, ``M[i][j]`` for ``i < j``),
``dependency.png`` (its heatmap) and ``fusion.json`` (runs, left-out layers, groups, measurements).

Departures: the paper picks groups by inspecting the matrix; here a rule does (see
:func:`thinkfast.puzzle.fusion.find_groups`: whole runs minus their last member by default, cut at
``max_group`` and, when set, at a dependency ``threshold``). Each member keeps its own RMSNorm (folded
into its columns) instead of sharing the last member's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..artifacts import copy_tokenizer_files, read_model_sidecar, write_model_sidecar
from ..data import Corpus, doc_attention
from ..modeling.engine_rules import DEFAULT_ENGINE, check_engine, check_engine_name, untie_for
from ..puzzle.fusion import dependency_matrix, find_groups, fuse, fused_layer_map
from ..puzzle.assemble import describe
from ..puzzle.parent import kl_and_lm_loss
from ..artifacts import load_decilm
from ..puzzle.timing import device_name, paired_speedup
from ..rundir import StageDir, atomic_dir, atomic_write_json, atomic_write_text
from ..runtime import setup_device
from . import Input, Inputs, check_device, model_path, positive

MAKES = "model"
DATA = "corpus"  # the dependency matrix reads the train rows, the KL the held-out rows


def reads(cfg) -> dict:
    return {"parent": Input("model")}


@dataclass
class FuseConfig:
    max_group: int = 8  # most layers in one fused FFN
    threshold: float | None = None  # most dependency M[i, j] inside a group (None: no limit)
    leave_last: bool = True  # the paper leaves each run's last FFN unfused
    groups: list[list[int]] = field(default_factory=list)  # explicit groups instead of the rule
    # None: the engine the input model was made for (its thinkfast.json), else thinkfast.modeling.engine_rules.DEFAULT_ENGINE
    engine: str | None = None
    dependency_rows: int = 16
    kl_rows: int = 32
    seq_len: int = 256
    batch_size: int = 8
    measure: bool = True  # time fused vs unfused decode steps here
    timing_batches: list[int] = field(default_factory=lambda: [1, 16])
    decode_context: int = 256
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        if self.engine is not None:
            check_engine_name(self.engine)
        positive(self, "dependency_rows", "kl_rows", "seq_len", "batch_size", "decode_context")
        if self.max_group < 2:
            raise ValueError(f"max_group={self.max_group} must be >= 2")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0")
        if not self.timing_batches or any(b < 1 for b in self.timing_batches):
            raise ValueError(f"timing_batches={self.timing_batches}: list batch sizes >= 1")


Config = FuseConfig


def _batches(rows: torch.Tensor, size: int):
    return [rows[i:i + size] for i in range(0, rows.shape[0], size)]


@torch.no_grad()
def _kl(before, after, rows: torch.Tensor, size: int, corpus) -> tuple[float, float]:
    """Mean per-token KL(before || after) and the LM loss of ``after`` on held-out rows."""
    kls, lms, n = 0.0, 0.0, 0
    for ids in _batches(rows, size):
        x, attn = ids[:, :-1], doc_attention(ids[:, :-1], corpus.doc_eos)
        kl, lm = kl_and_lm_loss(before(x, **attn).logits, after(x, **attn).logits, ids[:, 1:])
        kls, lms, n = kls + kl * ids.shape[0], lms + lm * ids.shape[0], n + ids.shape[0]
    return kls / n, lms / n


def _heatmap(path, matrix, flags) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(2 + 0.35 * L, 1.5 + 0.35 * L))
    shown = matrix.clone()
    shown[torch.tril(torch.ones(L, L, dtype=torch.bool))] = float("nan")
    im = ax.imshow(shown.numpy(), cmap="viridis")
    ax.set_xlabel("layer j (its update compared)")
    ax.set_ylabel("layer i (removed)")
    ax.set_title("block dependency: cosine distance of h_j without block i")
    ticks = list(range(L))
    ax.set_xticks(ticks, [f"{i}{'*' if flags[i] else ''}" for i in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(i) for i in ticks], fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.text(0.01, 0.01, "* attention-free SwiGLU layer (fusable)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: FuseConfig, stage: StageDir, inputs: Inputs) -> dict:
    from transformers import AutoTokenizer

    from ..puzzle.fusion import fusable

    model_dir = model_path(inputs)
    device = setup_device(cfg.device)
    model = load_decilm(model_dir, device)
    sidecar = read_model_sidecar(model_dir)
    engine = cfg.engine or sidecar.get("engine") or DEFAULT_ENGINE
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    corpus = Corpus(inputs.data, tokenizer)
    L = model.config.num_hidden_layers
    flags = fusable(model.config)
    print(f"fuse: step 1/3 block dependency matrix of {L} layers on {cfg.dependency_rows} rows")
    rows = corpus.rows("train", f"fuse-dependency:{cfg.seed}", cfg.dependency_rows, cfg.seq_len).to(device)
    # only attention-free SwiGLU layers can be grouped, but every row is cheap at this scale and the
    # whole matrix shows where attention removal left dependencies
    matrix = dependency_matrix(model, _batches(rows, cfg.batch_size), eos_id=corpus.doc_eos)
    plan = find_groups(model.config, matrix, max_group=cfg.max_group,
                       threshold=float("inf") if cfg.threshold is None else cfg.threshold,
                       leave_last=cfg.leave_last, groups=cfg.groups or None)
    print(f"fuse: step 2/3 fuse {plan.groups or 'nothing'} (runs {plan.runs}, left out {plan.left_out})")
    fused = fuse(model, plan.groups)
    untie_for(fused, engine)
    check_engine(fused.config, engine, "the fused model")  # before anything is written
    held_out = corpus.rows("held_out", f"fuse-kl:{cfg.seed}", cfg.kl_rows, cfg.seq_len).to(device)
    kl, lm = _kl(model, fused, held_out, cfg.batch_size, corpus)
    _, lm_before = _kl(model, model, held_out, cfg.batch_size, corpus)
    speedups = {}
    if cfg.measure and plan.groups:
        print(f"fuse: step 3/3 decode speedup at batch {cfg.timing_batches} ({device_name(device)})")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for b in cfg.timing_batches:
            speedups[str(b)] = paired_speedup(model, fused, "decode_s", b, 1, cfg.decode_context, dtype, device)
    arch = describe(fused.config)
    with atomic_dir(stage.model_dir) as tmp:
        fused.save_pretrained(tmp)
        copy_tokenizer_files(model_dir, tmp)
        # the input layers whose outputs each layer reproduces (through earlier maps): distillation compares
        # hidden states at the last of them
        here = fused_layer_map(model.config, plan.groups)
        before = sidecar.get("layer_map")
        if before:  # an input made by fuse already: its layers' spans, joined
            here = [[t for i in span for t in before[i]] for span in here]
        write_model_sidecar(tmp, prompting=sidecar.get("prompting"), made_by="fuse", engine=engine,
                            layer_map=here)
    atomic_write_json(stage.path / "dependency.json", {
        "format": "thinkfast-dependency/1", "layers": L, "fusable": flags, "rows": cfg.dependency_rows,
        "seq_len": cfg.seq_len, "matrix": matrix.tolist()})
    _heatmap(stage.path / "dependency.png", matrix, flags)
    atomic_write_text(stage.path / "architecture.txt", "\n".join(arch) + "\n")
    metrics = {"layers_before": L, "layers_after": fused.config.num_hidden_layers, "groups": plan.groups,
               "runs": plan.runs, "left_out": plan.left_out, "engine": engine,
               "kl_to_unfused": kl, "lm_loss_before": lm_before, "lm_loss_after": lm,
               "decode_speedup": speedups, "timing_device": device_name(device) if speedups else None,
               "max_group_dependency": max((float(matrix[i, j]) for g in plan.groups for i in g for j in g if i < j),
                                           default=None)}
    atomic_write_json(stage.path / "fusion.json", metrics)
    log = stage.logger()
    log.log("done", **metrics, architecture=arch)
    log.close()
    return metrics
