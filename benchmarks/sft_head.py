"""Toggle SFT's step with the LM head on the labelled positions only, against the head on every position.

The SFT loss counts the assistant's tokens only; system turns, questions and padding carry no label. Computing the
full-vocabulary logits there is wasted work: at SmolLM2's 49k vocabulary the tied head is about a third of the
135M model's parameters, and in the GSM8K toggle pairs (``thinkfast gsm8k``'s ``sft.jsonl`` in SmolLM2's ChatML
template with the toggle) 40% of the tokens are prompt. :func:`thinkfast.train.sft.sft_model_loss` applies the head
where a label is (equal loss and gradients: ``tests/test_sft.py``). This times one forward and backward of the SFT
loss both ways, side by side in interleaved rounds, on a SmolLM2-135M-shaped Llama (hidden 576, 9 heads and 3 KV heads,
FFN 1536, vocabulary 49,152, tied; random weights) with ``--layers`` layers (the Puzzle child of the real run keeps
23 of 30), on packed rows of real toggle pairs when ``--data`` and ``--tokenizer`` exist, else of rows whose share of
labelled tokens is ``--label-share``:

    python benchmarks/sft_head.py [--layers 23] [--rows 4] [--seq-len 512] [--rounds 5]
        [--precision bf16] [--data data/gsm8k/sft.jsonl --tokenizer runs/smollm2/parent/model]
        -> benchmarks/results/sft_head.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from thinkfast.data import block_causal_mask
from thinkfast.puzzle.timing import device_name
from thinkfast.runtime import autocast
from thinkfast.toggle import install_chat_template
from thinkfast.train.sft import pack, packed_batch, read_examples, sft_loss, sft_model_loss, tokenize_example


def batches(a, vocab: int) -> tuple[list[dict], str]:
    if Path(a.data).is_file() and Path(a.tokenizer).is_dir():
        tok = AutoTokenizer.from_pretrained(a.tokenizer)
        install_chat_template(tok)
        examples = read_examples([a.data])[0][:a.rows * a.steps * 8]
        samples = [tokenize_example(tok, e) for e in examples]
        samples = [s for s in samples if len(s[0]) <= a.seq_len]
        rows = pack([len(s[0]) for s in samples], a.seq_len)
        out = [packed_batch(samples, rows[i * a.rows:(i + 1) * a.rows], a.seq_len, tok.pad_token_id or 0)
               for i in range(a.steps)]
        return out, f"{a.data} in {a.tokenizer}'s chat template with the toggle"
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(a.steps):
        ids = torch.randint(0, vocab, (a.rows, a.seq_len), generator=g)
        labels = torch.where(torch.rand(a.rows, a.seq_len, generator=g) < a.label_share, ids, -100)
        out.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(a.seq_len).expand(a.rows, -1),
                    "seq_ids": torch.zeros(a.rows, a.seq_len, dtype=torch.long)})
    return out, f"random tokens, {a.label_share:.0%} labelled"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=23)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="batches timed per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", default="data/gsm8k/sft.jsonl")
    ap.add_argument("--tokenizer", default="runs/smollm2/parent/model")
    ap.add_argument("--label-share", type=float, default=0.4)
    ap.add_argument("--precision", default="bf16", help="as configs/smollm2-135m.yaml's sft.precision")
    ap.add_argument("--out", default="benchmarks/results/sft_head.json")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=a.layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).train()
    cpu = torch.device("cpu")
    data, source = batches(a, cfg.vocab_size)

    def full(b):
        logits = model(b["input_ids"], attention_mask=block_causal_mask(b["seq_ids"]),
                       position_ids=b["position_ids"]).logits
        return sft_loss(logits, b["labels"])

    def labelled(b):
        return sft_model_loss(model, b, attention_mask=block_causal_mask(b["seq_ids"]))

    variants = {"full": full, "labelled": labelled}
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses: dict[str, float] = {}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, fn in (variants.items() if r % 2 == 0 else reversed(variants.items())):
            t = time.perf_counter()
            for b in data:
                model.zero_grad(set_to_none=True)
                with autocast(cpu, a.precision):
                    loss, _ = fn(b)
                loss.backward()
            if r:
                times[name].append((time.perf_counter() - t) / len(data))
            losses[name] = loss.item()
    labelled_share = statistics.fmean(float((b["labels"][:, 1:] != -100).sum() / (b["seq_ids"] >= 0).sum())
                                      for b in data)
    ratios = [f / l for f, l in zip(times["full"], times["labelled"])]
    out = {"machine": device_name(cpu), "torch": torch.__version__, "precision": a.precision,
           "threads": torch.get_num_threads(), "layers": a.layers, "rows": a.rows, "seq_len": a.seq_len,
           "data": source, "labelled_share": round(labelled_share, 3), "rounds": a.rounds,
           "seconds_per_step": {k: round(statistics.median(v), 3) for k, v in times.items()},
           "speedup_median": round(statistics.median(ratios), 3), "speedup_range": [round(min(ratios), 3),
                                                                                    round(max(ratios), 3)],
           "last_loss": losses, "command": "python benchmarks/sft_head.py " + " ".join(argv or sys.argv[1:])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
