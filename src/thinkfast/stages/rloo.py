"""Stage ``rloo``: instruction following with RLOO and IFEval's verifiers, on the latest model of the run.

Paper: Llama-Nemotron (arXiv 2505.00949) section 6; REFERENCE.md section 6: RLOO with instruction-following
verifiers before the online RPO rounds. Each step takes ``prompts_per_step`` prompts, samples ``group_size``
(default 4, NeMo-Aligner's k) completions of each with the rollout engine, scores them with the rewards
(by default IFEval's checkers, all or nothing, on the answer after the think block, plus the task's accuracy and
the toggle's format, so following instructions is never bought with wrong answers or a broken toggle), and takes
``updates_per_rollout`` gradient steps on the token-level REINFORCE objective with a leave-one-out baseline
(:mod:`thinkfast.rl.rloo`: truncated and unscorable samples leave the baseline and get no gradient; the KL to the
starting model, ``kl_beta``, is folded into each sample's reward, summed over its tokens; ``clip_eps`` turns on
PPO's clipping).

Prompts: the nano world's instruction prompts (:func:`thinkfast.tasks.instructions.nano_if_items`: a nano problem
with 1-3 of IFEval's instructions that make sense on it, in both toggle modes), or your own JSON lines in
IFEval's schema (``prompt``, ``instruction_id_list``, ``kwargs``; ``thinkfast ifgen`` makes them from any prompt
file), every row checked against the checker registry before any work (an unknown id or bad kwargs is an error
naming file and line); with ``math_per_step``, plain nano math prompts join every step, scored by accuracy and
format alone, a sample pushed up only when it passes them. The periodic check: held-out nano instruction prompts,
greedy, each in both modes (:func:`thinkfast.evaluation.if_check`: instruction-following strict accuracy, task
accuracy, toggle format), or, with files, the greedy pass rate of held-out rows.

Logged every step like GRPO (reward, each reward's mean, pass rate, KL, length, format compliance, reward errors)
plus the pass rate of each instruction id (``instructions``). Resumable; a NaN loss stops the run keeping the last
checkpoint; a reward failing for ``max_failing_steps`` steps stops it (:mod:`thinkfast.rl.watch`).

Departures: the paper's 128 prompts per batch, up to 120 steps and 1-10 instructions per prompt are scaled to the
nano world (1-3 instructions of the types an arithmetic answer can follow); task accuracy and the toggle's format
are rewarded beside the instructions.
"""

from __future__ import annotations

import copy
import random
import statistics
from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import Curve, load_decilm, write_curve
from ..data import DataError
from ..evaluation import if_check
from ..generation import LocalBackend, SamplingParams
from ..rl.pass_rates import held_out_check
from ..rl.prompts import file_prompts, nano_if_prompts, nano_prompts
from ..rl.rewards import BUILTIN, RewardRunner, load_reward, missing_columns, missing_columns_message
from ..rl.rloo import rloo_step
from ..rl.watch import RewardWatch
from ..rundir import StageDir
from ..runtime import autocast, resolve_precision, setup_device
from ..tasks import ifeval
from ..toggle import stop_token_ids
from ..train.loop import TrainLoop, adamw, warmup_cosine
from ..train.settings import CadenceFields, OptimizerFields, PeriodicEvalFields, RolloutSampling
from . import Input, Inputs, check_device, check_nano_mix, positive, require_chat, save_chat_model

MAKES = "model"


def reads(cfg) -> dict:
    return {"model": Input("model")}


def files(cfg) -> tuple[str, list[str]]:
    """The prompt files (identified by content: a changed file makes the stage stale)."""
    return "files", list(cfg.files)


@dataclass
class RLOOConfig(RolloutSampling, OptimizerFields, PeriodicEvalFields, CadenceFields):
    """The rollout sampling, optimizer, periodic evaluation and cadence fields are
    :mod:`thinkfast.train.settings`'s."""

    prompts: int = 512  # nano instruction prompts (train split)
    files: list[str] = field(default_factory=list)  # JSON lines in IFEval's schema; none: the nano world
    skip_bad_rows: bool = False
    kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "word"])
    digits: list[int] = field(default_factory=lambda: [1, 2])
    steps: list[int] = field(default_factory=lambda: [2])
    instructions: list[int] = field(default_factory=lambda: [1, 3])  # instructions per prompt: [min, max]
    thinking: Literal["on", "off", "both"] = "both"
    # plain task prompts (no instructions) beside each step's instruction prompts: math_per_step of a pool of
    # math_prompts nano problems of kinds x math_digits x math_steps, both modes alternating, each worded by one of
    # toggle SFT's training templates (never the held-out ones). Only the task's accuracy and the toggle's format
    # score them (the IFEval rewards leave a prompt without instructions unscored), and in their groups only a
    # sample that passes (correct, well formed) may be pushed up. Meant to keep the toggle's format on every
    # difficulty while RLOO trains on instruction prompts; in the nano world 8 a step made it worse (docs/LOG.md
    # session 18), so it is off there (nano world only; 0: none)
    math_per_step: int = 0
    math_prompts: int = 512
    math_digits: list[int] = field(default_factory=lambda: [1, 2, 3])
    math_steps: list[int] = field(default_factory=lambda: [1, 2, 3])
    rewards: list[str] = field(default_factory=lambda: ["ifeval_strict", "nano_accuracy", "think_format"])
    reward_weights: list[float] | None = None
    pass_reward: str | None = None  # default: the first reward
    reward_timeout: float = 30.0
    max_failing_steps: int | None = 3
    group_size: int = 4
    prompts_per_step: int = 8
    train_steps: int = 40
    updates_per_rollout: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    clip_eps: float | None = None  # PPO clipping of the ratio (matters with updates_per_rollout > 1)
    kl_beta: float = 0.01  # KL to the starting model, folded into the reward (NeMo-Aligner's 0.01)
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    max_new_tokens: int = 600
    eval_every: int = 20
    eval_problems: int = 100
    seed: int = 0
    checkpoint_every: int = 10
    log_every: int = 1
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        super().__post_init__()
        positive(self, "prompts", "group_size", "prompts_per_step", "train_steps", "updates_per_rollout")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2: the leave-one-out baseline needs a sibling")
        if isinstance(self.files, str):
            self.files = [self.files]
        if not self.rewards:
            raise ValueError("rewards is empty: name at least one (ifeval_strict, ifeval_share, nano_accuracy, ...)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} rewards")
        for r in self.rewards:
            if r not in BUILTIN and ":" not in r:
                raise ValueError(f"rewards: {r!r} is neither built in ({sorted(BUILTIN)}) nor module:function")
        if self.pass_reward is not None and self.pass_reward not in self.rewards:
            raise ValueError(f"pass_reward {self.pass_reward!r} is not one of rewards {self.rewards}")
        if self.max_failing_steps is not None and self.max_failing_steps < 0:
            raise ValueError(f"max_failing_steps={self.max_failing_steps} must be >= 0")
        if self.updates_per_rollout > self.prompts_per_step:
            raise ValueError("updates_per_rollout slices the step's groups: it must be <= prompts_per_step")
        if self.clip_eps is not None and not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps={self.clip_eps} must be in (0, 1) or null")
        if not self.kl_beta >= 0:
            raise ValueError(f"kl_beta={self.kl_beta} must be >= 0")
        if not self.reward_timeout > 0:
            raise ValueError(f"reward_timeout={self.reward_timeout} must be > 0")
        check_nano_mix(self, instructions=True)
        if self.math_per_step < 0:
            raise ValueError(f"math_per_step={self.math_per_step} must be >= 0")
        if self.math_per_step:
            positive(self, "math_prompts")
            if self.files:
                raise ValueError("math_per_step adds nano math prompts: it needs the nano world (files: []); "
                                 "with prompt files set math_per_step: 0")
            if not self.math_digits or not self.math_steps:
                raise ValueError("math_digits and math_steps must be non-empty when math_per_step > 0")
            if all(r.startswith("ifeval_") for r in self.rewards):
                raise ValueError(f"math_per_step: the IFEval rewards {self.rewards} leave a prompt without "
                                 "instructions unscored; add nano_accuracy and think_format to rewards")


Config = RLOOConfig


def _instruction_rates(texts: list[str], columns: dict, groups: list[int]) -> dict[str, float]:
    """Per instruction id: the share of the step's samples whose answer after the think block follows it."""
    from ..toggle import parse_response

    counts: dict[str, list[int]] = {}
    for text, g in zip(texts, groups):
        ids, kws = columns["instruction_id_list"][g], columns["kwargs"][g]
        try:
            ids, kws = ifeval.check_instructions(ids, kws)
        except ValueError:
            continue
        item = ifeval.IFEvalItem(0, "", ids, kws)
        followed = ifeval.grade(item, parse_response(text).answer or "")["strict"]
        for i, ok in zip(ids, followed):
            c = counts.setdefault(i, [0, 0])
            c[0] += bool(ok)
            c[1] += 1
    return {k: round(a / n, 4) for k, (a, n) in sorted(counts.items())}


def run(cfg: RLOOConfig, stage: StageDir, inputs: Inputs) -> dict:
    from transformers import AutoTokenizer

    model_dir = inputs["model"]
    sidecar = require_chat(model_dir, "rloo")
    for path in cfg.files:  # every row checked against the checker registry before any work
        if any(r.startswith("ifeval_") for r in cfg.rewards):
            ifeval.read_if_prompts(path)
    device = setup_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    runner = RewardRunner([(name, load_reward(name), w) for name, w in zip(cfg.rewards, weights)],
                          timeout=cfg.reward_timeout)
    pass_name = cfg.pass_reward or cfg.rewards[0]
    held_items, held_ids, held_cols, source = [], [], {}, {}
    if cfg.files:
        prompts, columns, held_ids, held_cols, source = file_prompts(
            tokenizer, cfg.files, held_out=cfg.eval_problems, seed=cfg.seed, thinking=cfg.thinking,
            skip_bad=cfg.skip_bad_rows, stage="rloo")
    else:
        prompts, columns, _ = nano_if_prompts(tokenizer, cfg.prompts, seed=cfg.seed, kinds=cfg.kinds,
                                              digits=cfg.digits, steps=cfg.steps, instructions=cfg.instructions,
                                              thinking=cfg.thinking)
        if cfg.eval_problems:
            _, _, held_items = nano_if_prompts(tokenizer, cfg.eval_problems, seed=cfg.seed, kinds=cfg.kinds,
                                               digits=cfg.digits, steps=cfg.steps, instructions=cfg.instructions,
                                               thinking=cfg.thinking, split="eval")
    math, math_cols = [], {}
    if cfg.math_per_step:
        math, math_cols = nano_prompts(tokenizer, cfg.math_prompts, seed=cfg.seed, kinds=cfg.kinds,
                                       digits=cfg.math_digits, steps=cfg.math_steps, thinking="both", phrasing="varied")
        math_cols.update(instruction_id_list=[[] for _ in math], kwargs=[[] for _ in math])
    for name in dict.fromkeys(cfg.rewards):
        lacking = missing_columns(load_reward(name), columns)
        if lacking:
            raise DataError(missing_columns_message(name, lacking, source["fields"] if cfg.files else None, "rloo"))
    model = load_decilm(model_dir, device)
    backend = LocalBackend(model)
    log = stage.logger()
    if source:
        log.log("prompts", files=cfg.files, **source)
    model.requires_grad_(True)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_beta > 0 else None
    opt = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[dict] = []
    steps_log: list[dict] = []

    def load(state):
        model.load_state_dict(state["model"])
        curve[:] = state["curve"]
        steps_log[:] = state["steps"]

    loop = TrainLoop(stage, "rloo", cfg.train_steps, opt, log=log, device=device,
                     schedule=lambda s: warmup_cosine(s, lr=cfg.lr, total=cfg.train_steps, warmup=cfg.warmup_steps,
                                                      min_ratio=cfg.min_lr_ratio),
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, load=load,
                     save=lambda: {"model": model.state_dict(), "curve": list(curve), "steps": list(steps_log)})
    watch = RewardWatch("rloo", cfg.rewards, log, stage.path, stage.checkpoint_dir, cfg.max_failing_steps)
    watch.replay(steps_log)
    pass_runner = RewardRunner([(pass_name, load_reward(pass_name), 1.0)], timeout=cfg.reward_timeout)

    def point(step: int) -> None:
        if held_items:
            curve.append({"step": step, **if_check(backend, tokenizer, held_items,
                                                   max_new_tokens=cfg.eval_max_new_tokens,
                                                   batch_size=cfg.batch_size)})
        elif held_ids:
            result, errors = held_out_check(backend, tokenizer, held_ids, held_cols, pass_runner,
                                            max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.batch_size)
            watch.report(errors, step, during="held_out")
            curve.append({"step": step, **result})
        if curve and curve[-1]["step"] == step:
            log.log("eval", **curve[-1])
        model.train()

    print(f"rloo: {model_dir}, {len(prompts)} prompts, {cfg.train_steps} steps of {cfg.prompts_per_step} x "
          f"{cfg.group_size}, rewards {cfg.rewards}, kl_beta {cfg.kl_beta}")
    if loop.start == 0 and not curve:
        point(0)
    pad = tokenizer.pad_token_id or 0
    stops = tuple(stop_token_ids(tokenizer))
    for step in loop:
        # the prompts of step s: a fixed permutation of all prompts, epoch after epoch (a resumed run draws the same)
        order = list(range(len(prompts)))
        epoch, offset = divmod(step * cfg.prompts_per_step, len(prompts))
        random.Random(f"rloo:{cfg.seed}:{epoch}").shuffle(order)
        batch = [order[(offset + i) % len(order)] for i in range(cfg.prompts_per_step)]
        cols = {k: [v[i] for i in batch] for k, v in columns.items()}
        step_prompts = [prompts[i] for i in batch]
        if math:  # the step's math prompts, drawn by (seed, step): a resumed run draws the same
            extra = random.Random(f"rloo-math:{cfg.seed}:{step}").sample(range(len(math)),
                                                                         min(cfg.math_per_step, len(math)))
            step_prompts += [math[i] for i in extra]
            cols = {k: v + [math_cols[k][i] for i in extra] for k, v in cols.items()}
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                stop_token_ids=stops, batch_size=cfg.batch_size, seed=cfg.seed * 100003 + step)
        texts: list[str] = []

        def decode(ids):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            texts.append(text)
            return text

        try:
            record, errors = rloo_step(model, opt, step_prompts, cols, runner, params,
                                       group_size=cfg.group_size, decode=decode, pad_id=pad, kl_beta=cfg.kl_beta,
                                       clip_eps=cfg.clip_eps, reference=reference, updates=cfg.updates_per_rollout,
                                       grad_clip=cfg.grad_clip, autocast_ctx=lambda: autocast(device, precision),
                                       backend=backend, pass_reward=pass_name,
                                       passing_only=[False] * len(batch) + [True] * (len(step_prompts) - len(batch)))
        except FloatingPointError as e:
            raise FloatingPointError(
                f"rloo: {e} at step {step + 1}; stopped without saving: the last good checkpoint "
                f"({stage.checkpoint_dir}) is kept. Lower lr or check the rewards.") from None
        failed = watch.step(errors, step)
        groups = [g for g in range(len(step_prompts)) for _ in range(cfg.group_size)]
        record = {"step": step + 1, **record, "reward_failed": failed}
        if math:
            record["math_prompts"] = len(step_prompts) - len(batch)
        if "instruction_id_list" in cols:
            record["instructions"] = _instruction_rates(texts, cols, groups)
        steps_log.append(record)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:
            point(step + 1)
        loop.end_step(step, **{k: v for k, v in record.items() if k not in ("step", "instructions")})
    loop.close()
    reward_errors = watch.summary()
    model.eval()
    save_chat_model(model, stage, model_dir, sidecar, "rloo")
    plot = [{"label": "reward", "y": "reward", "of": "steps"}] + [
        {"label": f"IF strict {mode}", "y": f"{mode}.if_strict"} for mode in ("on", "off")]
    write_curve(stage.path, Curve(points=curve, steps=steps_log, plot=plot))
    last = [s["reward"] for s in steps_log[-5:] if s["reward"] is not None]
    metrics = {"steps": cfg.train_steps, "prompts": len(prompts), "seconds": round(loop.seconds, 1),
               "tokens": loop.counters.get("tokens", 0),
               "reward_first": steps_log[0]["reward"] if steps_log else None,
               "reward_last": statistics.fmean(last) if last else None, "reward_errors": reward_errors}
    if curve and "held_out" in curve[0]:
        metrics["held_out_pass_before"] = curve[0]["held_out"]["pass"]
        metrics["held_out_pass_after"] = curve[-1]["held_out"]["pass"]
    elif curve:
        for mode in ("on", "off"):
            for key in ("if_strict", "accuracy", "format_ok"):
                metrics[f"{key}_{mode}_before"] = curve[0][mode][key]
                metrics[f"{key}_{mode}_after"] = curve[-1][mode][key]
    log.log("done", **metrics)
    log.close()
    return metrics
