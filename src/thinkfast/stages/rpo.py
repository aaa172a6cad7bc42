"""Stage ``rpo``: iterative online reward-aware preference optimisation (RPO), or offline DPO as its baseline.

Paper: Llama-Nemotron (arXiv 2505.00949) section 6; REFERENCE.md section 6; the loss of the Nemotron-4 340B report
(arXiv 2406.11704, section 3.4.2), :func:`thinkfast.rl.preference.preference_loss`. ``mode: online`` runs
``iterations`` rounds inside the stage; each round fixes the reference at the policy as the round starts, samples
two responses per prompt from it (``steps_per_iteration x prompts_per_step`` prompts, temperature 1), scores both
with the reward model (the run's latest ``reward_model`` output, or the folder named by ``reward_model``) and
trains ``steps_per_iteration`` steps on the reward-aware loss (``loss: rpo_bwd_kl``, the paper's; ``beta`` scales
the policy's log-ratio margin, ``eta`` the reward margin). The RPO losses are symmetric in the two responses, so
the pairs are not sorted. A truncated response gets the round's lowest score of a finished one (the reward model is
read at the end-of-turn token, which it lacks).

``mode: offline`` is the DPO baseline at the same number of updates (``iterations x steps_per_iteration``): fixed
pairs and a reference fixed at the starting model. Pairs come from JSON lines (``pairs``: ``prompt`` as a string or
messages, ``chosen``, ``rejected``; or ``responses`` with ``scores``; :func:`thinkfast.rl.reward_model.read_pairs`)
or, in the nano world, from ``samples`` responses per prompt of the starting model and the teacher's compliant one
(``teacher``; the candidates the reward model is trained on) ranked by the nano rule
(:func:`thinkfast.rl.reward_model.nano_rank_key`: correct beats wrong, then obeying the toggle and every instruction,
then shorter), best against worst; prompts whose candidates tie make no pair.

Prompts (online, and nano offline): the nano world's instruction prompts in both toggle modes
(:func:`thinkfast.tasks.instructions.nano_if_items`), train split; or, online, your own (``prompt_files``), the first
``eval_problems`` of a seeded order held out for the check (:func:`thinkfast.evaluation.checks.prompt_if_check`). After every round (and before the first): held-out
instruction prompts, greedy, each in both modes (:func:`thinkfast.evaluation.if_check`), with the reward model's
mean score of the answers (``rm_score``; online, or offline with a reward model in the run), task accuracy and
toggle compliance. Resumable (the round's pairs and reference are in the checkpoint).

Departures: the paper's rounds of 500 steps at lr 4e-7, beta 1e-5, eta 3 on HelpSteer2 prompts with a 70B reward
model are scaled to the nano world; pairs are sampled once per round, as the paper does, not once per step.
"""

from __future__ import annotations

import copy
import random
import statistics
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..artifacts import Curve, load_decilm, write_curve
from ..data import DataError
from ..evaluation import if_check
from ..evaluation.checks import prompt_if_check
from ..generation import Completion, LocalBackend, SamplingParams
from ..rl.preference import KINDS
from ..rl.prompts import nano_if_prompts
from ..rl.rollout import rollout
from ..rl.rpo import packed_pair_batch, preference_step, response_tokens, sequence_logps
from ..rundir import StageDir
from ..runtime import autocast, resolve_precision, setup_device
from ..toggle import EOT, stop_token_ids
from ..train.loop import TrainLoop, adamw, warmup_cosine
from ..train.settings import CadenceFields, OptimizerFields, RolloutSampling
from . import Input, Inputs, check_device, check_nano_mix, positive, require_chat, save_chat_model

MAKES = "model"


def reads(cfg) -> dict:
    out = {"model": Input("model")}
    if cfg.mode == "online":
        out["reward_model"] = Input("reward_model", field="reward_model")
    return out


def files(cfg) -> list[tuple[str, list[str]]]:
    """The pair files and the prompt files (identified by content)."""
    return [("pairs", list(cfg.pairs)), ("prompt_files", list(cfg.prompt_files))]


@dataclass
class RPOConfig(RolloutSampling, OptimizerFields, CadenceFields):
    """The rollout sampling, optimizer and cadence fields are :mod:`thinkfast.train.settings`'s; the held-out check
    runs before the first round and after each."""

    mode: Literal["online", "offline"] = "online"
    loss: str | None = None  # a kind of thinkfast.rl.preference.KINDS; default: rpo_bwd_kl online, dpo offline
    reward_model: str | None = None  # a reward-model folder; default: the run's latest reward_model output
    pairs: list[str] = field(default_factory=list)  # offline: JSON-lines pair files; none: nano pairs
    # online: prompts of your own (thinkfast.rl.prompts' schema; IFEval's instruction_id_list / kwargs, and a
    # "solution" for the math check, read by the held-out check), eval_problems of them held out; none: nano prompts
    prompt_files: list[str] = field(default_factory=list)
    iterations: int = 2
    steps_per_iteration: int = 10
    prompts_per_step: int = 16  # pairs per step
    samples: int = 4  # offline nano pairs: responses per prompt ranked by the nano rule
    teacher: bool = True  # offline nano pairs: the teacher's compliant response is a candidate too (as reward_model's)
    beta: float = 0.05
    eta: float = 1.0
    lr: float = 1e-5
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    max_new_tokens: int = 600
    kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul", "word"])
    digits: list[int] = field(default_factory=lambda: [1, 2])
    steps: list[int] = field(default_factory=lambda: [2])
    instructions: list[int] = field(default_factory=lambda: [1, 3])
    thinking: Literal["on", "off", "both"] = "both"
    eval_problems: int = 100  # held-out instruction prompts (0: no check)
    eval_max_new_tokens: int = 600
    seed: int = 0
    checkpoint_every: int = 5
    log_every: int = 1
    device: str = "auto"

    def __post_init__(self):
        check_device(self.device)
        super().__post_init__()
        positive(self, "iterations", "steps_per_iteration", "prompts_per_step", "samples", "eval_max_new_tokens")
        positive(self, "eval_problems", minimum=0)
        if isinstance(self.pairs, str):
            self.pairs = [self.pairs]
        if self.loss is None:
            self.loss = "rpo_bwd_kl" if self.mode == "online" else "dpo"
        if self.loss not in KINDS:
            raise ValueError(f"loss={self.loss!r}: choose from {list(KINDS)}")
        if isinstance(self.prompt_files, str):
            self.prompt_files = [self.prompt_files]
        if self.prompt_files and self.mode != "online":
            raise ValueError("prompt_files are for mode: online (offline trains on pairs)")
        if self.mode == "online" and self.pairs:
            raise ValueError("pairs are for mode: offline (online samples its own pairs each round)")
        if self.mode == "offline" and self.loss.startswith("rpo"):
            raise ValueError(f"loss={self.loss} needs reward-model scores: use mode: online, or dpo / ipo offline")
        if self.mode == "offline" and self.reward_model is not None:
            raise ValueError("reward_model is read by mode: online only")
        if self.samples < 2:
            raise ValueError(f"samples={self.samples} must be >= 2 (a pair needs two responses)")
        for name in ("beta", "eta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        check_nano_mix(self, instructions=True)


Config = RPOConfig


def _nano_ranked_pairs(backend, tokenizer, prompts, columns, items, samples: int, params, teacher: bool) -> list[dict]:
    """``samples`` responses per prompt (and the teacher's compliant one when ``teacher``), ranked by the nano rule;
    the best against the worst (ties: no pair). A truncated response ranks as wrong and disobedient."""
    from ..rl.reward_model import nano_rank_key
    from ..tasks.ifeval import ifeval_strict
    from ..tasks.instructions import if_response
    from ..tasks.nano import nano_accuracy
    from ..tasks.think_format import think_format

    roll = rollout(backend, prompts, samples, params)
    if teacher:
        stop = tokenizer.convert_tokens_to_ids(EOT) if EOT in tokenizer.get_vocab() else tokenizer.eos_token_id
        for p, item in enumerate(items):
            ids = tokenizer(if_response(item), add_special_tokens=False)["input_ids"] + [stop]
            roll.prompts.append(prompts[p])
            roll.completions.append(Completion(ids, "stop"))
            roll.groups.append(p)
    texts = [[{"role": "assistant", "content": tokenizer.decode(c.token_ids, skip_special_tokens=True)}]
             for c in roll.completions]
    g = roll.groups
    correct = nano_accuracy(texts, answer=[columns["answer"][i] for i in g])
    fmt = think_format(texts, thinking=[columns["thinking"][i] for i in g])
    follows = ifeval_strict(texts, [columns["instruction_id_list"][i] for i in g], [columns["kwargs"][i] for i in g])
    out = []
    for p in range(len(prompts)):
        rows = [j for j in range(len(g)) if g[j] == p]
        keys = {j: nano_rank_key(bool(correct[j]) and finished, bool(fmt[j]) and bool(follows[j]) and finished,
                                 len(roll.completions[j].token_ids))
                for j in rows for finished in [roll.completions[j].finish_reason == "stop"]}
        if len(keys) < 2:
            continue
        best, worst = max(keys, key=keys.get), min(keys, key=keys.get)
        if keys[best] == keys[worst]:
            continue
        out.append({"prompt": prompts[p], "chosen": roll.completions[best].token_ids,
                    "rejected": roll.completions[worst].token_ids})
    return out


def _file_pairs(tokenizer, paths) -> list[dict]:
    """The pairs of JSON-lines files as token ids: the prompt through the chat template (in the pair's mode, else as
    its system message says), each response with the end-of-turn token (as the reward model scores them)."""
    from ..rl.reward_model import read_pairs, response_ids

    out = []
    for pair in read_pairs(paths):
        prompt = response_ids(tokenizer, list(pair.prompt), "", pair.thinking)[:-1]  # the prompt alone
        chosen, rejected = (response_ids(tokenizer, list(pair.prompt), r, pair.thinking)[len(prompt):]
                            for r in (pair.chosen, pair.rejected))
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def run(cfg: RPOConfig, stage: StageDir, inputs: Inputs) -> dict:
    from transformers import AutoTokenizer

    model_dir = inputs["model"]
    sidecar = require_chat(model_dir, "rpo")
    device = setup_device(cfg.device)
    precision = resolve_precision(device, cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    scorer = None
    if cfg.mode == "online":
        from ..rl.reward_model import load_reward_model

        scorer = load_reward_model(inputs["reward_model"], device=device)
    model = load_decilm(model_dir, device)
    backend = LocalBackend(model)
    log = stage.logger()
    total = cfg.iterations * cfg.steps_per_iteration
    per_round = cfg.steps_per_iteration * cfg.prompts_per_step
    held, held_file = [], None
    if cfg.prompt_files:
        from ..rl.prompts import file_prompts

        prompts, columns, held_ids, held_cols, _ = file_prompts(
            tokenizer, cfg.prompt_files, held_out=cfg.eval_problems, seed=cfg.seed, thinking=cfg.thinking,
            skip_bad=False, stage="rpo", key="prompt_files")
        items = []
        need = per_round * cfg.iterations
        if len(prompts) < need:
            raise DataError(f"rpo.prompt_files {cfg.prompt_files}: {len(prompts)} prompts after eval_problems="
                            f"{cfg.eval_problems} held out, {need} needed (iterations x steps_per_iteration x "
                            "prompts_per_step)")
        if held_ids:
            held_file = (held_cols["prompts"], held_cols)
    else:
        prompts, columns, items = nano_if_prompts(
            tokenizer, per_round * cfg.iterations if cfg.mode == "online" else per_round, seed=cfg.seed,
            kinds=cfg.kinds, digits=cfg.digits, steps=cfg.steps, instructions=cfg.instructions, thinking=cfg.thinking)
    if cfg.eval_problems and not cfg.prompt_files:
        held = nano_if_prompts(tokenizer, cfg.eval_problems, seed=cfg.seed, kinds=cfg.kinds, digits=cfg.digits,
                               steps=cfg.steps, instructions=cfg.instructions, thinking=cfg.thinking, split="eval")[2]
    stops = tuple(stop_token_ids(tokenizer))
    pad = tokenizer.pad_token_id or 0

    def sampling(seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop_token_ids=stops, batch_size=cfg.batch_size, seed=seed)

    model.requires_grad_(True)
    opt = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    state: dict = {"round": -1, "pairs": [], "curve": [], "steps": []}

    def load(saved):
        model.load_state_dict(saved["model"])
        reference.load_state_dict(saved["reference"])
        state.update({k: saved[k] for k in ("round", "pairs", "curve", "steps")})

    loop = TrainLoop(stage, "rpo", total, opt, log=log, device=device,
                     schedule=lambda s: warmup_cosine(s, lr=cfg.lr, total=total, warmup=cfg.warmup_steps,
                                                      min_ratio=cfg.min_lr_ratio),
                     log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, load=load,
                     save=lambda: {"model": model.state_dict(), "reference": reference.state_dict(), **state})

    def point(done_rounds: int) -> None:
        check = None
        if held:
            check = if_check(backend, tokenizer, held, max_new_tokens=cfg.eval_max_new_tokens,
                             batch_size=cfg.batch_size, scorer=scorer)
        elif held_file:
            check = prompt_if_check(backend, tokenizer, held_file[0], held_file[1],
                                    max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.batch_size, scorer=scorer)
        if check is not None:
            state["curve"].append({"step": done_rounds * cfg.steps_per_iteration, "round": done_rounds, **check})
            log.log("eval", **state["curve"][-1])
        model.train()

    print(f"rpo ({cfg.mode}, {cfg.loss}): {model_dir}, {cfg.iterations} round(s) x {cfg.steps_per_iteration} steps "
          f"of {cfg.prompts_per_step} pairs, beta {cfg.beta}, eta {cfg.eta}")
    if loop.start == 0 and not state["curve"]:
        point(0)
    if cfg.mode == "offline" and state["round"] < 0:  # fixed pairs, the reference fixed at the start
        if cfg.pairs:
            state["pairs"] = _file_pairs(tokenizer, cfg.pairs)
        else:
            state["pairs"] = _nano_ranked_pairs(backend, tokenizer, prompts, columns, items, cfg.samples,
                                                sampling(cfg.seed * 100003), cfg.teacher)
        state["round"] = 0
        if not state["pairs"]:
            raise ValueError("rpo (offline): no pairs (every prompt's samples tied under the nano rule)")
        log.log("pairs", n=len(state["pairs"]))
    for step in loop:
        rnd = step // cfg.steps_per_iteration
        if cfg.mode == "online" and state["round"] < rnd:
            # a new round: the reference is the policy as it starts; sample two responses per prompt, score both
            reference.load_state_dict(model.state_dict())
            chunk = list(range(rnd * per_round, (rnd + 1) * per_round))
            roll = rollout(backend, [prompts[i] for i in chunk], 2, sampling(cfg.seed * 100003 + rnd))
            scores = scorer.score_ids([p + list(c.token_ids) for p, c in zip(roll.prompts, roll.completions)])
            # a truncated response (no end-of-turn token) is scored where the reward model never read one: it gets
            # the round's lowest score of a finished response instead
            finished = [s for s, c in zip(scores, roll.completions) if c.finish_reason == "stop"]
            floor = min(finished) if finished else min(scores)
            scores = [s if c.finish_reason == "stop" else floor for s, c in zip(scores, roll.completions)]
            state["pairs"] = [{"prompt": roll.prompts[2 * j], "chosen": roll.completions[2 * j].token_ids,
                               "rejected": roll.completions[2 * j + 1].token_ids, "reward_chosen": scores[2 * j],
                               "reward_rejected": scores[2 * j + 1]} for j in range(len(chunk))]
            state["round"] = rnd
            log.log("round", round=rnd, pairs=len(state["pairs"]), rm_score=statistics.fmean(scores),
                    identical=sum(p["chosen"] == p["rejected"] for p in state["pairs"]))
        pairs = state["pairs"]
        if cfg.mode == "online":
            k = step % cfg.steps_per_iteration
            chosen = pairs[k * cfg.prompts_per_step:(k + 1) * cfg.prompts_per_step]
        else:
            order = list(range(len(pairs)))
            epoch, offset = divmod(step * cfg.prompts_per_step, len(pairs))
            random.Random(f"rpo:{cfg.seed}:{epoch}").shuffle(order)
            chosen = [pairs[order[(offset + i) % len(order)]] for i in range(min(cfg.prompts_per_step, len(pairs)))]
        batch = packed_pair_batch([p["prompt"] for p in chosen], [p["chosen"] for p in chosen],
                                  [p["rejected"] for p in chosen], pad, device)
        with torch.no_grad():
            ref_c, ref_r = sequence_logps(reference, batch)
        rewards = {}
        if "reward_chosen" in chosen[0]:
            rewards = {"reward_chosen": torch.tensor([p["reward_chosen"] for p in chosen]),
                       "reward_rejected": torch.tensor([p["reward_rejected"] for p in chosen])}
        try:
            record = preference_step(model, opt, batch, kind=cfg.loss, beta=cfg.beta, eta=cfg.eta, ref_chosen=ref_c,
                                     ref_rejected=ref_r, grad_clip=cfg.grad_clip,
                                     autocast_ctx=lambda: autocast(device, precision), **rewards)
        except FloatingPointError as e:
            raise FloatingPointError(f"rpo: {e} at step {step + 1}; stopped without saving: the last good checkpoint "
                                     f"({stage.checkpoint_dir}) is kept. Lower lr or beta.") from None
        backend.sync(model)
        record = {"step": step + 1, "round": rnd, **record,
                  "tokens": response_tokens(batch)}
        state["steps"].append(record)
        if (step + 1) % cfg.steps_per_iteration == 0:
            point(rnd + 1)
        loop.end_step(step, **{k: v for k, v in record.items() if k != "step"})
    loop.close()
    model.eval()
    save_chat_model(model, stage, model_dir, sidecar, "rpo")
    curve = state["curve"]
    plot = [{"label": "loss", "y": "loss", "of": "steps"}] + [
        {"label": f"IF strict {mode}", "y": f"{mode}.if_strict"} for mode in ("on", "off")]
    write_curve(stage.path, Curve(points=curve, steps=state["steps"], plot=plot))
    metrics = {"mode": cfg.mode, "loss": cfg.loss, "steps": total, "iterations": cfg.iterations,
               "seconds": round(loop.seconds, 1), "pairs_last_round": len(state["pairs"])}
    if curve:
        for mode in ("on", "off"):
            for key in ("if_strict", "accuracy", "format_ok", "rm_score"):
                if key in curve[0][mode]:
                    metrics[f"{key}_{mode}"] = [p[mode][key] for p in curve]
    log.log("done", **metrics)
    log.close()
    return metrics
