"""Distillation throughput: the ``distill`` stage (the training package: TrainLoop with its progress bar,
JSON-lines log, checkpoint cadence and counters; AdamW groups; warm-up + cosine) against a plain PyTorch
loop written out by hand, on the same student, teacher, rows, loss and batch, side by side (issue 11:
"the training package must cost nothing measurable").

Both load the same two float32 DeciLM models (random weights of the nano parent's shape: the teacher
and the student share their depth, so the cosine loss covers every layer, as for a Puzzle child), draw
the same corpus rows, compute KL + per-layer cosine and take AdamW steps with clipping. Throughput is
steady state: training tokens per second between the end of step ``--skip`` and the end of step
``steps - skip`` (the stage's own log gives both ends; its periodic evaluation falls outside), in
``--rounds`` interleaved rounds, median per side.

    python benchmarks/distill_throughput.py [--steps 60] [--rounds 3] [--batch 8] [--seq 512]
    -> benchmarks/results/distill_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.config import load_yaml
from thinkfast.data import Corpus, doc_attention
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.artifacts import load_decilm

sys.path.insert(0, str(Path(__file__).parent))
from decode_overhead import cpu_name  # noqa: E402


def make_model(path: Path, seed: int, shape: dict) -> Path:
    tok = build_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def stage_run(tmp: Path, i: int, a) -> float:
    """The distill stage in a pipeline run; tokens/s from its log."""
    run = tmp / f"run{i}"
    pipe = load_pipeline(default_config_path("nano"), [
        f"run_dir={run}", "stages=[parent,distill]", f"parent.path={tmp / 'student'}",
        f"distill.teacher={tmp / 'teacher'}", f"distill.train_steps={a.steps}", f"distill.batch_size={a.batch}",
        f"distill.seq_len={a.seq}", "distill.precision=fp32", f"distill.eval_every={a.steps}",
        "distill.eval_rows=8", "distill.eval_problems=0", "distill.device=cpu"])
    run_stage(pipe, "parent")
    run_stage(pipe, "distill")
    logged = {}
    for line in (run / "distill" / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "distill":
            logged[rec["step"]] = rec
    lo, hi = logged[a.skip], logged[a.steps - a.skip]
    return (hi["tokens"] - lo["tokens"]) / (hi["seconds"] - lo["seconds"])


def plain_run(tmp: Path, a) -> float:
    """The same training written as a plain loop: no package, no log, no checkpoints, no progress bar."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    student = load_decilm(tmp / "student").requires_grad_(True).train()
    teacher = load_decilm(tmp / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "student"))
    corpus = Corpus(load_pipeline(default_config_path("nano"), []).data, tokenizer)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    marks = {}
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        ids = corpus.rows("train", f"distill:0:{step}", a.batch, a.seq)
        x = ids[:, :-1]
        attn = doc_attention(x, corpus.doc_eos)  # the nano config's document mask, as the stage applies it
        with torch.no_grad():
            t = teacher(x, output_hidden_states=True, **attn)
        s = student(x, output_hidden_states=True, **attn)
        kl = F.kl_div(F.log_softmax(s.logits, -1), F.log_softmax(t.logits, -1), log_target=True,
                      reduction="none").sum(-1).mean()
        cos = sum((1 - F.cosine_similarity(hs, ht, dim=-1)).mean()
                  for hs, ht in zip(s.hidden_states[1:], t.hidden_states[1:]))
        loss = kl + cos
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        loss.item()
        if step + 1 in (a.skip, a.steps - a.skip):
            marks[step + 1] = time.perf_counter()
    return (a.steps - 2 * a.skip) * a.batch * (a.seq - 1) / (marks[a.steps - a.skip] - marks[a.skip])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="steps left out at each end (a multiple of 10)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/distill_throughput.json")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shape = load_yaml(default_config_path("nano"))[0]["pretrain"]
    shape = {k: shape[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        make_model(tmp / "teacher", 1, shape)
        make_model(tmp / "student", 2, shape)
        stage, plain = [], []
        for r in range(a.rounds):
            plain.append(plain_run(tmp, a))
            stage.append(stage_run(tmp, r, a))
            print(f"round {r}: plain {plain[-1]:.0f} tok/s, distill stage {stage[-1]:.0f} tok/s", flush=True)
    ratios = [s / p for s, p in zip(stage, plain)]
    result = {
        "what": "distill stage vs a plain PyTorch loop, same models / rows / loss (KL + per-layer cosine) / batch",
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "model": shape,
        "steps": a.steps, "measured_steps": a.steps - 2 * a.skip, "batch": a.batch, "seq_len": a.seq,
        "plain_tokens_per_s": plain, "stage_tokens_per_s": stage,
        "median_plain": statistics.median(plain), "median_stage": statistics.median(stage),
        "stage_over_plain_per_round": ratios, "median_ratio": statistics.median(ratios)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"distill stage / plain loop: {result['median_ratio']:.3f} (median of {a.rounds} rounds) -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
