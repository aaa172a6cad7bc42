"""thinkfast's GRPO step and packed SFT against TRL's GRPOTrainer and SFTTrainer, side by side in one run.

Same tiny Llama (about 2.5M parameters; thinkfast trains the same weights converted to nemotron-nas, which
computes the same function), same prompts and data, CPU, float32, no gradient checkpointing:

- GRPO: ``--prompts`` prompts x ``--group`` samples x ``--gen-tokens`` tokens per step (temperature 1), one
  gradient update per rollout (TRL's default ``num_iterations=1``), no KL (TRL's default ``beta=0``), the
  same reward function (nano accuracy plus the share of digits, TRL signature: every step has signal). Seconds per step, median over ``--steps`` steps
  after one warm-up step.
- SFT: one epoch over the nano world's paired toggle examples (variable length), packed into rows of
  ``--seq-len`` tokens, ``--rows`` rows per step, assistant-only loss, samples kept independent: TRL with
  ``packing=True, packing_strategy="bfd", padding_free=True`` (its correct packing) and thinkfast's
  block-diagonal packing. Tokens per second = the epoch's tokens / its time.

TRL is in the ``bench`` extra only: ``pip install -e ".[bench]"``. Writes benchmarks/results/trl_speed.json.

    python benchmarks/trl_speed.py [--steps 5] [--prompts 8] [--group 8] [--gen-tokens 48] [--sft-prompts 400]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

import thinkfast
from thinkfast.modeling.convert import convert_llama_model
from thinkfast.evaluation import build_prompt
from thinkfast.generation import SamplingParams
from thinkfast.nano import tasks
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.rl.grpo import grpo_step
from thinkfast.rl.rewards import RewardRunner, completion_text
from thinkfast.toggle import stop_token_ids
from thinkfast.train.loop import adamw, optimizer_step
from thinkfast.train.sft import block_causal_mask, nano_examples, pack, packed_batch, sft_loss, tokenize_example


def accuracy_reward(completions, answer, **kwargs):
    """Nano accuracy plus the share of digits in the text, in TRL's signature (both trainers call this same
    function). The digit share makes rewards differ within every group even for an untrained model, so
    both trainers do a real update each step (thinkfast skips steps without any advantage)."""
    out = []
    for c, a in zip(completions, answer):
        text = completion_text(c)
        right = 1.0 if tasks.extract_answer(text) == int(a) else 0.0
        out.append(right + sum(ch.isdigit() for ch in text) / max(1, len(text)))
    return out


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)


def bench_grpo(a, tok, llama, problems) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    n_steps = a.steps + 1
    rows = [{"prompt": [{"role": "system", "content": "detailed thinking on"},
                        {"role": "user", "content": tasks.chat_prompt(p)}], "answer": p.answer}
            for p in problems[:a.prompts * n_steps]]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
                          max_completion_length=a.gen_tokens, use_cpu=True, bf16=False, gradient_checkpointing=False,
                          logging_steps=10_000, report_to="none", save_strategy="no", max_steps=n_steps,
                          learning_rate=1e-5, temperature=1.0, top_p=1.0, beta=0.0, shuffle_dataset=False,
                          dataloader_num_workers=0, seed=0)
        timer = StepTimer()
        trainer = GRPOTrainer(model=copy.deepcopy(llama), reward_funcs=[accuracy_reward], args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
        trainer.train()
    trl_s = statistics.median(timer.times[1:])

    model = convert_llama_model(copy.deepcopy(llama)).float().train()
    opt = adamw(model, lr=1e-5)
    runner = RewardRunner([("accuracy", accuracy_reward, 1.0)])
    params = SamplingParams(max_new_tokens=a.gen_tokens, temperature=1.0, top_p=1.0,
                            stop_token_ids=tuple(stop_token_ids(tok)), batch_size=a.prompts * a.group, seed=0)
    times, tokens, updates = [], [], []
    for s in range(n_steps):
        batch = problems[s * a.prompts:(s + 1) * a.prompts]
        prompts = [build_prompt(tok, p, "chat", "on") for p in batch]
        t = time.perf_counter()
        rec, _ = grpo_step(model, opt, prompts, {"answer": [p.answer for p in batch]}, runner, params,
                           group_size=a.group, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                           pad_id=tok.pad_token_id, updates=1)
        times.append(time.perf_counter() - t)
        tokens.append(rec["response_tokens"])
        updates.append(rec["updates"])
    ours_s = statistics.median(times[1:])
    return {"trl_seconds_per_step": trl_s, "thinkfast_seconds_per_step": ours_s, "speedup": trl_s / ours_s,
            "trl_step_times": timer.times, "thinkfast_step_times": times,
            "thinkfast_mean_response_tokens": statistics.fmean(tokens), "thinkfast_updates_per_step": updates}


def bench_sft(a, tok, llama) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    examples = nano_examples(a.sft_prompts, 0, tasks.KINDS, (1, 2), (1, 2))
    samples = [tokenize_example(tok, e) for e in examples]
    samples = [s for s in samples if len(s[0]) <= a.seq_len]
    total_tokens = sum(len(s[0]) for s in samples)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, packing=True, packing_strategy="bfd", padding_free=True,
                         max_length=a.seq_len, per_device_train_batch_size=a.rows, assistant_only_loss=True,
                         num_train_epochs=1, use_cpu=True, bf16=False, gradient_checkpointing=False,
                         logging_steps=10_000, report_to="none", save_strategy="no", learning_rate=1e-4,
                         dataloader_num_workers=0, seed=0)
        ds = Dataset.from_list([{"messages": list(e.messages)} for e, s in zip(examples, samples)])
        trainer = SFTTrainer(model=copy.deepcopy(llama), args=args, train_dataset=ds, processing_class=tok)
        t = time.perf_counter()
        trainer.train()
        trl_s = time.perf_counter() - t
        trl_steps = trainer.state.global_step

    model = convert_llama_model(copy.deepcopy(llama)).float().train()
    opt = adamw(model, lr=1e-4)
    rows = pack([len(s[0]) for s in samples], a.seq_len)
    t = time.perf_counter()
    for i in range(0, len(rows), a.rows):
        b = packed_batch(samples, rows[i:i + a.rows], a.seq_len, tok.pad_token_id)
        logits = model(b["input_ids"], attention_mask=block_causal_mask(b["seq_ids"]),
                       position_ids=b["position_ids"]).logits
        loss, _ = sft_loss(logits, b["labels"])
        optimizer_step(opt, loss, clip=1.0)
    ours_s = time.perf_counter() - t
    return {"examples": len(samples), "tokens": total_tokens, "trl_seconds": trl_s, "trl_steps": trl_steps,
            "thinkfast_seconds": ours_s, "thinkfast_steps": -(-len(rows) // a.rows),
            "trl_tokens_per_second": total_tokens / trl_s, "thinkfast_tokens_per_second": total_tokens / ours_s,
            "speedup": trl_s / ours_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--sft-prompts", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--only", choices=["grpo", "sft"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trl_speed.json"))
    a = ap.parse_args()
    import trl

    tok = build_tokenizer()
    llama = tiny_llama(tok)
    problems = tasks.make_problems(a.prompts * (a.steps + 1), seed=0, kinds=tasks.KINDS, digits=(1, 2))
    out = {"params": sum(p.numel() for p in llama.parameters()), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "trl": trl.__version__, "thinkfast": thinkfast.__version__,
           "machine": platform.processor() or platform.machine(), "args": vars(a)}
    if a.only in (None, "grpo"):
        out["grpo"] = bench_grpo(a, tok, llama, problems)
        print("grpo", json.dumps({k: v for k, v in out["grpo"].items() if "times" not in k}), flush=True)
    if a.only in (None, "sft"):
        out["sft"] = bench_sft(a, tok, llama)
        print("sft", json.dumps(out["sft"]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
