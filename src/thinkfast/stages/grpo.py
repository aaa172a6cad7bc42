"""Stage ``grpo``: reasoning RL with GRPO and a pass-rate curriculum, on the latest model of the run.

Paper: Llama-Nemotron (arXiv 2505.00949) section 5; REFERENCE.md section 5. Each step takes
``prompts_per_step`` prompts, samples ``group_size`` completions of each with the rollout engine
(temperature 1, top-p 1), scores them with the rewards (accuracy and think-format; any TRL-style reward by
``module:function``; a truncated response scores 0), normalises rewards within each group and takes
``updates_per_rollout`` gradient steps on the token-level clipped objective (:mod:`thinkfast.rl.grpo`), one
per slice of the groups, with an optional k3 KL to the starting model. The "old" log-probs of the ratio are
recomputed by the training model before the first update (``logprobs: recompute``; :mod:`thinkfast.rollout`).

Curriculum (:mod:`thinkfast.rl.curriculum`): the starting model answers every prompt ``pass_rate_samples``
times first (saved to ``pass_rates.json``; a resumed run reuses it); prompts solved at >= ``easy_threshold``
are dropped, and the batches move from easy to hard on a Gaussian over pass rates (``curriculum:
gaussian``), or come in random order (``random``, the paper's ablation). The prompts reach past the SFT
teacher's data (``digits`` up to 3, word problems of up to 3 steps by default).

Logged every step: reward mean, pass rate (share of completions with full accuracy reward), each reward's
mean, KL, clip fraction, response length, think-format compliance, reward errors. Every ``eval_every``
steps: greedy accuracy in both modes on held-out problems (``curve.json`` / ``curve.png``). Resumable: a
resumed run draws the same prompts and samples. A NaN loss stops the run with an error; the last checkpoint
(written every ``checkpoint_every`` steps) stays as it was.

Departures: rewards are exact verifiers (the paper used an LLM judge for accuracy); the paper's 72 x 16
rollouts per step and FP8 generation are scaled down to the nano world; ``lr`` suits a tiny model.
"""

from __future__ import annotations

import copy
import importlib
import json
import statistics
from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import copy_tokenizer_files, read_model_sidecar, write_model_sidecar
from ..evaluation import build_prompt, toggle_check
from ..generation import SamplingParams
from ..nano import tasks
from ..puzzle.parent import load_decilm
from ..rl.curriculum import gaussian_schedule, keep_hard, random_schedule
from ..rl.grpo import grpo_step
from ..rl.rewards import BUILTIN, RewardRunner, nano_accuracy
from ..rollout import rollout
from ..rundir import StageDir, atomic_dir, atomic_write_json
from ..toggle import stop_token_ids
from ..train.loop import TrainLoop, adamw, autocast, resolve_precision, setup_device, warmup_cosine
from . import Input, Inputs, check_device, positive

MAKES = "model"


def reads(cfg) -> dict:
    return {"model": Input("model")}


@dataclass
class GRPOConfig:
    prompts: int = 256  # nano-world training prompts (before the curriculum's filter)
    kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "word"])
    digits: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps: list[int] = field(default_factory=lambda: [1, 2, 3])
    thinking: Literal["on", "off", "both"] = "on"  # the mode of the prompts (both: half each)
    rewards: list[str] = field(default_factory=lambda: ["nano_accuracy", "think_format"])  # or module:function
    reward_weights: list[float] | None = None  # default 1 each
    reward_timeout: float = 30.0
    group_size: int = 8
    prompts_per_step: int = 8
    train_steps: int = 40
    updates_per_rollout: int = 2
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    logprobs: Literal["recompute", "sampler"] = "recompute"
    curriculum: Literal["gaussian", "random"] = "gaussian"
    pass_rate_samples: int = 8
    easy_threshold: float = 0.75
    # drop prompts the starting model never solved: their groups differ in format reward only, and in the
    # nano world training on them taught wrong answers (docs/LOG.md 2026-12-03 session 6); the paper keeps them
    drop_unsolved: bool = False
    sigma: float = 0.15
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    batch_size: int = 64  # sequences per generation batch
    eval_every: int = 20
    eval_problems: int = 60  # held-out problems (1-3 digits) per mode; 0: none
    eval_max_new_tokens: int = 600
    seed: int = 0
    checkpoint_every: int = 10
    log_every: int = 1
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        positive(self, "prompts", "group_size", "prompts_per_step", "train_steps", "updates_per_rollout",
                 "max_new_tokens", "pass_rate_samples", "batch_size", "eval_every", "checkpoint_every",
                 "log_every", "eval_max_new_tokens")
        positive(self, "warmup_steps", "eval_problems", minimum=0)
        if not self.rewards:
            raise ValueError("rewards is empty: name at least one (nano_accuracy, think_format or module:function)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} rewards")
        for r in self.rewards:
            if r not in BUILTIN and ":" not in r:
                raise ValueError(f"rewards: {r!r} is neither built in ({sorted(BUILTIN)}) nor module:function")
        if self.updates_per_rollout > self.prompts_per_step:
            raise ValueError("updates_per_rollout slices the step's groups: it must be <= prompts_per_step")
        for name in ("lr", "grad_clip", "temperature", "reward_timeout", "sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps={self.clip_eps} must be in (0, 1)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not self.kl_beta >= 0:
            raise ValueError(f"kl_beta={self.kl_beta} must be >= 0")
        if not 0 < self.easy_threshold <= 1:
            raise ValueError(f"easy_threshold={self.easy_threshold} must be in (0, 1]")
        unknown = sorted(set(self.kinds) - set(tasks.KINDS))
        if unknown or not self.kinds or not self.digits or not self.steps:
            raise ValueError(f"kinds {self.kinds}, digits {self.digits}, steps {self.steps}: non-empty, kinds "
                             f"from {list(tasks.KINDS)}")


Config = GRPOConfig


def load_reward(name: str):
    """A built-in reward by name, or ``module:function`` (any importable module, e.g. a user's TRL reward)."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rewards: cannot load {name!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"rewards: {name!r} is not callable")
    return fn


def _sampling(cfg: GRPOConfig, tokenizer, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          stop_token_ids=tuple(stop_token_ids(tokenizer)), batch_size=cfg.batch_size, seed=seed)


def pass_rates(model, tokenizer, prompts: list[list[int]], problems: list, cfg: GRPOConfig) -> list[float]:
    """Share of ``pass_rate_samples`` sampled answers to each prompt that the nano verifier accepts."""
    roll = rollout(model, prompts, cfg.pass_rate_samples, _sampling(cfg, tokenizer, cfg.seed))
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in roll.completions]
    right = nano_accuracy(texts, [problems[g].answer for g in roll.groups])
    rates = [0.0] * len(prompts)
    for g, r, c in zip(roll.groups, right, roll.completions):
        rates[g] += (r if c.finish_reason == "stop" else 0.0) / cfg.pass_rate_samples
    return rates


def _plot(path, curve: list[dict], steps: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([s["step"] for s in steps], [s["reward"] for s in steps], color="tab:blue", alpha=0.6, label="reward")
    ax.plot([s["step"] for s in steps], [s["pass_rate"] for s in steps], color="tab:gray", alpha=0.6,
            label="pass rate (rollouts)")
    for mode, style in (("on", "s--"), ("off", "^:")):
        pts = [p for p in curve if mode in p]
        if pts:
            ax.plot([p["step"] for p in pts], [p[mode]["accuracy"] for p in pts], style, color="tab:red",
                    label=f"held-out accuracy {mode}")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: GRPOConfig, stage: StageDir, inputs: Inputs) -> dict:
    from transformers import AutoTokenizer

    model_dir = inputs["model"]
    sidecar = read_model_sidecar(model_dir)
    if sidecar.get("prompting") == "text":
        raise ValueError(f"{model_dir} was not taught the chat template's toggle (prompting: text): put sft "
                         "before grpo")
    device = setup_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    runner = RewardRunner([(name, load_reward(name), w) for name, w in zip(cfg.rewards, weights)],
                          timeout=cfg.reward_timeout)
    problems = tasks.make_problems(cfg.prompts, seed=cfg.seed, kinds=tuple(cfg.kinds), digits=tuple(cfg.digits),
                                   steps=tuple(cfg.steps), split="train")
    modes = [cfg.thinking == "on" or (cfg.thinking == "both" and i % 2 == 0) for i in range(len(problems))]
    prompts = [build_prompt(tokenizer, p, "chat", "on" if m else "off") for p, m in zip(problems, modes)]
    eval_set = (tasks.make_problems(cfg.eval_problems, seed=cfg.seed, kinds=tuple(cfg.kinds), digits=(1, 2, 3),
                                    steps=tuple(cfg.steps), split="eval") if cfg.eval_problems else [])
    model = load_decilm(model_dir, device)
    log = stage.logger()

    rates_file = stage.path / "pass_rates.json"
    if rates_file.is_file():
        rates = json.loads(rates_file.read_text())["pass_rates"]
    else:
        print(f"grpo: pass rates of {len(prompts)} prompts, {cfg.pass_rate_samples} samples each")
        rates = pass_rates(model, tokenizer, prompts, problems, cfg)
        atomic_write_json(rates_file, {"samples": cfg.pass_rate_samples, "pass_rates": rates})
    kept = keep_hard(rates, cfg.easy_threshold, cfg.drop_unsolved)
    if cfg.curriculum == "gaussian":
        schedule = gaussian_schedule(rates, kept, cfg.prompts_per_step, cfg.train_steps, sigma=cfg.sigma,
                                     seed=cfg.seed)
    else:
        schedule = random_schedule(kept, cfg.prompts_per_step, cfg.train_steps, seed=cfg.seed)
    log.log("curriculum", kind=cfg.curriculum, prompts=len(prompts), kept=len(kept),
            mean_pass_rate=statistics.fmean(rates), mean_pass_rate_kept=statistics.fmean(rates[i] for i in kept)
            if kept else None, batch_pass_rates=[statistics.fmean(rates[i] for i in b) for b in schedule])

    model.requires_grad_(True)
    reference = None
    if cfg.kl_beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    opt = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    curve: list[dict] = []
    steps_log: list[dict] = []

    def load(state):
        model.load_state_dict(state["model"])
        curve[:] = state["curve"]
        steps_log[:] = state["steps"]

    loop = TrainLoop(stage, "grpo", cfg.train_steps, opt, log=log, device=device,
                     schedule=lambda s: warmup_cosine(s, lr=cfg.lr, total=cfg.train_steps, warmup=cfg.warmup_steps,
                                                      min_ratio=cfg.min_lr_ratio),
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, load=load,
                     save=lambda: {"model": model.state_dict(), "curve": list(curve), "steps": list(steps_log)})
    print(f"grpo: {model_dir}, {len(kept)} of {len(prompts)} prompts below pass rate {cfg.easy_threshold}"
          f"{' and above 0' if cfg.drop_unsolved else ''}, "
          f"{cfg.train_steps} steps of {cfg.prompts_per_step} x {cfg.group_size}, {cfg.curriculum} order")

    def point(step: int) -> None:
        if eval_set:
            curve.append({"step": step, **toggle_check(model, tokenizer, eval_set,
                                                       max_new_tokens=cfg.eval_max_new_tokens)})
            log.log("eval", **curve[-1])
        model.train()

    if loop.start == 0 and not curve:
        point(0)
    pad = tokenizer.pad_token_id or 0
    columns = {"answer": [p.answer for p in problems], "thinking": modes,
               "prompts": [[{"role": "user", "content": tasks.chat_prompt(p)}] for p in problems]}
    for step in loop:
        batch_prompts = schedule[step]
        try:
            record, errors = grpo_step(
                model, opt, [prompts[i] for i in batch_prompts], {k: [v[i] for i in batch_prompts]
                                                                  for k, v in columns.items()},
                runner, _sampling(cfg, tokenizer, cfg.seed * 100003 + step), group_size=cfg.group_size,
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), pad_id=pad,
                updates=cfg.updates_per_rollout, clip_eps=cfg.clip_eps, kl_beta=cfg.kl_beta, reference=reference,
                logprobs=cfg.logprobs, grad_clip=cfg.grad_clip, autocast_ctx=lambda: autocast(device, precision))
        except FloatingPointError as e:
            raise FloatingPointError(
                f"grpo: {e} at step {step + 1}; stopped without saving: the last good checkpoint "
                f"({stage.checkpoint_dir}) is kept. Lower lr or check the rewards.") from None
        for e in errors:
            log.log("reward_error", step=step, error=e)
        record = {"step": step + 1, **record, "batch_pass_rate": statistics.fmean(rates[i] for i in batch_prompts)}
        steps_log.append(record)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:
            point(step + 1)
        loop.end_step(step, **{k: v for k, v in record.items() if k != "step"})
    loop.close()
    model.eval()
    with atomic_dir(stage.model_dir) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(model_dir, tmp)
        write_model_sidecar(tmp, prompting="chat", made_by="grpo",
                            **{k: sidecar[k] for k in ("engine",) if k in sidecar})
    atomic_write_json(stage.path / "curve.json", {"eval": curve, "steps": steps_log})
    _plot(stage.path / "curve.png", curve, steps_log, f"GRPO ({cfg.curriculum}) of {model_dir.parent.name}")
    metrics = {"steps": cfg.train_steps, "prompts_kept": len(kept), "prompts": len(prompts),
               "curriculum": cfg.curriculum, "seconds": round(loop.seconds, 1),
               "tokens": loop.counters.get("tokens", 0),
               "reward_first": steps_log[0]["reward"] if steps_log else None,
               "reward_last": statistics.fmean(s["reward"] for s in steps_log[-5:]) if steps_log else None}
    if curve:
        for mode in ("on", "off"):
            metrics[f"accuracy_{mode}_before"] = curve[0][mode]["accuracy"]
            metrics[f"accuracy_{mode}_after"] = curve[-1][mode]["accuracy"]
    log.log("done", **metrics)
    log.close()
    return metrics
