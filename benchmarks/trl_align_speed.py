"""thinkfast's alignment steps against TRL's trainers, side by side in one run (issue 25).

Three comparisons, each the same tiny Llama (about 2.5M parameters, ``trl_speed.tiny_llama``; thinkfast trains the
same weights converted to nemotron-nas, which computes the same function), the same data, the same batch shapes,
CPU, float32, ``torch.set_num_threads(--threads)`` (2), no gradient checkpointing, no evaluation, no logging
(``logging_steps`` past the run, ``report_to="none"``, no checkpoints), the same optimizer (``torch.optim.AdamW``,
betas (0.9, 0.95), no weight decay: TRL with ``optim="adamw_torch"``; TRL's default fused kernel would differ from
thinkfast's :func:`thinkfast.train.loop.adamw`), gradient clipping at 1.0 on both sides. Seconds per optimizer
step, median over ``--steps`` steps after one warm-up step (TRL: a ``TrainerCallback`` from ``on_step_begin`` to
``on_step_end``; thinkfast: the step function's wall time). ``speedup`` = TRL's seconds / thinkfast's.

- **RLOO** (``RLOOTrainer`` vs :func:`thinkfast.rl.rloo.rloo_step`): ``--prompts`` prompts x ``--group`` samples
  (``num_generations``) of at most ``--gen-tokens`` tokens, temperature 1, top-p 1; one gradient update per
  rollout (TRL's ``num_iterations=1``), PPO clipping 0.2 on both (the ratio is 1 with one update; no effect), KL to
  the frozen starting model folded into the reward per sequence with ``--kl-beta`` (TRL's default 0.05), the reward
  of ``trl_speed.accuracy_reward`` (nano accuracy plus the share of digits: every group has signal). Per step, both
  sides: sample the completions (KV-cached decoding), a no-grad forward of the policy and one of the reference over
  the prompt+completion batch (for the KL), score, leave-one-out advantages, one forward+backward of the policy,
  one AdamW step (with ``--kl-beta 0`` TRL still runs the policy's no-grad forward, thinkfast runs neither
  no-grad forward). Stop tokens: an untrained model never says end-of-text, so every sample would be cut at
  ``--gen-tokens``, and thinkfast leaves truncated samples out of the loss (TRL, with
  ``mask_truncated_completions=True``, masks them but still runs them). Both sides therefore stop on the same
  set of ``2 + --stop-extra`` tokens (end-of-text, end-of-turn and the next ``--stop-extra`` ids that are not
  digits, given to TRL as the model's ``generation_config.eos_token_id``): completions stop at varied lengths (about 23 tokens on average
  with the defaults) and few are cut off (``thinkfast_truncated_share`` in the output says how many).
- **DPO** (``DPOTrainer`` vs :func:`thinkfast.rl.rpo.preference_step` with ``kind="dpo"``): ``--pairs``
  preference pairs per step (prompt: a nano problem with "detailed thinking on"; chosen: its correct worked
  solution; rejected: the same solution with a wrong final answer), ``loss_type="sigmoid"``, ``beta`` =
  ``--dpo-beta``. TRL's default ``precompute_ref_log_probs=False`` computes the reference log-probs with a frozen
  copy of the model inside each step, so thinkfast's step counts :func:`thinkfast.rl.rpo.sequence_logps` of the
  reference (no grad) too. Per step, both sides: one no-grad forward of the reference and one forward+backward of
  the policy over the 2 x ``--pairs`` rows (chosen and rejected in one batch), one AdamW step. Token ids: the ones
  TRL's own preprocessing produced (read back from ``trainer.train_dataset``), in TRL's order
  (``train_sampling_strategy="sequential"``), so both sides see identical batches.
- **Reward model** (``RewardTrainer`` on ``LlamaForSequenceClassification`` vs
  :func:`thinkfast.rl.reward_model.reward_model_step` on ``DeciLMForSequenceClassification``, ``num_labels=1``,
  the same weights and score head): ``--rm-pairs`` pairs per step (prompt+chosen and prompt+rejected of the DPO
  data as whole conversations), Bradley-Terry loss ``-log sigmoid(r_c - r_r)`` plus
  ``--center-coef * mean((r_c + r_r)^2)`` (TRL's ``center_rewards_coefficient``), ``max_length`` =
  ``--max-len`` (long enough that nothing is dropped; checked). Per step, both sides: one forward+backward over
  the 2 x ``--rm-pairs`` rows, one AdamW step. TRL gets the pairs pre-tokenized (``chosen_ids``/``rejected_ids``
  from :func:`thinkfast.rl.reward_model.encode_pairs`), so the token ids are identical.

Differences that could not be removed (the short form is in each comparison's ``notes`` in the output):

- Batch building: TRL's data collator runs in the dataloader before ``on_step_begin``, outside its timed step;
  thinkfast's ``packed_pair_batch`` / ``encode_pairs`` run inside its timed step (counts against thinkfast; tokenizing
  the reward pairs included). In RLOO both sides build their batches inside the step.
- Prompt sharing (algorithmic, kept): thinkfast's forwards compute each prompt once per group of ``--group``
  samples (RLOO) or once per pair (DPO: a pair's chosen and rejected rows share the prompt) and share its keys and
  values (nemotron-nas accepts any cache); TRL runs every row's prompt. Same tokens in, same log-probs out
  (tested in thinkfast), fewer FLOPs, one more (small) forward call per pass.
- Padding (DPO and reward model): TRL right-pads whole rows to the longest prompt+response of the batch;
  thinkfast packs the batch's sequences without padding into rows as long as the longest, each attending to
  itself only (block-diagonal mask; the rpo and reward_model stages' batches; same log-probs and scores as padded,
  tested). On CPU TRL has no equivalent (its ``padding_free`` needs flash-attention). The output has both sides'
  tokens (``trl_padded_tokens_per_step``, ``thinkfast_padded_tokens_per_step``; reward:
  ``padded_tokens_per_step``, ``thinkfast_packed_tokens_per_step``).
- RLOO's objective: TRL's is sequence-level (summed log-probs per sequence, mean over sequences); thinkfast's is
  token-level (mean over all completion tokens). Same passes, different loss scaling.
- RLOO's truncated samples: thinkfast gives them no reward (out of the baseline) and leaves them out of the
  forward+backward; TRL (``mask_truncated_completions=True``) zeroes their mask but still runs and scores them.
  With the stop set above this concerns a few percent of the samples (both sides' shares are in the output).
- RLOO's sampled completions differ (each side's own random stream; the weights drift apart after the first
  update), so completion lengths differ from step to step: the output has both sides' mean completion tokens per
  step, and ``speedup_per_completion_token`` (seconds per sampled completion token over the timed steps) next
  to ``speedup``. A thinkfast step with no scorable group makes no update (``thinkfast_updates_per_step``).
- TRL-only work that no setting switches off: its learning-rate schedule (linear decay), and the per-step
  metrics it gathers (rewards, KL, entropies, clip ratios; DPO's logits, entropy and token accuracy; the reward
  model's min/mean/max and accuracy) kept in memory and never printed.
- Reward models: ``LlamaForSequenceClassification`` applies the score head at every position and reads the last
  non-pad one; thinkfast runs the decoder and applies the head at the last attended token only. Every sequence
  ends with the end-of-turn token (not the pad token), so both read the same position.

TRL is in the ``bench`` extra only: ``pip install -e ".[bench]"``. Writes benchmarks/results/trl_align_speed.json.

    python benchmarks/trl_align_speed.py --threads 2 --steps 10 --prompts 8 --group 4 --gen-tokens 96 --kl-beta 0.05 \\
        --pairs 8 --dpo-beta 0.1 --rm-pairs 8 --center-coef 0.01 --max-len 1024
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_speed import StepTimer, accuracy_reward, tiny_llama  # noqa: E402

import thinkfast  # noqa: E402
from thinkfast.evaluation import build_prompt  # noqa: E402
from thinkfast.generation import SamplingParams  # noqa: E402
from thinkfast.modeling.convert import convert_llama_model, decilm_config_from_llama  # noqa: E402
from thinkfast.nano import tasks  # noqa: E402
from thinkfast.nano.tokenizer import build_tokenizer  # noqa: E402
from thinkfast.rl.rewards import RewardRunner  # noqa: E402
from thinkfast.train.loop import adamw  # noqa: E402

BETAS = (0.9, 0.95)
NOTES = {
    "rloo": ["TRL's loss is sequence-level, thinkfast's token-level (same passes, different scaling)",
             "thinkfast leaves truncated samples out of the forward+backward; TRL masks them but runs them",
             "sampled completions (hence lengths) differ per side; mean completion tokens recorded for both",
             "thinkfast computes each prompt once per group in the training forwards; TRL once per row",
             "TRL's LR schedule and in-memory metrics cannot be switched off"],
    "dpo": ["TRL's collation runs outside its timed step; thinkfast's packed_pair_batch is inside its timed step",
            "thinkfast computes each prompt once per pair; TRL once per row",
            "TRL right-pads whole rows, thinkfast packs sequences without padding (tokens recorded for both)",
            "TRL's LR schedule and in-memory metrics cannot be switched off"],
    "reward": ["TRL's collation runs outside its timed step; thinkfast's tokenizing and batching are inside",
               "TRL's score head runs at every position, thinkfast's at the last attended token only",
               "TRL right-pads whole rows, thinkfast packs sequences without padding (tokens recorded for both)",
               "TRL's LR schedule and in-memory metrics cannot be switched off"],
}


def _trl_common(out: str, n_steps: int, lr: float) -> dict:
    """TrainingArguments every comparison shares: CPU, float32, no checkpointing/eval/logging, AdamW like
    thinkfast's, clipping 1.0, data in order."""
    return dict(output_dir=out, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                logging_steps=10_000, report_to="none", save_strategy="no", eval_strategy="no", max_steps=n_steps,
                learning_rate=lr, optim="adamw_torch", adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0,
                max_grad_norm=1.0, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                train_sampling_strategy="sequential")


def _median(times: list[float]) -> float:
    """Median after the warm-up step (``--steps 0``: the one step, warm-up included; for smoke tests)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def stop_ids(tok, extra: int) -> list[int]:
    """End-of-text, end-of-turn, then the first ``extra`` ids after the special tokens that are not digits (the
    reward counts digits). Both sides stop on these."""
    base = [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]
    rest = [i for i in range(max(base) + 1, len(tok)) if not tok.convert_ids_to_tokens(i).strip().isdigit()]
    return base + rest[:extra]


def preference_rows(problems) -> list[dict]:
    """Nano preference pairs in TRL's conversational format: the correct worked solution against the same
    solution with a wrong final answer."""
    rows = []
    for p in problems:
        right = tasks.chat_response(p, True)
        tail = tasks.format_answer(p.answer)
        assert right.endswith(tail)
        wrong = right[:-len(tail)] + tasks.format_answer(p.answer + 1)
        rows.append({"prompt": [{"role": "system", "content": "detailed thinking on"},
                                {"role": "user", "content": tasks.chat_prompt(p)}],
                     "chosen": [{"role": "assistant", "content": right}],
                     "rejected": [{"role": "assistant", "content": wrong}]})
    return rows


# ---------------------------------------------------------------------------------------------------- RLOO


def bench_rloo(a, tok, llama, problems, side: str = "both") -> dict:
    n_steps = a.steps + 1
    stops = stop_ids(tok, a.stop_extra)
    res = {"settings": {"prompts": a.prompts, "group": a.group, "samples_per_step": a.prompts * a.group,
                        "max_completion_tokens": a.gen_tokens, "kl_beta": a.kl_beta, "stop_token_ids": stops,
                        "temperature": 1.0, "top_p": 1.0, "updates_per_rollout": 1, "clip_eps": 0.2,
                        "lr": 1e-5, "steps_timed": a.steps, "warmup_steps": 1},
           "notes": NOTES["rloo"]}
    if side in ("both", "trl"):
        from datasets import Dataset
        from trl import RLOOConfig, RLOOTrainer

        rows = [{"prompt": [{"role": "system", "content": "detailed thinking on"},
                            {"role": "user", "content": tasks.chat_prompt(p)}], "answer": p.answer}
                for p in problems[:a.prompts * n_steps]]
        with tempfile.TemporaryDirectory() as out:
            # TRL builds its reference model from the policy's path (no ref_model argument): save the weights
            path = Path(out) / "tiny"
            m = copy.deepcopy(llama)
            m.generation_config.eos_token_id = stops
            m.generation_config.pad_token_id = tok.pad_token_id
            m.save_pretrained(path)
            args = RLOOConfig(**_trl_common(str(Path(out) / "run"), n_steps, 1e-5),
                              per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
                              max_completion_length=a.gen_tokens, temperature=1.0, top_p=1.0, top_k=0,
                              beta=a.kl_beta, epsilon=0.2, num_iterations=1, shuffle_dataset=False,
                              mask_truncated_completions=True, log_completions=False)
            timer = StepTimer()
            trainer = RLOOTrainer(model=str(path), reward_funcs=[accuracy_reward], args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
            assert sorted(trainer.eos_token_ids) == sorted(stops), trainer.eos_token_ids
            lengths, cut = [], []
            orig = trainer._generate

            def counting_generate(prompts):  # completion lengths and cut-off share, for the record
                ids = orig(prompts)
                lengths.append(statistics.fmean(len(c) for c in ids[1]))
                cut.append(statistics.fmean(not c or c[-1] not in stops for c in ids[1]))
                return ids

            trainer._generate = counting_generate
            trainer.train()
        res["trl_seconds_per_step"] = _median(timer.times)
        res["trl_step_times"] = timer.times
        res["trl_mean_completion_tokens"] = lengths
        res["trl_truncated_share"] = cut
    if side in ("both", "thinkfast"):
        from thinkfast.rl.rloo import rloo_step

        model = convert_llama_model(copy.deepcopy(llama)).float().train()
        reference = _frozen(convert_llama_model(copy.deepcopy(llama)).float()) if a.kl_beta > 0 else None
        opt = adamw(model, lr=1e-5, betas=BETAS)
        runner = RewardRunner([("accuracy", accuracy_reward, 1.0)])
        params = SamplingParams(max_new_tokens=a.gen_tokens, temperature=1.0, top_p=1.0,
                                stop_token_ids=tuple(stops), batch_size=a.prompts * a.group, seed=0)
        times, tokens, truncated, updates = [], [], [], []
        for s in range(n_steps):
            batch = problems[s * a.prompts:(s + 1) * a.prompts]
            prompts = [build_prompt(tok, p, "chat", "on") for p in batch]
            step_params = dataclasses.replace(params, seed=s)  # a fresh random stream each step, as TRL's
            t = time.perf_counter()
            rec, _ = rloo_step(model, opt, prompts, {"answer": [p.answer for p in batch]}, runner, step_params,
                               group_size=a.group, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                               pad_id=tok.pad_token_id, kl_beta=a.kl_beta, clip_eps=0.2, reference=reference,
                               grad_clip=1.0)
            times.append(time.perf_counter() - t)
            tokens.append(rec["response_tokens"])
            truncated.append(rec["truncated"])
            updates.append(rec["updates"])
        res["thinkfast_seconds_per_step"] = _median(times)
        res["thinkfast_step_times"] = times
        res["thinkfast_mean_completion_tokens"] = tokens
        res["thinkfast_truncated_share"] = truncated
        res["thinkfast_updates_per_step"] = updates
    if "trl_seconds_per_step" in res and "thinkfast_seconds_per_step" in res:
        # completions differ in length between the sides: seconds per sampled completion token over the timed steps
        timed = slice(1, None) if n_steps > 1 else slice(None)
        per_tok = {}
        for side_ in ("trl", "thinkfast"):
            secs = sum(res[f"{side_}_step_times"][timed])
            toks = sum(res[f"{side_}_mean_completion_tokens"][timed]) * a.prompts * a.group
            per_tok[side_] = secs / max(toks, 1e-9)
            res[f"{side_}_seconds_per_completion_token"] = per_tok[side_]
        res["speedup_per_completion_token"] = per_tok["trl"] / per_tok["thinkfast"]
    return _ratio(res)


# ---------------------------------------------------------------------------------------------------- DPO


def bench_dpo(a, tok, llama, problems, side: str = "both") -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    n_steps = a.steps + 1
    rows = preference_rows(problems[:a.pairs * n_steps])
    res = {"settings": {"pairs_per_step": a.pairs, "rows_per_step": 2 * a.pairs, "loss": "sigmoid (dpo)",
                        "beta": a.dpo_beta, "reference": "frozen copy, log-probs inside each step",
                        "max_length": a.max_len, "lr": 1e-6, "steps_timed": a.steps, "warmup_steps": 1},
           "notes": NOTES["dpo"]}
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(**_trl_common(out, n_steps, 1e-6), per_device_train_batch_size=a.pairs,
                         loss_type=["sigmoid"], beta=a.dpo_beta, precompute_ref_log_probs=False,
                         max_length=a.max_len)
        timer = StepTimer()
        trainer = DPOTrainer(model=copy.deepcopy(llama), ref_model=_frozen(copy.deepcopy(llama)), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
        data = trainer.train_dataset
        assert len(data) == len(rows), "TRL dropped examples: raise --max-len"
        ids = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in data]
        assert max(len(p) + max(len(c), len(r)) for p, c, r in ids) <= a.max_len, "raise --max-len"
        if side in ("both", "trl"):
            trainer.train()
            res["trl_seconds_per_step"] = _median(timer.times)
            res["trl_step_times"] = timer.times
    steps = [ids[s * a.pairs:(s + 1) * a.pairs] for s in range(n_steps)]
    res["tokens_per_step"] = [sum(len(p) * 2 + len(c) + len(r) for p, c, r in st) for st in steps]
    # TRL right-pads whole rows; thinkfast left-pads prompts and right-pads responses (never narrower)
    res["trl_padded_tokens_per_step"] = [2 * len(st) * max(len(p) + max(len(c), len(r)) for p, c, r in st)
                                         for st in steps]
    # thinkfast packs the 2P sequences without padding into rows as long as the longest (the rpo stage's batches)
    from thinkfast.rl.rpo import packed_pair_batch as _packed

    res["thinkfast_padded_tokens_per_step"] = [
        int(_packed([p for p, _, _ in st], [c for _, c, _ in st], [r for _, _, r in st])["input_ids"].numel())
        for st in steps]
    if side in ("both", "thinkfast"):
        from thinkfast.rl.rpo import packed_pair_batch, preference_step, sequence_logps

        model = convert_llama_model(copy.deepcopy(llama)).float().train()
        reference = _frozen(convert_llama_model(copy.deepcopy(llama)).float())
        opt = adamw(model, lr=1e-6, betas=BETAS)
        device = next(model.parameters()).device
        times = []
        for st in steps:
            prompts, chosen, rejected = (list(map(list, x)) for x in zip(*st))
            t = time.perf_counter()
            batch = packed_pair_batch(prompts, chosen, rejected, tok.pad_token_id, device)
            with torch.no_grad():
                ref_c, ref_r = sequence_logps(reference, batch)
            preference_step(model, opt, batch, kind="dpo", beta=a.dpo_beta, ref_chosen=ref_c, ref_rejected=ref_r,
                            grad_clip=1.0)
            times.append(time.perf_counter() - t)
        res["thinkfast_seconds_per_step"] = _median(times)
        res["thinkfast_step_times"] = times
    return _ratio(res)


# ---------------------------------------------------------------------------------------------------- reward model


def reward_models(tok, llama):
    """The same weights as a Llama and a nemotron-nas sequence classifier (num_labels=1, one score head)."""
    from transformers import LlamaForSequenceClassification

    from thinkfast.modeling.modeling_decilm import DeciLMForSequenceClassification

    cfg = copy.deepcopy(llama.config)
    cfg.num_labels = 1
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(1)
    hf = LlamaForSequenceClassification(cfg).float()
    state = {k: v for k, v in llama.state_dict().items() if k.startswith("model.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"score.weight"}, (missing, unexpected)
    dcfg = decilm_config_from_llama(cfg.to_dict())
    dcfg.num_labels = 1
    dcfg.pad_token_id = tok.pad_token_id
    ours = DeciLMForSequenceClassification(dcfg).float()
    missing, unexpected = ours.load_state_dict({k: v for k, v in hf.state_dict().items() if "rotary_emb" not in k},
                                               strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf, ours


def bench_reward(a, tok, llama, problems, side: str = "both") -> dict:
    from thinkfast.rl.reward_model import Pair, encode_pairs

    n_steps = a.steps + 1
    rows = preference_rows(problems[:a.rm_pairs * n_steps])
    pairs = [Pair(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    res = {"settings": {"pairs_per_step": a.rm_pairs, "rows_per_step": 2 * a.rm_pairs, "num_labels": 1,
                        "center_coef": a.center_coef, "max_length": a.max_len, "lr": 1e-5,
                        "steps_timed": a.steps, "warmup_steps": 1},
           "notes": NOTES["reward"]}
    hf, ours = reward_models(tok, llama)
    steps = [pairs[s * a.rm_pairs:(s + 1) * a.rm_pairs] for s in range(n_steps)]
    # the token ids both sides train on: thinkfast's encoding of each step's pairs, given to TRL pre-tokenized
    encoded = [encode_pairs(tok, st, a.max_len) for st in steps]
    id_rows = []
    for b in encoded:
        ids, att = b["input_ids"], b["attention_mask"]
        n = ids.shape[0] // 2
        rows_ids = [ids[i][att[i].bool()].tolist() for i in range(ids.shape[0])]
        id_rows += [{"chosen_ids": rows_ids[i], "rejected_ids": rows_ids[n + i]} for i in range(n)]
    res["tokens_per_step"] = [int(b["attention_mask"].sum()) for b in encoded]
    res["padded_tokens_per_step"] = [int(b["input_ids"].numel()) for b in encoded]
    res["thinkfast_packed_tokens_per_step"] = [int(encode_pairs(tok, st, a.max_len, packed=True)["input_ids"].numel())
                                               for st in steps]
    if side in ("both", "trl"):
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        with tempfile.TemporaryDirectory() as out:
            args = RewardConfig(**_trl_common(out, n_steps, 1e-5), per_device_train_batch_size=a.rm_pairs,
                                center_rewards_coefficient=a.center_coef or None, max_length=a.max_len)
            timer = StepTimer()
            trainer = RewardTrainer(model=copy.deepcopy(hf), args=args, train_dataset=Dataset.from_list(id_rows),
                                    processing_class=tok, callbacks=[timer])
            assert len(trainer.train_dataset) == len(id_rows), "TRL dropped examples: raise --max-len"
            trainer.train()
        res["trl_seconds_per_step"] = _median(timer.times)
        res["trl_step_times"] = timer.times
    if side in ("both", "thinkfast"):
        from thinkfast.rl.reward_model import reward_model_step

        model = copy.deepcopy(ours).train()
        opt = adamw(model, lr=1e-5, betas=BETAS)
        times = []
        for st in steps:
            t = time.perf_counter()
            batch = encode_pairs(tok, st, a.max_len, packed=True)
            reward_model_step(model, opt, batch, center_coef=a.center_coef, grad_clip=1.0)
            times.append(time.perf_counter() - t)
        res["thinkfast_seconds_per_step"] = _median(times)
        res["thinkfast_step_times"] = times
    return _ratio(res)


# ---------------------------------------------------------------------------------------------------- main


def _ratio(res: dict) -> dict:
    if "trl_seconds_per_step" in res and "thinkfast_seconds_per_step" in res:
        res["speedup"] = res["trl_seconds_per_step"] / res["thinkfast_seconds_per_step"]
    return res


def machine() -> dict:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"processor": platform.processor() or platform.machine(), "cpu_model": model,
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


BENCHES = {"rloo": bench_rloo, "dpo": bench_dpo, "reward": bench_reward}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--prompts", type=int, default=8, help="RLOO: prompts per step")
    ap.add_argument("--group", type=int, default=4, help="RLOO: samples per prompt (num_generations, k)")
    ap.add_argument("--gen-tokens", type=int, default=96, help="RLOO: max completion tokens")
    ap.add_argument("--kl-beta", type=float, default=0.05, help="RLOO: KL coefficient (TRL's default 0.05)")
    ap.add_argument("--stop-extra", type=int, default=20, help="RLOO: stop tokens beyond end-of-text/turn")
    ap.add_argument("--pairs", type=int, default=8, help="DPO: pairs per step")
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--rm-pairs", type=int, default=8, help="reward model: pairs per step")
    ap.add_argument("--center-coef", type=float, default=0.01, help="reward model: center_rewards_coefficient")
    ap.add_argument("--max-len", type=int, default=1024, help="DPO / reward model: max sequence length")
    ap.add_argument("--only", choices=list(BENCHES), action="append", help="run only these comparisons")
    ap.add_argument("--side", choices=["both", "trl", "thinkfast"], default="both")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trl_align_speed.json"))
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    import transformers
    import trl

    tok = build_tokenizer()
    llama = tiny_llama(tok).float()
    n = max(a.prompts, a.pairs, a.rm_pairs) * (a.steps + 1)
    problems = tasks.make_problems(n, seed=0, kinds=tasks.KINDS, digits=(1, 2))
    out = {"params": sum(p.numel() for p in llama.parameters()), "dtype": "float32",
           "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
           "thinkfast": thinkfast.__version__, "machine": machine(), "args": vars(a)}
    for name in a.only or list(BENCHES):
        out[name] = BENCHES[name](a, tok, llama, problems, a.side)
        print(name, json.dumps({k: v for k, v in out[name].items() if "times" not in k and k != "notes"}),
              flush=True)
    out["machine"]["torch_threads_after"] = torch.get_num_threads()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
