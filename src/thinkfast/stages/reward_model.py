"""Stage ``reward_model``: a Bradley-Terry reward model on the policy's architecture, for the alignment stages.

Paper: Llama-Nemotron (arXiv 2505.00949) section 6 (REFERENCE.md section 6): online RPO scores the policy's fresh
responses with a reward model (there a 70B one trained on HelpSteer2 preferences) and pairs them by score. Here
the reward model starts from the policy itself (``model``: the latest model of the run) with a scalar head
(``score``, :func:`thinkfast.rl.reward_model.reward_model_from_policy`), is trained with the Bradley-Terry loss,
optionally with per-pair margins (Llama 2, arXiv 2307.09288, section 3.2.2) and TRL's centring term
(``center_coef``; TRL's ``center_rewards_coefficient``, arXiv 2312.09244), and is read at the last attended token
of each sequence (never at a pad: the nano tokenizer's pad is its eos, the trap of transformers#35352).

Output: ``reward_model/`` (a new output kind, :data:`thinkfast.artifacts.OUTPUTS`: no later stage takes it for
"the latest model"), a ``save_pretrained`` folder that ``AutoModelForSequenceClassification`` loads (with
``trust_remote_code=True`` where thinkfast is not installed), with the tokenizer files and a sidecar
(``made_by: reward_model``). Any reward list takes it as ``reward_model:RUN_DIR/reward_model``
(:mod:`thinkfast.rl.rewards`).

Pairs: your own JSON lines (``pairs``; :func:`thinkfast.rl.reward_model.read_pairs`: prompt + chosen + rejected
(+ margin), or prompt + responses + scores), or, with none, the nano world's: ``prompts`` nano instruction-
following prompts (a nano problem with 1-3 IFEval instructions, both toggle modes), ``samples`` responses of the
policy to each (temperature 1) plus the teacher's compliant response, each graded (nano verifier, toggle format,
IFEval strict) and ranked by the documented rule (:func:`thinkfast.rl.reward_model.nano_rank_key`: correct beats
wrong; among equally correct, obeying the toggle and every instruction beats not; then shorter beats longer);
with ``prompt_files`` (your own prompts, e.g. ``thinkfast gsm8k``'s ``if.jsonl``), the policy's ``samples`` to each
ranked by the same rule with the file's checks (the math check on a ``solution``, IFEval's on the instructions a row
names; no teacher response); every two candidates of different rank make a pair, tagged with the rule that ranked it (``correct``,
``obeyed``, ``shorter``: held-out accuracy is reported per rule too). The nano pairs are saved to ``pairs.jsonl``
(in the schema ``pairs`` reads) and reused by a resumed run.

``held_out`` pairs (a share of the pairs, or a count), whole prompts at a time so that no held-out prompt is
trained on, measure held-out pair accuracy before training, every ``eval_every`` steps and at the end
(``curve.json``). Training is resumable (:class:`thinkfast.train.loop.TrainLoop`): batches come from seeded
per-epoch shuffles, so a resumed run trains on what an uninterrupted one would have. Pairs longer than
``max_len`` tokens are dropped (counted), never cut: the score is read at the response's end. A batch's sequences
are packed without padding, each attending to itself only (the same scores on fewer tokens).

Departures: the paper's reward model is a separate, much larger model trained on human preferences (HelpSteer2);
here it is the policy's own size and the nano preferences come from verifiers, so it learns what the verifiers
check (plus the length rule), which makes it a check on the pipeline more than a source of new signal.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import Curve, OUTPUTS, copy_tokenizer_files, read_model_sidecar, write_curve, write_model_sidecar
from ..data import DataError
from ..rundir import StageDir, atomic_dir
from ..runtime import autocast, resolve_precision, setup_device
from ..train.loop import TrainLoop, adamw, warmup_cosine
from ..train.settings import CadenceFields, OptimizerFields
from . import Input, Inputs, check_device, check_nano_mix, positive

MAKES = "reward_model"


def reads(cfg) -> dict:
    return {"model": Input("model")}


def files(cfg) -> list[tuple[str, list[str]]]:
    """The pair files and the prompt files (identified by content: a changed file makes the stage stale)."""
    return [("pairs", list(cfg.pairs)), ("prompt_files", list(cfg.prompt_files))]


@dataclass
class RewardModelConfig(OptimizerFields, CadenceFields):
    """The optimizer (``lr`` ... ``precision``) and cadence fields are :mod:`thinkfast.train.settings`'s."""

    pairs: list[str] = field(default_factory=list)  # JSON lines of pairs (thinkfast.rl.reward_model); none: nano
    # or prompts of your own (thinkfast.rl.prompts' schema; IFEval's instruction_id_list / kwargs and a "solution"
    # for the math check when present): the policy's samples ranked as the nano ones are; none: nano prompts
    prompt_files: list[str] = field(default_factory=list)
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping at the first
    # the nano world's pairs: prompts x (samples of the policy + the teacher's response), ranked
    prompts: int = 128
    samples: int = 4  # policy responses per prompt (the teacher's compliant one is added)
    kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "word"])
    digits: list[int] = field(default_factory=lambda: [1, 2])
    steps: list[int] = field(default_factory=lambda: [1, 2])
    instructions: list[int] = field(default_factory=lambda: [1, 3])  # instructions per prompt: min, max
    thinking: Literal["on", "off", "both"] = "both"
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    rollout_batch_size: int = 64  # sequences per generation batch
    # training
    held_out: float = 0.1  # share of the pairs (< 1) or a count (>= 1), whole prompts at a time
    train_steps: int | None = None  # none: ``epochs`` over the training pairs
    epochs: float = 2.0
    batch_size: int = 16  # pairs per step (2 x batch_size sequences)
    max_len: int = 1024  # longer pairs are dropped, not cut
    lr: float = 1e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    margin: bool = False  # use the pairs' margins (-logsigmoid(r_c - r_l - margin)); nano pairs have none
    center_coef: float = 0.01  # TRL's center_rewards_coefficient (its docs suggest 0.01); 0: off
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    eval_every: int = 50  # held-out pair accuracy every this many steps (and before and after)
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        super().__post_init__()  # optimizer and cadence fields
        if isinstance(self.pairs, str):
            self.pairs = [self.pairs]
        if isinstance(self.prompt_files, str):
            self.prompt_files = [self.prompt_files]
        if self.pairs and self.prompt_files:
            raise ValueError("give pairs (ranked already) or prompt_files (sampled and ranked here), not both")
        positive(self, "prompts", "samples", "max_new_tokens", "rollout_batch_size", "train_steps", "batch_size",
                 "max_len", "eval_every")
        for name in ("temperature", "epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.center_coef >= 0:
            raise ValueError(f"center_coef={self.center_coef} must be >= 0")
        if not (0 < self.held_out < 1 or (self.held_out >= 1 and float(self.held_out).is_integer())):
            raise ValueError(f"held_out={self.held_out} must be a share in (0, 1) or a whole count >= 1")
        check_nano_mix(self, instructions=True)


Config = RewardModelConfig


# ------------------------------------------------------------------------------------------ nano pairs


def _sample(cfg: RewardModelConfig, model_dir, tokenizer, device, ids: list, what: str):
    """``cfg.samples`` responses of the policy to each prompt (temperature ``cfg.temperature``), as a rollout."""
    from ..artifacts import load_decilm
    from ..generation import LocalBackend, SamplingParams
    from ..rl.rollout import rollout
    from ..toggle import stop_token_ids

    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)), batch_size=cfg.rollout_batch_size,
                            seed=cfg.seed)
    print(f"reward_model: sampling {cfg.samples} responses to each of {len(ids)} {what}")
    return rollout(LocalBackend(load_decilm(model_dir, device)), ids, cfg.samples, params, progress=True)


def nano_world_pairs(cfg: RewardModelConfig, model_dir, tokenizer, device) -> tuple[list, dict]:
    """The nano world's pairs (module docstring) and what was sampled: (pairs, stats)."""
    from ..evaluation import decoded
    from ..rl.prompts import nano_if_prompts
    from ..rl.reward_model import nano_pairs, nano_rank_key
    from ..tasks.ifeval import ifeval_strict
    from ..tasks.instructions import if_response
    from ..tasks.nano import nano_accuracy
    from ..tasks.think_format import think_format

    ids, cols, items = nano_if_prompts(tokenizer, cfg.prompts, seed=cfg.seed, kinds=cfg.kinds, digits=cfg.digits,
                                       steps=cfg.steps, instructions=cfg.instructions, thinking=cfg.thinking)
    roll = _sample(cfg, model_dir, tokenizer, device, ids, "nano instruction prompts")
    k = cfg.samples
    pairs, stats = [], {"correct": [], "obeyed": [], "teacher_best": 0}
    for g, item in enumerate(items):
        comps = roll.completions[g * k:(g + 1) * k]
        texts = [decoded(tokenizer, c) for c in comps] + [if_response(item)]
        lengths = [len(c.token_ids) for c in comps] + [len(tokenizer.encode(texts[-1], add_special_tokens=False)) + 1]
        finished = [c.finish_reason == "stop" for c in comps] + [True]
        n = len(texts)
        correct = nano_accuracy(texts, [cols["answer"][g]] * n)
        toggle = think_format(texts, [item.thinking] * n)
        follows = ifeval_strict(texts, [cols["instruction_id_list"][g]] * n, [cols["kwargs"][g]] * n,
                                prompts=[cols["prompts"][g]] * n)
        keys = [nano_rank_key(bool(c) and f, bool(t) and bool(i) and f, n_tok)
                for c, t, i, f, n_tok in zip(correct, toggle, follows, finished, lengths)]
        stats["correct"] += [key[0] for key in keys[:k]]
        stats["obeyed"] += [key[1] for key in keys[:k]]
        stats["teacher_best"] += keys[-1] >= max(keys)
        pairs += nano_pairs(cols["prompts"][g], texts, keys, thinking=item.thinking, source=f"nano:{g}")
    return pairs, {"prompts": len(items), "samples": len(roll.completions),
                   "sample_correct": statistics.fmean(stats["correct"]) if stats["correct"] else None,
                   "sample_obeyed": statistics.fmean(stats["obeyed"]) if stats["obeyed"] else None,
                   "teacher_ranked_first": stats["teacher_best"] / max(1, len(items))}


def file_prompt_pairs(cfg: RewardModelConfig, model_dir, tokenizer, device) -> tuple[list, dict]:
    """Pairs of ``samples`` policy responses to each of the first ``prompts`` rows of ``prompt_files``, ranked by
    the nano rule with the file's checks: correct (the math check, when the row has a ``solution``; else every
    response counts as correct), obeying the toggle and every IFEval instruction the row names, then shorter.
    No teacher response (a file has none). (pairs, stats)."""
    from ..evaluation import decoded
    from ..rl.prompts import file_prompts
    from ..rl.reward_model import nano_pairs, nano_rank_key
    from ..tasks.ifeval import ifeval_strict
    from ..tasks.math import math_accuracy
    from ..tasks.think_format import think_format

    ids, cols, _, _, _ = file_prompts(tokenizer, cfg.prompt_files, held_out=0, seed=cfg.seed, thinking=cfg.thinking,
                                      skip_bad=cfg.skip_bad_rows, stage="reward_model", key="prompt_files")
    ids, cols = ids[:cfg.prompts], {k: v[:cfg.prompts] for k, v in cols.items()}
    roll = _sample(cfg, model_dir, tokenizer, device, ids, f"prompts of {cfg.prompt_files}")
    k = cfg.samples
    pairs, stats = [], {"correct": [], "obeyed": []}
    for g in range(len(ids)):
        comps = roll.completions[g * k:(g + 1) * k]
        texts = [decoded(tokenizer, c) for c in comps]
        finished = [c.finish_reason == "stop" for c in comps]
        thinking = cols["thinking"][g]
        solution = (cols.get("solution") or [None] * len(ids))[g]
        correct = (math_accuracy(texts, [solution] * k) if solution is not None else [1.0] * k)
        toggle = think_format(texts, [thinking] * k)
        iids = (cols.get("instruction_id_list") or [None] * len(ids))[g]
        follows = (ifeval_strict(texts, [iids] * k, [cols["kwargs"][g]] * k, prompts=[cols["prompts"][g]] * k)
                   if iids else [1.0] * k)
        keys = [nano_rank_key(bool(c) and f, bool(t) and bool(i) and f, len(comp.token_ids))
                for c, t, i, f, comp in zip(correct, toggle, follows, finished, comps)]
        stats["correct"] += [key[0] for key in keys]
        stats["obeyed"] += [key[1] for key in keys]
        pairs += nano_pairs(cols["prompts"][g], texts, keys, thinking=thinking, source=f"file:{g}")
    return pairs, {"prompts": len(ids), "samples": len(roll.completions),
                   "sample_correct": statistics.fmean(stats["correct"]) if stats["correct"] else None,
                   "sample_obeyed": statistics.fmean(stats["obeyed"]) if stats["obeyed"] else None}


def split_held_out(pairs: list, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) pair indices: whole prompts go to the held-out side, in a seeded order, until it holds
    ``held_out`` (a share < 1, or a count) of the pairs; at least one pair stays on each side."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(json.dumps([p.prompt, p.thinking], sort_keys=True), []).append(i)
    keys = sorted(groups)
    random.Random(f"reward_model-held-out:{seed}").shuffle(keys)
    want = math.ceil(held_out * len(pairs)) if held_out < 1 else int(held_out)
    held: list[int] = []
    for key in keys:
        if len(held) >= want:
            break
        held += groups[key]
    train = sorted(set(range(len(pairs))) - set(held))
    if not held or not train:
        raise DataError(f"reward_model: {len(pairs)} pairs of {len(groups)} prompts cannot be split into training "
                        f"and held_out={held_out} pairs (need two prompts at least)")
    return train, sorted(held)


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Each step's indices into ``n`` training pairs: per-epoch seeded shuffles, concatenated, cut in batches."""
    flat: list[int] = []
    epoch = 0
    while len(flat) < steps * batch_size:
        order = list(range(n))
        random.Random(f"reward_model-order:{seed}:{epoch}").shuffle(order)
        flat += order
        epoch += 1
    return [flat[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


# ------------------------------------------------------------------------------------------ the stage


def run(cfg: RewardModelConfig, stage: StageDir, inputs: Inputs) -> dict:
    import torch
    from transformers import AutoTokenizer

    from ..rl.reward_model import (collate_pairs, pair_accuracy, pair_row, read_pairs, response_ids,
                                   reward_model_from_policy, reward_model_step)

    model_dir = inputs["model"]
    sidecar = read_model_sidecar(model_dir)
    device = setup_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    log = stage.logger()
    pairs_file = stage.path / "pairs.jsonl"
    sampled: dict = {}
    if cfg.pairs:
        pairs = read_pairs(cfg.pairs, skip_bad=cfg.skip_bad_rows)
    elif pairs_file.is_file():  # a resumed run: the pairs it sampled before
        pairs = read_pairs([str(pairs_file)])
    else:
        if sidecar.get("prompting") == "text":
            raise ValueError(f"{model_dir} was not taught the chat template's toggle (prompting: text): put sft "
                             "before reward_model, or give pairs files")
        make = file_prompt_pairs if cfg.prompt_files else nano_world_pairs
        pairs, sampled = make(cfg, model_dir, tokenizer, device)
        tmp = pairs_file.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(pair_row(p)) + "\n" for p in pairs))
        tmp.replace(pairs_file)
        log.log("nano_pairs", pairs=len(pairs), **sampled)
    if not pairs:
        raise DataError("reward_model: no pairs (every candidate of every prompt ranked equal?)")

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs = [(response_ids(tokenizer, p.prompt, p.chosen, p.thinking),
             response_ids(tokenizer, p.prompt, p.rejected, p.thinking)) for p in pairs]
    fits = [i for i, (c, r) in enumerate(seqs) if max(len(c), len(r)) <= cfg.max_len]
    dropped = len(pairs) - len(fits)
    if dropped:
        print(f"reward_model: dropped {dropped} of {len(pairs)} pairs longer than max_len={cfg.max_len} tokens")
    pairs, seqs = [pairs[i] for i in fits], [seqs[i] for i in fits]
    train, held = split_held_out(pairs, cfg.held_out, cfg.seed)
    steps = cfg.train_steps or max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))

    def batch(idx: list[int]) -> dict:
        return collate_pairs([seqs[i][0] for i in idx], [seqs[i][1] for i in idx], pad,
                             [pairs[i].margin for i in idx] if cfg.margin else None, packed=True)

    rules = sorted({pairs[i].rule for i in held})  # nano pairs: which rule ranked them (correct, obeyed, shorter)
    held_batches = {}
    for rule in rules:
        idx = [i for i in held if pairs[i].rule == rule]
        held_batches[rule] = [batch(idx[i:i + 2 * cfg.batch_size]) for i in range(0, len(idx), 2 * cfg.batch_size)]
    order = batch_order(len(train), cfg.batch_size, steps, cfg.seed)

    torch.manual_seed(cfg.seed)  # the score head's initialisation
    model = reward_model_from_policy(model_dir, pad_token_id=pad).to(device)
    model.requires_grad_(True)
    opt = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[dict] = []
    steps_log: list[dict] = []

    def load(state):
        model.load_state_dict(state["model"])
        curve[:] = state["curve"]
        steps_log[:] = state["steps"]

    loop = TrainLoop(stage, "reward_model", steps, opt, log=log, device=device,
                     schedule=lambda s: warmup_cosine(s, lr=cfg.lr, total=steps, warmup=cfg.warmup_steps,
                                                      min_ratio=cfg.min_lr_ratio),
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, load=load,
                     save=lambda: {"model": model.state_dict(), "curve": list(curve), "steps": list(steps_log)})

    def point(step: int) -> None:
        parts = {rule: pair_accuracy(model, b, center_coef=cfg.center_coef) for rule, b in held_batches.items()}
        n = sum(r["pairs"] for r in parts.values())
        result = {k: sum(r[k] * r["pairs"] for r in parts.values()) / n for k in ("accuracy", "loss", "gap")}
        result["pairs"] = n
        record = {"step": step, "held_out": result}
        if any(parts):  # per ranking rule (nano pairs)
            record["by_rule"] = {rule: r for rule, r in parts.items() if rule}
        curve.append(record)
        log.log("eval", step=step, **{f"held_out_{k}": v for k, v in result.items()},
                **({"by_rule": record["by_rule"]} if "by_rule" in record else {}))

    print(f"reward_model: {model_dir} -> a {type(model).__name__}, {len(train)} training pairs, {len(held)} held "
          f"out, {steps} steps of {cfg.batch_size} pairs")
    if loop.start == 0 and not curve:
        point(0)
    for step in loop:
        try:
            record = reward_model_step(model, opt, batch([train[i] for i in order[step]]),
                                       center_coef=cfg.center_coef, grad_clip=cfg.grad_clip,
                                       autocast_ctx=lambda: autocast(device, precision))
        except FloatingPointError as e:
            raise FloatingPointError(
                f"reward_model: {e} at step {step + 1}; stopped without saving: the last good checkpoint "
                f"({stage.checkpoint_dir}) is kept. Lower lr.") from None
        steps_log.append({"step": step + 1, **record})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            point(step + 1)
        loop.end_step(step, **{k: v for k, v in record.items() if k != "loss"}, loss=record["loss"])
    loop.close()
    model.eval()
    with atomic_dir(stage.path / OUTPUTS["reward_model"]) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(model_dir, tmp)
        write_model_sidecar(tmp, prompting="chat", made_by="reward_model",
                            **{k: sidecar[k] for k in ("engine",) if k in sidecar})
    plot = [{"label": "held-out pair accuracy", "y": "held_out.accuracy"},
            {"label": "pair accuracy (training batch)", "y": "accuracy", "of": "steps"}]
    write_curve(stage.path, Curve(points=curve, steps=steps_log, plot=plot))
    metrics = {"pairs": len(pairs), "train_pairs": len(train), "held_out_pairs": len(held), "dropped_long": dropped,
               "steps": steps, "model_class": type(model).__name__, "seconds": round(loop.seconds, 1),
               "held_out_accuracy_before": curve[0]["held_out"]["accuracy"],
               "held_out_accuracy_after": curve[-1]["held_out"]["accuracy"],
               "held_out_loss_before": curve[0]["held_out"]["loss"],
               "held_out_loss_after": curve[-1]["held_out"]["loss"],
               "loss_last": statistics.fmean(s["loss"] for s in steps_log[-5:]) if steps_log else None}
    if "by_rule" in curve[-1]:  # nano pairs: held-out accuracy per ranking rule, before and after
        metrics["held_out_by_rule"] = {
            rule: {"pairs": r["pairs"], "accuracy_before": curve[0]["by_rule"][rule]["accuracy"],
                   "accuracy_after": r["accuracy"]} for rule, r in curve[-1]["by_rule"].items()}
    if sampled:
        metrics["nano"] = sampled
    log.log("done", **metrics)
    log.close()
    return metrics
