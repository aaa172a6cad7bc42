"""Stage ``grpo``: reasoning RL with GRPO and a pass-rate curriculum, on the latest model of the run.

Paper: Llama-Nemotron (arXiv 2505.00949) section 5; REFERENCE.md section 5. Each step takes
``prompts_per_step`` prompts, samples ``group_size`` completions of each with the rollout engine
(temperature 1, top-p 1), scores them with the rewards (accuracy and think-format; any TRL-style reward by
``module:function``; a truncated response scores 0), normalises rewards within each group and takes
``updates_per_rollout`` gradient steps on the token-level clipped objective (:mod:`thinkfast.rl.grpo`), one
per slice of the groups, with an optional k3 KL to the starting model. The "old" log-probs of the ratio are
recomputed by the training model before the first update (``logprobs: recompute``; :mod:`thinkfast.rl.rollout`).

This module is the glue (config, reads, run); the algorithm is library code: the policy step and the
advantages (:mod:`thinkfast.rl.policy`, :mod:`thinkfast.rl.advantages`), the rewards
(:mod:`thinkfast.rl.rewards`; each built-in is a task's grader, :mod:`thinkfast.tasks`, so RL optimises the
check the eval stage reports), the prompts (:mod:`thinkfast.rl.prompts`) and the pass rates
(:mod:`thinkfast.rl.pass_rates`).

Curriculum (:mod:`thinkfast.rl.curriculum`): the starting model answers every prompt ``pass_rate_samples``
times first (saved to ``pass_rates.json``; a resumed run reuses it); prompts solved at >= ``easy_threshold``
are dropped, and the batches move from easy to hard on a Gaussian over pass rates (``curriculum:
gaussian``), or come in random order (``random``, the paper's ablation). The prompts reach past the SFT
teacher's data (``digits`` up to 3, word problems of up to 3 steps by default).

Logged every step: reward mean, pass rate (share of completions with full accuracy reward), each reward's
mean, KL, clip fraction, response length, think-format compliance, reward errors. Every ``eval_every``
steps: greedy accuracy in both modes on held-out problems, on the SFT data's difficulties and past them apart
(``covered_digits`` / ``covered_steps``; ``curve.json`` / ``curve.png``). Resumable: a
resumed run draws the same prompts and samples. A NaN loss stops the run with an error; the last checkpoint
(written every ``checkpoint_every`` steps) stays as it was.

A reward's ``None`` for a sample means it cannot score it (TRL's semantics): the weighted sum runs over the
rewards that did, and a sample no reward scored is left out of its group's baseline and of the loss.

Reward errors: a reward that raises, hangs or returns the wrong thing counts 0 where it fails (the run goes
on); each failure is a ``reward_error`` line in ``log.jsonl``, the console warns once per reward when it
first fails and sums up at the end, and ``metrics.json`` counts ``reward_errors`` (per reward: failed calls
of calls; each step calls each reward once). A reward that fails on every call for ``max_failing_steps``
steps in a row stops the run with an error naming it and its last error, keeping the last checkpoint, as a
NaN loss does: otherwise the run would train on the other rewards alone. The pass reward's one call that
measures the pass rates before training must succeed: its failure would count every prompt unsolved (and be
saved in ``pass_rates.json`` for reuse), so it stops the run before any training.

Prompts: the nano world's (``prompts`` problems of ``kinds`` x ``digits`` x ``steps``), or your own JSON
lines (``files``: TRL's ``prompt`` format or the Llama-Nemotron schema, :mod:`thinkfast.rl.prompts`) whose
other columns reach the rewards as keyword arguments, TRL's way (e.g. ``solution`` for ``math_accuracy``;
``instruction_id_list`` and ``kwargs`` for ``ifeval_strict`` / ``ifeval_loose``, so IFEval's own rows are prompt
rows as they are).
A prompt "passes" when ``pass_reward`` (default: the first reward) gives it 1; with files, ``eval_problems``
rows are held out and the periodic check is their greedy pass rate in each row's mode.

Departures: rewards are exact verifiers (the paper used an LLM judge for accuracy); the paper's 72 x 16
rollouts per step and FP8 generation are scaled down to the nano world; ``lr`` suits a tiny model. Options the
paper does not have: ``drop_unsolved`` (never-solved prompts leave the curriculum), ``reinforce: passing`` (a
positive advantage only for a sample that passes, so a wrong answer is never pushed up) and
``unsolved_per_step`` (never-solved prompts join every step beside the curriculum's: with ``reinforce:
passing`` their groups only push malformed answers down, training the toggle's format where the model cannot
solve), and ``unsolved_order: malformed_first`` (those of them whose pass-rate samples broke the format, saved as
``malformed_rates`` in ``pass_rates.json``, drawn first: at most ``malformed_share`` of a step's).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..artifacts import Curve, write_curve
from ..data import DataError
from ..evaluation import toggle_check
from ..generation import LocalBackend, SamplingParams
from ..nano import tasks
from ..artifacts import load_decilm
from ..rl.curriculum import gaussian_schedule, keep_hard, random_schedule
from ..rl.grpo import grpo_step
from ..rl.pass_rates import held_out_check, sample_rates
from ..rl.prompts import file_prompts, nano_prompts
from ..rl.rewards import BUILTIN, RewardRunner, load_reward, missing_columns, missing_columns_message
from ..rl.watch import RewardWatch
from ..rundir import StageDir, atomic_write_json
from ..toggle import stop_token_ids
from ..runtime import autocast, resolve_precision, setup_device
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
class GRPOConfig(RolloutSampling, OptimizerFields, PeriodicEvalFields, CadenceFields):
    """The rollout sampling (``max_new_tokens``, ``temperature``, ``top_p``, ``batch_size``), optimizer
    (``lr`` ... ``precision``), periodic evaluation (held-out problems, 1-3 digits, per mode, or rows held out
    of files; 0: none) and cadence fields are :mod:`thinkfast.train.settings`'s."""

    prompts: int = 256  # training prompts (before the curriculum's filter): nano-world ones, or the files' first
    files: list[str] = field(default_factory=list)  # JSON lines of prompts (thinkfast.rl.prompts); none: nano
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping at the first
    kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "word"])
    digits: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps: list[int] = field(default_factory=lambda: [1, 2, 3])
    thinking: Literal["on", "off", "both"] = "on"  # the mode of the prompts (both: half each)
    # nano world: one canonical wording, or the "train" templates of thinkfast.nano.tasks.PHRASINGS (as sft.phrasing)
    phrasing: Literal["canonical", "varied"] = "canonical"
    # nano world: the difficulties the SFT teacher's traces covered (sft.digits / sft.steps): the held-out check
    # reports accuracy on them ("covered": no regression) and past them ("beyond": the student past its teacher)
    covered_digits: list[int] = field(default_factory=lambda: [1, 2])
    covered_steps: list[int] = field(default_factory=lambda: [1, 2])
    rewards: list[str] = field(default_factory=lambda: ["nano_accuracy", "think_format"])  # or module:function
    reward_weights: list[float] | None = None  # default 1 each
    pass_reward: str | None = None  # the reward whose 1 means "solved" (pass rates); default: the first
    reward_timeout: float = 30.0
    # stop (keeping the last checkpoint) when a reward has failed on every call for this many steps in a row
    # (a failing reward counts 0, so the run would train on the others alone); 0 or null: never stop, only
    # count (metrics.json reward_errors) and warn
    max_failing_steps: int | None = 3
    group_size: int = 8
    prompts_per_step: int = 8
    train_steps: int = 40
    updates_per_rollout: int = 2
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    logprobs: Literal["recompute", "sampler"] = "recompute"
    curriculum: Literal["gaussian", "random"] = "gaussian"
    pass_rate_samples: int = 8
    # a pass_rates.json of an earlier grpo run to reuse (same model, prompts and sampling: checked), e.g. the
    # other arm of the curriculum ablation; none: measure
    pass_rates_from: str | None = None
    easy_threshold: float = 0.75
    # drop prompts the starting model never solved: their groups differ in format reward only, and in the
    # nano world training on them taught wrong answers (docs/LOG.md 2026-12-03 session 6); the paper keeps them
    drop_unsolved: bool = False
    # a wrong answer is never pushed up: positive advantages only for samples that pass (pass_reward 1, not
    # cut off); "all": GRPO as published
    reinforce: Literal["all", "passing"] = "all"
    # never-solved prompts (pass rate 0) added to every step beside the curriculum's (drawn at random): with
    # reinforce: passing their groups push malformed answers down and nothing up, so the toggle's format is
    # trained where the model cannot solve (docs/LOG.md session 17); 0: none
    unsolved_per_step: int = 0
    # which never-solved prompts join a step: "random", or "malformed_first": those where the starting model's
    # pass-rate samples broke the toggle's format (pass_rates.json malformed_rates) drawn before the others,
    # so the step's push-down lands where malformed answers come from (docs/LOG.md session 20)
    unsolved_order: Literal["random", "malformed_first"] = "random"
    # with malformed_first: at most this share of each step's never-solved prompts comes from the malformed ones
    # (the rest at random from the others, which GRPO sometimes learns to solve)
    malformed_share: float = 1.0
    sigma: float = 0.15
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    eval_every: int = 20
    eval_problems: int = 60
    seed: int = 0
    checkpoint_every: int = 10
    log_every: int = 1
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        super().__post_init__()  # rollout sampling, optimizer, periodic evaluation and cadence fields
        positive(self, "prompts", "group_size", "prompts_per_step", "train_steps", "updates_per_rollout",
                 "pass_rate_samples")
        if self.max_failing_steps is not None and self.max_failing_steps < 0:
            raise ValueError(f"max_failing_steps={self.max_failing_steps} must be >= 0 (0 or null: never stop on "
                             "a failing reward)")
        if not self.rewards:
            raise ValueError("rewards is empty: name at least one (nano_accuracy, think_format or module:function)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {len(self.rewards)} rewards")
        if isinstance(self.files, str):
            self.files = [self.files]
        if self.pass_reward is not None and self.pass_reward not in self.rewards:
            raise ValueError(f"pass_reward {self.pass_reward!r} is not one of rewards {self.rewards}")
        for r in self.rewards:
            if r not in BUILTIN and ":" not in r:
                raise ValueError(f"rewards: {r!r} is neither built in ({sorted(BUILTIN)}) nor module:function")
        if self.unsolved_per_step < 0:
            raise ValueError(f"unsolved_per_step={self.unsolved_per_step} must be >= 0")
        if not 0 <= self.malformed_share <= 1:
            raise ValueError(f"malformed_share={self.malformed_share} must be in [0, 1]")
        if self.unsolved_per_step and self.reinforce != "passing":
            raise ValueError("unsolved_per_step needs reinforce: passing: otherwise the well-formed wrong answers of "
                             "a never-solved prompt are pushed up, which taught wrong answers (docs/LOG.md session 6)")
        if self.updates_per_rollout > self.prompts_per_step:
            raise ValueError("updates_per_rollout slices the step's groups: it must be <= prompts_per_step")
        for name in ("reward_timeout", "sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps={self.clip_eps} must be in (0, 1)")
        if not self.kl_beta >= 0:
            raise ValueError(f"kl_beta={self.kl_beta} must be >= 0")
        if not 0 < self.easy_threshold <= 1:
            raise ValueError(f"easy_threshold={self.easy_threshold} must be in (0, 1]")
        check_nano_mix(self)


Config = GRPOConfig


def _sampling(cfg: GRPOConfig, tokenizer, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          stop_token_ids=tuple(stop_token_ids(tokenizer)), batch_size=cfg.batch_size, seed=seed)


def _difficulty(cfg: GRPOConfig, problem) -> str:
    """"covered" when the SFT teacher's traces had the problem's difficulty, else "beyond"."""
    steps_ok = problem.kind != "word" or problem.steps in cfg.covered_steps
    return "covered" if problem.digits in cfg.covered_digits and steps_ok else "beyond"


def _weights_digest(model_dir: Path) -> str:
    """A hash of a model folder's weight files' content (the same weights in any folder give the same one)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("*.bin")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def unsolved_draw(unsolved: list[int], first: list[int], n: int, rng: random.Random, head: int | None = None
                  ) -> list[int]:
    """``n`` of the never-solved prompts ``unsolved`` for one step (all of them when fewer): up to ``head`` (default
    ``n``) drawn from ``first`` (a subset of them), the rest from the others, each part at random.

    >>> picks = unsolved_draw(list(range(10)), [7, 8], 3, random.Random(0))
    >>> sorted(picks[:2]), len(set(picks)), picks[2] in range(7)
    ([7, 8], 3, True)
    >>> sorted(unsolved_draw([1, 2], [], 5, random.Random(0)))
    [1, 2]
    >>> picks = unsolved_draw(list(range(10)), [7, 8, 9], 4, random.Random(0), head=1)
    >>> picks[0] in (7, 8, 9), [i in (7, 8, 9) for i in picks[1:]]
    (True, [False, False, False])
    """
    top = rng.sample(first, min(n if head is None else head, n, len(first)))
    chosen = set(first)
    rest = [i for i in unsolved if i not in chosen]
    return top + rng.sample(rest, min(n - len(top), len(rest)))


def _rates_key(model_id: str, prompts: list[list[int]], columns: dict, pass_name: str, cfg: GRPOConfig) -> str:
    """What the pass rates depend on: the model, the prompts and their columns, the pass reward, the sampling."""
    what = {"model": model_id, "prompts": prompts, "columns": {k: v for k, v in columns.items() if k != "prompts"},
            "reward": pass_name, "samples": cfg.pass_rate_samples, "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plot(path, curve: list[dict], steps: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([s["step"] for s in steps], [s["reward"] for s in steps], color="tab:blue", alpha=0.6, label="reward")
    ax.plot([s["step"] for s in steps], [s["pass_rate"] for s in steps], color="tab:gray", alpha=0.6,
            label="pass rate (rollouts)")
    for mode, style in (("on", "s--"), ("off", "^:"), ("held_out", "o-")):
        pts = [p for p in curve if mode in p and (mode != "held_out" or p[mode]["pass"] is not None)]
        if pts:
            ax.plot([p["step"] for p in pts], [p[mode]["accuracy" if mode != "held_out" else "pass"] for p in pts],
                    style, color="tab:red", label=f"held-out accuracy {mode}" if mode != "held_out"
                    else "held-out pass rate (greedy)")
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
    sidecar = require_chat(model_dir, "grpo")
    device = setup_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    weights = cfg.reward_weights or [1.0] * len(cfg.rewards)
    runner = RewardRunner([(name, load_reward(name), w) for name, w in zip(cfg.rewards, weights)],
                          timeout=cfg.reward_timeout)
    pass_name = cfg.pass_reward or cfg.rewards[0]
    pass_runner = RewardRunner([(pass_name, load_reward(pass_name), 1.0)], timeout=cfg.reward_timeout)
    eval_set, held_ids, held_cols, source = [], [], {}, {}
    if cfg.files:
        prompts, columns, held_ids, held_cols, source = file_prompts(
            tokenizer, cfg.files, held_out=cfg.eval_problems, seed=cfg.seed, thinking=cfg.thinking,
            skip_bad=cfg.skip_bad_rows)
        prompts, columns = prompts[:cfg.prompts], {k: v[:cfg.prompts] for k, v in columns.items()}
    else:
        prompts, columns = nano_prompts(tokenizer, cfg.prompts, seed=cfg.seed, kinds=cfg.kinds, digits=cfg.digits,
                                        steps=cfg.steps, thinking=cfg.thinking, phrasing=cfg.phrasing)
        eval_set = (tasks.make_problems(cfg.eval_problems, seed=cfg.seed, kinds=tuple(cfg.kinds), digits=(1, 2, 3),
                                        steps=tuple(cfg.steps), split="eval") if cfg.eval_problems else [])
    for name in dict.fromkeys([*cfg.rewards, pass_name]):
        lacking = missing_columns(load_reward(name), columns)
        if lacking:
            raise DataError(missing_columns_message(name, lacking, source["fields"] if cfg.files else None))
    model = load_decilm(model_dir, device)
    backend = LocalBackend(model)  # the rollout engine on the policy itself: trained in place, nothing to sync
    log = stage.logger()
    if source:
        log.log("prompts", files=cfg.files, **source)

    rates_file = stage.path / "pass_rates.json"
    key = _rates_key(_weights_digest(model_dir), prompts, columns, pass_name, cfg)
    rates = malformed = None
    need_malformed = bool(cfg.unsolved_per_step) and cfg.unsolved_order == "malformed_first"
    for path in [rates_file] + ([Path(cfg.pass_rates_from)] if cfg.pass_rates_from else []):
        if path.is_file():
            found = json.loads(path.read_text())
            if found.get("key") == key and (found.get("malformed_rates") is not None or not need_malformed):
                rates, malformed = found["pass_rates"], found.get("malformed_rates")
                break
            if path != rates_file:
                raise ValueError(f"grpo.pass_rates_from: {path} was measured on another model, other prompts or "
                                 "other sampling settings than this run's" if found.get("key") != key else
                                 f"grpo.pass_rates_from: {path} has no malformed_rates (written before they were "
                                 "recorded), which unsolved_order: malformed_first needs: leave pass_rates_from out")
        elif path != rates_file:
            raise ValueError(f"grpo.pass_rates_from: {path} does not exist")
    if rates is None:
        print(f"grpo: pass rates of {len(prompts)} prompts, {cfg.pass_rate_samples} samples each")
        rates, malformed = sample_rates(backend, tokenizer, prompts, columns, pass_runner,
                                        _sampling(cfg, tokenizer, cfg.seed), cfg.pass_rate_samples)
    if not rates_file.is_file() or json.loads(rates_file.read_text()) != {
            "samples": cfg.pass_rate_samples, "key": key, "pass_rates": rates, "malformed_rates": malformed}:
        atomic_write_json(rates_file, {"samples": cfg.pass_rate_samples, "key": key, "pass_rates": rates,
                                       "malformed_rates": malformed})
    kept = keep_hard(rates, cfg.easy_threshold, cfg.drop_unsolved)
    if not kept:
        easy, never = sum(r >= cfg.easy_threshold for r in rates), sum(r == 0 for r in rates)
        raise DataError(f"grpo: no prompt left to train on: of {len(rates)} prompts, {easy} are solved at pass rate >= "
                        f"easy_threshold={cfg.easy_threshold} and {never} never in {cfg.pass_rate_samples} samples"
                        + (" (drop_unsolved: true drops those)" if cfg.drop_unsolved else "")
                        + "; give more prompts (grpo.prompts), more pass_rate_samples, or the other settings")
    if cfg.curriculum == "gaussian":
        schedule = gaussian_schedule(rates, kept, cfg.prompts_per_step, cfg.train_steps, sigma=cfg.sigma,
                                     seed=cfg.seed)
    else:
        schedule = random_schedule(kept, cfg.prompts_per_step, cfg.train_steps, seed=cfg.seed)
    unsolved = [i for i, r in enumerate(rates) if r == 0] if cfg.unsolved_per_step else []
    first = ([i for i in unsolved if malformed[i] > 0] if need_malformed else [])

    def extra(step: int) -> list[int]:  # a pure function of (seed, step): a resumed run draws the same
        return unsolved_draw(unsolved, first, cfg.unsolved_per_step, random.Random(cfg.seed * 1_000_003 + step),
                             head=round(cfg.unsolved_per_step * cfg.malformed_share))

    log.log("curriculum", kind=cfg.curriculum, prompts=len(prompts), kept=len(kept), unsolved=len(unsolved),
            unsolved_malformed=len(first) if need_malformed else None,
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
    watch = RewardWatch("grpo", cfg.rewards, log, stage.path, stage.checkpoint_dir, cfg.max_failing_steps)
    watch.replay(steps_log)  # over the whole run: a resumed one counts the steps before

    print(f"grpo: {model_dir}, {len(kept)} of {len(prompts)} prompts below pass rate {cfg.easy_threshold}"
          f"{' and above 0' if cfg.drop_unsolved else ''}, "
          f"{cfg.train_steps} steps of {cfg.prompts_per_step} x {cfg.group_size}, {cfg.curriculum} order"
          + (f", and {min(cfg.unsolved_per_step, len(unsolved))} of {len(unsolved)} never-solved prompts a step"
             if cfg.unsolved_per_step else ""))

    def point(step: int) -> None:
        if eval_set:
            curve.append({"step": step, **toggle_check(backend, tokenizer, eval_set,
                                                       max_new_tokens=cfg.eval_max_new_tokens,
                                                       group=lambda p: _difficulty(cfg, p))})
        elif held_ids:
            result, errors = held_out_check(backend, tokenizer, held_ids, held_cols, pass_runner,
                                            max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.batch_size)
            watch.report(errors, step, during="held_out")
            curve.append({"step": step, **result})
        if curve and curve[-1]["step"] == step:
            log.log("eval", **curve[-1])
        model.train()

    if loop.start == 0 and not curve:
        point(0)
    pad = tokenizer.pad_token_id or 0
    for step in loop:
        batch_prompts = schedule[step]
        step_prompts = batch_prompts + (extra(step) if unsolved else [])
        try:
            record, errors = grpo_step(
                model, opt, [prompts[i] for i in step_prompts], {k: [v[i] for i in step_prompts]
                                                                 for k, v in columns.items()},
                runner, _sampling(cfg, tokenizer, cfg.seed * 100003 + step), group_size=cfg.group_size,
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), pad_id=pad,
                updates=cfg.updates_per_rollout, clip_eps=cfg.clip_eps, kl_beta=cfg.kl_beta, reference=reference,
                logprobs=cfg.logprobs, grad_clip=cfg.grad_clip, autocast_ctx=lambda: autocast(device, precision),
                pass_reward=pass_name, backend=backend, reinforce=cfg.reinforce)
        except FloatingPointError as e:
            raise FloatingPointError(
                f"grpo: {e} at step {step + 1}; stopped without saving: the last good checkpoint "
                f"({stage.checkpoint_dir}) is kept. Lower lr or check the rewards.") from None
        failed = watch.step(errors, step)
        record = {"step": step + 1, **record, "reward_failed": failed,
                  "batch_pass_rate": statistics.fmean(rates[i] for i in batch_prompts),
                  "unsolved_prompts": len(step_prompts) - len(batch_prompts)}
        steps_log.append(record)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.train_steps:
            point(step + 1)
        loop.end_step(step, **{k: v for k, v in record.items() if k != "step"})
    loop.close()
    reward_errors = watch.summary()
    model.eval()
    save_chat_model(model, stage, model_dir, sidecar, "grpo")
    plot = [{"label": "reward", "y": "reward", "of": "steps"}] + [
        {"label": f"accuracy {mode}", "y": f"{mode}.accuracy"} for mode in ("on", "off")]
    write_curve(stage.path, Curve(points=curve, steps=steps_log, plot=plot))
    _plot(stage.path / "curve.png", curve, steps_log, f"GRPO ({cfg.curriculum}) of {model_dir.parent.name}")
    last = [s["reward"] for s in steps_log[-5:] if s["reward"] is not None]  # None: nothing scorable
    metrics = {"steps": cfg.train_steps, "prompts_kept": len(kept), "prompts": len(prompts),
               "curriculum": cfg.curriculum, "seconds": round(loop.seconds, 1),
               "tokens": loop.counters.get("tokens", 0),
               "reward_first": steps_log[0]["reward"] if steps_log else None,
               "reward_last": statistics.fmean(last) if last else None,
               "reward_errors": reward_errors}
    if curve and "held_out" in curve[0]:
        metrics["held_out_pass_before"] = curve[0]["held_out"]["pass"]
        metrics["held_out_pass_after"] = curve[-1]["held_out"]["pass"]
    elif curve:
        for mode in ("on", "off"):
            metrics[f"accuracy_{mode}_before"] = curve[0][mode]["accuracy"]
            metrics[f"accuracy_{mode}_after"] = curve[-1][mode]["accuracy"]
            for name in curve[-1][mode].get("groups", {}):
                for when, at in (("before", 0), ("after", -1)):
                    got = curve[at][mode].get("groups", {}).get(name)
                    metrics[f"accuracy_{mode}_{name}_{when}"] = got["accuracy"] if got else None
    log.log("done", **metrics)
    log.close()
    return metrics
