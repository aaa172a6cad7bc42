"""GRPO: advantages and loss against hand-computed values, safe rewards, the curriculum, rollout records,
the stage (runs, resumes to the same weights, stops on NaN)."""

from __future__ import annotations

import json
import math
import statistics
import time

import pytest
import torch
from safetensors.torch import load_file
from test_modeling import hetero_model

from thinkfast.generation import LocalBackend, SamplingParams
from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.rl.curriculum import gaussian_schedule, keep_hard, random_schedule
from thinkfast.rl.advantages import group_normalised_advantages as group_advantages
from thinkfast.rl.grpo import grpo_loss
from thinkfast.rl.rewards import RewardRunner, load_reward
from thinkfast.tasks.math import math_accuracy
from thinkfast.tasks.nano import nano_accuracy
from thinkfast.tasks.think_format import think_format
from thinkfast.rl.rollout import rollout, token_logprobs
from thinkfast.rl import grpo as grpo_lib
from thinkfast.stages import grpo as grpo_stage
from thinkfast.train import loop as train_loop


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    a = group_advantages(r, g, eps=0.0)
    s0 = statistics.stdev([1, 0, 1, 0])
    assert torch.allclose(a, torch.tensor([0.5 / s0, -0.5 / s0, 0.5 / s0, -0.5 / s0, 1 / math.sqrt(2),
                                           -1 / math.sqrt(2)]), atol=1e-6)
    assert torch.equal(group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long)), torch.zeros(4))


def test_grpo_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.3], [0.2, 0.9, 0.4]]))
    old = torch.log(torch.tensor([[0.5, 0.25, 0.3], [0.4, 0.9, 0.4]]))
    ref = torch.log(torch.tensor([[0.4, 0.5, 0.3], [0.2, 0.9, 0.4]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, st = grpo_loss(logp, old, adv, mask, clip_eps=0.2, ref_logp=ref, kl_beta=0.1)
    # ratios: row 0: 1, 2 (A > 0: clipped to 1.2); row 1: 0.5 (A < 0: min(-1, 0.8 * -2) is the clipped -1.6), 1, 1
    obj = [1 * 1, min(2 * 1, 1.2 * 1), min(0.5 * -2, 0.8 * -2), -2, -2]
    k3 = [0.8 - math.log(0.8) - 1, 0, 0, 0, 0]
    want = -sum(o - 0.1 * k for o, k in zip(obj, k3)) / 5
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert st["clip_fraction"] == pytest.approx(2 / 5)
    assert st["kl"] == pytest.approx(k3[0] / 5, rel=1e-5)
    # gradient flows through the unclipped tokens only
    logp = logp.clone().requires_grad_(True)
    grpo_loss(logp, old, adv, mask)[0].backward()
    assert logp.grad[0, 1] == 0 and logp.grad[1, 0] == 0 and logp.grad[0, 2] == 0  # clipped, clipped, masked
    assert logp.grad[0, 0] != 0 and logp.grad[1, 1] != 0


def trl_style_length_reward(completions, **kwargs):
    return [-len(c[0]["content"]) / 100 for c in completions]


def test_reward_runner_survives_crashing_and_hanging_rewards():
    def crashes(completions, **kw):
        raise RuntimeError("boom")

    def hangs(completions, **kw):
        time.sleep(30)

    def wrong_length(completions, **kw):
        return [1.0]

    texts = ["<think>\nx\n</think>\n\nAnswer: 4", "Answer: 4"]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    runner = RewardRunner([("acc", nano_accuracy, 1.0), ("format", think_format, 0.5), ("crash", crashes, 1.0),
                           ("hang", hangs, 1.0), ("short", wrong_length, 1.0), ("len", trl_style_length_reward, 1.0)],
                          timeout=0.5)
    t = time.perf_counter()
    total, parts, errors = runner(completions, [False, True], {"answer": [4, 4], "thinking": [True, True]})
    assert time.perf_counter() - t < 5
    assert parts["acc"] == [1.0, 1.0] and parts["format"] == [1.0, 0.0]
    assert parts["crash"] == parts["hang"] == parts["short"] == [0.0, 0.0]
    assert [e.reward for e in errors] == ["crash", "hang", "short"]  # which reward failed, not just a string
    assert errors[0].message == "RuntimeError: boom" and "crashes" in errors[0].detail  # one line + traceback
    assert errors[1].message == "timed out after 0.5 s" and str(errors[1]) == "reward hang: timed out after 0.5 s"
    assert errors[2].message == "bad return value: returned 1 values for 2 completions"
    assert total[0] == pytest.approx(1.0 + 0.5 - len(texts[0]) / 100)
    assert total[1] == 0.0  # truncated: nothing


# (response, gold): units, commas, fractions, decimals, LaTeX, several boxed answers, wrong answers, no answer
MATH_CASES = [
    (r"The answer is $\boxed{\frac{1}{3}}$.", r"$\frac{1}{3}$"),
    (r"So $x = \boxed{0.5}$", r"$\frac{1}{2}$"),
    (r"$\boxed{1,234}$ apples", "$1234$"),
    (r"It costs $\boxed{12\text{ dollars}}$", "$12$"),
    (r"First $\boxed{3}$, then finally $\boxed{4}$", "$4$"),
    (r"$\boxed{2\sqrt{2}}$", r"$\sqrt{8}$"),
    (r"$\boxed{x^2+2x+1}$", "$(x+1)^2$"),
    (r"The answer is $\boxed{7}$", "$8$"),
    ("I do not know.", "$5$"),
    (r"$\boxed{\{1, 2\}}$", r"$\{2, 1\}$"),
    (r"$\boxed{(1, 2]}$", r"$(1, 2]$"),
    (r"$\boxed{-\infty}$", r"$-\infty$"),
]


def test_math_accuracy_agrees_with_trl_and_grades_only_the_answer():
    texts, golds = [t for t, _ in MATH_CASES], [g for _, g in MATH_CASES]
    ours = math_accuracy(texts, golds)
    assert ours[:2] == [1.0, 1.0] and ours[7:9] == [0.0, 0.0]
    trl_rewards = pytest.importorskip("trl.rewards")
    assert ours == trl_rewards.accuracy_reward([[{"role": "assistant", "content": t}] for t in texts], golds)
    # after the think block only: a right number in the reasoning with a wrong (or missing) answer scores 0
    think = ["<think>\nmaybe $\\boxed{4}$\n</think>\n\n$\\boxed{5}$", "<think>\n$\\boxed{4}$ so far",
             "<think>\nwork\n</think>\n\n$\\boxed{4}$"]
    assert math_accuracy(think, ["$4$"] * 3) == [0.0, 0.0, 1.0]
    assert math_accuracy(["$\\boxed{4}$"], ["not math at all"]) == [None]
    # inside the runner (a thread of its own: math-verify's signal timeouts are off there)
    total, parts, errors = RewardRunner([("math", math_accuracy, 1.0)])(
        [[{"role": "assistant", "content": t}] for t in texts], [False] * len(texts), {"solution": golds})
    assert not errors and parts["math"] == ours


def test_the_held_out_check_splits_the_teachers_difficulties_from_the_ones_past_them():
    """covered: digits and (word problems') steps both within the SFT teacher's; arithmetic has no steps."""
    import random

    from thinkfast.nano import tasks
    from thinkfast.stages.grpo import GRPOConfig, _difficulty

    cfg, rng = GRPOConfig(), random.Random(0)
    got = {(kind, d, s): _difficulty(cfg, tasks.sample_problem(rng, kind, d, s))
           for kind in ("add", "word") for d in (1, 2, 3) for s in (1, 2, 3)}
    assert {k for k, v in got.items() if v == "covered"} == {
        ("add", d, s) for d in (1, 2) for s in (1, 2, 3)} | {("word", d, s) for d in (1, 2) for s in (1, 2)}
    narrow = GRPOConfig(covered_digits=[1], covered_steps=[2])
    assert _difficulty(narrow, tasks.sample_problem(rng, "word", 1, 1)) == "beyond"
    assert _difficulty(narrow, tasks.sample_problem(rng, "mul", 1)) == "covered"


def test_curriculum_moves_from_easy_to_hard_and_uses_each_prompt_once_per_epoch():
    rates = [k / 8 for k in range(6) for _ in range(10)]  # pools 0 .. 5/8, 10 prompts each
    assert keep_hard([0.8, 0.75, 0.74]) == [2]
    half = gaussian_schedule(rates, range(60), 6, 5, sigma=0.1, seed=1)
    means = [statistics.fmean(rates[i] for i in b) for b in half]
    assert means[0] > 0.5 and means[-1] < 0.1 and means == sorted(means, reverse=True)
    assert len({i for b in half for i in b}) == 30
    batches = gaussian_schedule(rates, range(60), 6, 10, sigma=0.1, seed=1)
    flat = [i for b in batches for i in b]
    assert len(flat) == 60 and sorted(flat) == list(range(60))  # one epoch: each prompt exactly once
    assert gaussian_schedule(rates, range(60), 6, 10, sigma=0.1, seed=1) == batches  # deterministic
    more = gaussian_schedule(rates, range(60), 6, 15, sigma=0.1, seed=1)
    assert all(len(b) == 6 for b in more)  # a new epoch refills the pools
    rnd = random_schedule(range(60), 6, 10, seed=1)
    assert sorted(i for b in rnd for i in b) == list(range(60))


def test_rollout_record_lines_up_tokens_masks_and_logprobs():
    model = hetero_model(seed=7)
    prompts = [[9, 10, 11], [12, 13, 14, 15, 16]]
    roll = rollout(LocalBackend(model), prompts, 3, SamplingParams(max_new_tokens=8, temperature=1.0, stop_token_ids=(0, 1, 2),
                                                     seed=0))
    assert roll.groups == [0, 0, 0, 1, 1, 1] and len(roll) == 6
    b = roll.batch()
    assert b["input_ids"].shape[1] == 5 + max(len(c.token_ids) for c in roll.completions)
    for i, c in enumerate(roll.completions):
        row = b["input_ids"][i][b["completion_mask"][i].bool()].tolist()
        assert row == c.token_ids
    with torch.no_grad():
        full = token_logprobs(model, b)
        tail = token_logprobs(model, b, b["prompt_width"])  # the LM head on the completions only
    m = b["completion_mask"].bool()
    assert torch.allclose(full[m], b["sampler_logprobs"][m], atol=1e-4)  # recomputed == sampler's
    assert torch.allclose(tail[m], full[m], atol=1e-6) and (tail[:, :b["prompt_width"]] == 0).all()


def _pipe(run, *extra):
    return load_pipeline(default_config_path("smoke"), [
        f"run_dir={run}", "stages=[pretrain,sft,grpo]", "pretrain.train_steps=2", "sft.nano_prompts=8",
        "sft.batch_size=4", "sft.seq_len=256", "sft.eval_problems=0", "sft.digits=[1]", "sft.steps=[1]",
        "grpo.prompts=12", "grpo.digits=[1]", "grpo.steps=[1]", "grpo.group_size=3", "grpo.prompts_per_step=2",
        "grpo.train_steps=4", "grpo.max_new_tokens=12", "grpo.pass_rate_samples=2", "grpo.eval_problems=2",
        "grpo.eval_every=2", "grpo.eval_max_new_tokens=8", "grpo.checkpoint_every=2", "grpo.lr=0.01",
        "grpo.easy_threshold=1.0", *extra])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("grpo") / "base"
    pipe = _pipe(run)
    run_stage(pipe, "pretrain")
    run_stage(pipe, "sft")
    return run


def _copy_base(sft_run, dst):
    import shutil

    shutil.copytree(sft_run, dst, symlinks=True)
    return dst


def test_grpo_stage_runs_and_resumes_to_the_same_weights(sft_run, tmp_path, monkeypatch):
    ref_run = _copy_base(sft_run, tmp_path / "ref")
    m, _ = run_stage(_pipe(ref_run, "grpo.kl_beta=0.1"), "grpo")
    assert m["steps"] == 4 and m["prompts"] == 12 and "accuracy_on_after" in m
    curve = json.loads((ref_run / "grpo" / "curve.json").read_text())
    # the held-out check apart on the SFT data's difficulties and past them (the student against its teacher)
    groups = curve["points"][-1]["on"]["groups"]
    assert set(groups) <= {"covered", "beyond"} and sum(g["n"] for g in groups.values()) == 2
    assert all(f"accuracy_on_{g}_before" in m and f"accuracy_on_{g}_after" in m for g in groups)
    assert [p["step"] for p in curve["points"]] == [0, 2, 4] and len(curve["steps"]) == 4
    assert {"reward", "pass_rate", "kl", "clip_fraction", "response_tokens", "format_ok"} <= set(curve["steps"][0])
    assert json.loads((ref_run / "grpo" / "pass_rates.json").read_text())["samples"] == 2
    want = load_file(ref_run / "grpo" / "model" / "model.safetensors")

    run = _copy_base(sft_run, tmp_path / "run")
    real, calls = train_loop.optimizer_step, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 6:  # step 3's second update: after the checkpoint at step 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_loop, "optimizer_step", failing)
    with pytest.raises(KeyboardInterrupt):
        run_stage(_pipe(run, "grpo.kl_beta=0.1"), "grpo")
    monkeypatch.setattr(train_loop, "optimizer_step", real)
    run_stage(_pipe(run, "grpo.kl_beta=0.1"), "grpo")
    got = load_file(run / "grpo" / "model" / "model.safetensors")
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k


def test_pass_rates_are_reused_only_for_the_same_model_prompts_and_sampling(sft_run, tmp_path, monkeypatch):
    first = _copy_base(sft_run, tmp_path / "first")
    run_stage(_pipe(first, "grpo.train_steps=1", "grpo.eval_problems=0"), "grpo")
    measured = json.loads((first / "grpo" / "pass_rates.json").read_text())

    def no_measuring(*a, **k):
        raise AssertionError("pass rates measured again")

    monkeypatch.setattr(grpo_stage, "sample_rates", no_measuring)
    # another run directory that brings the same weights in through its own parent stage (the ablation's case)
    other = tmp_path / "other"
    reuse = f"grpo.pass_rates_from={first / 'grpo' / 'pass_rates.json'}"
    pipe = _pipe(other, "stages=[parent,grpo]", f"parent.path={sft_run / 'sft' / 'model'}", "grpo.train_steps=1",
                 "grpo.eval_problems=0", "grpo.curriculum=random", reuse)
    run_stage(pipe, "parent")
    run_stage(pipe, "grpo")
    assert json.loads((other / "grpo" / "pass_rates.json").read_text()) == measured
    with pytest.raises(ValueError, match="measured on another model, other prompts"):
        run_stage(_pipe(_copy_base(sft_run, tmp_path / "bad"), "grpo.train_steps=1", "grpo.eval_problems=0",
                        "grpo.prompts=10", reuse), "grpo")
    # a file written before malformed rates were recorded serves the random order, not malformed_first
    old = tmp_path / "old_rates.json"
    old.write_text(json.dumps({k: v for k, v in measured.items() if k != "malformed_rates"}))
    with pytest.raises(ValueError, match="no malformed_rates"):
        run_stage(_pipe(_copy_base(sft_run, tmp_path / "old"), "grpo.train_steps=1", "grpo.eval_problems=0",
                        "grpo.reinforce=passing", "grpo.unsolved_per_step=2", "grpo.unsolved_order=malformed_first",
                        f"grpo.pass_rates_from={old}"), "grpo")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sft_run, tmp_path, monkeypatch):
    run = _copy_base(sft_run, tmp_path / "nan")
    real, calls = grpo_lib.grpo_loss, []

    def nan_at_step_3(*a, **k):
        calls.append(1)
        loss, st = real(*a, **k)
        return (loss * float("nan") if len(calls) >= 5 else loss), st

    monkeypatch.setattr(grpo_lib, "grpo_loss", nan_at_step_3)
    with pytest.raises(FloatingPointError, match="loss is nan at step 3.*last good checkpoint"):
        run_stage(_pipe(run, "grpo.kl_beta=0.1"), "grpo")  # (with a KL term every step updates)
    from thinkfast.train.checkpoint import load_state

    state = load_state(run / "grpo.partial" / "checkpoint", "cpu")
    assert int(state["step"]) == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_user_reward_by_module_path(sft_run, tmp_path):
    run = _copy_base(sft_run, tmp_path / "user")
    m, _ = run_stage(_pipe(run, "grpo.rewards=[nano_accuracy,test_grpo:trl_style_length_reward]",
                           "grpo.train_steps=1", "grpo.eval_problems=0"), "grpo")
    steps = json.loads((run / "grpo" / "curve.json").read_text())["steps"]
    assert "reward_test_grpo:trl_style_length_reward" in steps[0]
    with pytest.raises(ValueError, match="cannot load"):
        load_reward("no_such_module:f")


def wants_prompt(completions, prompt, **kwargs):
    """A reward asking for the prompt by the file's field name (thinkfast, as TRL, passes it as ``prompts``)."""
    return [0.0] * len(completions)


def contains_target(completions, target, **kwargs):
    """A user reward reading a column of the prompt file (TRL signature)."""
    return [1.0 if str(t) in c[0]["content"] else 0.0 for c, t in zip(completions, target)]


def test_prompts_from_files_reach_the_rewards_with_their_columns(sft_run, tmp_path):
    from thinkfast.data import DataError
    from thinkfast.pipeline import ConfigError

    rows = [{"prompt": f"What is {i} + {i}?", "target": str(2 * i)} for i in range(6)]
    rows += [{"input": [{"role": "user", "content": "Say 7."}], "reasoning": "off", "target": "7"},
             {"prompt": [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "9?"}],
              "target": "9"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = _copy_base(sft_run, tmp_path / "files")
    opts = [f"grpo.files=[{data}]", "grpo.rewards=[test_grpo:contains_target,think_format]", "grpo.eval_problems=2",
            "grpo.train_steps=2", "grpo.eval_every=2"]
    m, _ = run_stage(_pipe(run, *opts), "grpo")
    assert m["prompts"] == 6 and "held_out_pass_after" in m  # 8 rows, 2 held out
    curve = json.loads((run / "grpo" / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2] and curve["points"][0]["held_out"]["n"] == 2
    assert "reward_test_grpo:contains_target" in curve["steps"][0] and curve["steps"][0]["pass_rate"] is not None
    assert len(json.loads((run / "grpo" / "pass_rates.json").read_text())["pass_rates"]) == 6
    # a reward needing a column the rows lack is an error before any work, in the file's terms: the argument,
    # the file and its fields (not thinkfast's internal column names), and the fix
    with pytest.raises(DataError) as e:
        run_stage(_pipe(_copy_base(sft_run, tmp_path / "f2"), *opts, "grpo.rewards=[nano_accuracy]"), "grpo")
    msg = str(e.value)
    assert msg.startswith("grpo.rewards: nano_accuracy requires the keyword argument(s) answer, which no prompt "
                          f"column supplies: {data} has the fields prompt, target, input, reasoning (")
    assert "Fix: add a field 'answer' to every row; or give the argument(s) a default" in msg
    assert "thinking (the mode, True or False)" in msg and "\n" not in msg
    with pytest.raises(DataError, match=r"argument\(s\) prompt, .*rename the argument 'prompt' to 'prompts'"):
        run_stage(_pipe(_copy_base(sft_run, tmp_path / "f2b"), *opts, "grpo.rewards=[test_grpo:wants_prompt]"),
                  "grpo")
    # a bad row names its file and line; skip_bad_rows skips it
    data.write_text(data.read_text() + json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl line 9: prompt must end with a user message"):
        run_stage(_pipe(_copy_base(sft_run, tmp_path / "f3"), *opts), "grpo")
    m, _ = run_stage(_pipe(_copy_base(sft_run, tmp_path / "f4"), *opts, "grpo.skip_bad_rows=true"), "grpo")
    assert m["prompts"] == 6
    with pytest.raises(ConfigError, match="grpo.files"):
        run_stage(_pipe(_copy_base(sft_run, tmp_path / "f5"), *opts, "grpo.files=[nowhere/*.jsonl]"), "grpo")


def test_shared_prompt_forward_equals_the_full_one_with_gradients():
    from thinkfast.rl.rollout import grouped_logprobs

    model = hetero_model(seed=8).train()
    prompts = [[9, 10, 11], [12, 13, 14, 15, 16], [20]]
    roll = rollout(LocalBackend(model), prompts, 4, SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=(0, 1),
                                                     seed=1))
    b = roll.batch()
    start = b["prompt_width"]
    sel = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])  # a slice of whole groups, as the updates take
    sub = {k: v[sel] for k, v in b.items() if k != "prompt_width"}
    grads = []
    for fn in (lambda: token_logprobs(model, sub, start), lambda: grouped_logprobs(model, sub, start)):
        model.zero_grad()
        lp = fn()
        (lp * sub["completion_mask"]).sum().backward()
        grads.append((lp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    m = sub["completion_mask"].bool()
    assert torch.allclose(grads[0][0][m], grads[1][0][m], atol=1e-5)
    for a, c in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, c, atol=1e-5)


def test_log_probs_through_the_lm_head_in_slices_equal_the_full_logits_with_gradients():
    from thinkfast.rl.rollout import grouped_logprobs

    model = hetero_model(seed=8).train()
    roll = rollout(LocalBackend(model), [[9, 10, 11], [12, 13, 14, 15, 16]], 3,
                   SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=(0, 1), seed=1))
    b = roll.batch()
    start = b.pop("prompt_width")

    def full_logits():  # the model's own logits, log-softmaxed whole
        t = b["input_ids"].shape[1]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                       logits_to_keep=t - start + 1).logits[:, :-1].float()
        lp = logits.log_softmax(-1).gather(-1, b["input_ids"][:, start:, None]).squeeze(-1)
        return torch.nn.functional.pad(lp, (start, 0))

    runs = []
    for fn in (full_logits, lambda: token_logprobs(model, b, start), lambda: token_logprobs(model, b, start, budget=1),
               lambda: grouped_logprobs(model, b, start, budget=1)):
        model.zero_grad()
        lp = fn()
        (lp * b["completion_mask"]).sum().backward()
        runs.append((lp.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    m = b["completion_mask"].bool()
    for lp, grads in runs[1:]:
        assert torch.allclose(runs[0][0][m], lp[m], atol=1e-5)
        assert len(grads) == len(runs[0][1]) and all(torch.allclose(a, c, atol=1e-5) for a, c in zip(runs[0][1], grads))


def test_a_step_without_signal_leaves_the_weights_alone():
    from thinkfast.rl.grpo import grpo_step
    from thinkfast.train.loop import adamw

    model = hetero_model(seed=9)
    opt = adamw(model, lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = RewardRunner([("zero", lambda completions, **kw: [0.0] * len(completions), 1.0)])
    rec, _ = grpo_step(model, opt, [[9, 10, 11], [12, 13]], {}, runner,
                       SamplingParams(max_new_tokens=5, temperature=1.0, seed=0), group_size=3, decode=str,
                       updates=2, conversational=False)
    assert rec["updates"] == 0 and rec["groups_with_signal"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def always_fails(completions, **kwargs):
    """A user reward with a bug: it raises on every call."""
    return [1 / 0 for _ in completions]


def fails_every_other_call(completions, **kwargs):
    """A flaky user reward: calls 1, 3, 5, ... raise (``fails_every_other_call.calls`` counts them)."""
    fails_every_other_call.calls += 1
    if fails_every_other_call.calls % 2:
        raise ConnectionError("judge unreachable\nsecond line of the message")
    return [0.5] * len(completions)


fails_every_other_call.calls = 0


def test_a_reward_failing_on_every_call_stops_the_run_and_keeps_the_checkpoint(sft_run, tmp_path, capsys):
    from thinkfast.rl.rewards import RewardFailed
    from thinkfast.train.checkpoint import load_state

    run = _copy_base(sft_run, tmp_path / "fails")
    with pytest.raises(RewardFailed) as e:  # max_failing_steps: 3 by default; a checkpoint every 2 steps
        run_stage(_pipe(run, "grpo.rewards=[nano_accuracy,test_grpo:always_fails]", "grpo.eval_problems=0",
                        "grpo.kl_beta=0.1"), "grpo")
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg  # the CLI prints it as one line (exit 2)
    assert msg.startswith("grpo: reward test_grpo:always_fails failed on every call for 3 steps in a row (steps "
                          "1-3; grpo.max_failing_steps=3), last error: ZeroDivisionError: division by zero. "
                          "Stopped without saving: the last checkpoint (")
    state = load_state(run / "grpo.partial" / "checkpoint", "cpu")
    assert int(state["step"]) == 2 and [s["reward_failed"] for s in state["steps"]] == [
        {"test_grpo:always_fails": "ZeroDivisionError: division by zero"}] * 2
    err = capsys.readouterr().err
    assert err.count("warning: reward test_grpo:always_fails failed") == 1  # once, not once per step
    assert "failed at step 1: ZeroDivisionError: division by zero. It counts 0" in err
    lines = [json.loads(x) for x in (run / "grpo.partial" / "log.jsonl").read_text().splitlines()]
    errors = [x for x in lines if x["event"] == "reward_error"]
    assert [(x["step"], x["reward"]) for x in errors] == [(s, "test_grpo:always_fails") for s in (1, 2, 3)]
    assert "always_fails" in errors[0]["detail"]  # the traceback stays in the log

    # 0 never stops: the run completes and metrics.json counts the failures
    run = _copy_base(sft_run, tmp_path / "counted")
    m, _ = run_stage(_pipe(run, "grpo.rewards=[nano_accuracy,test_grpo:always_fails]", "grpo.eval_problems=0",
                           "grpo.max_failing_steps=0"), "grpo")
    assert m["reward_errors"] == {"nano_accuracy": {"calls": 4, "failed": 0}, "test_grpo:always_fails": {
        "calls": 4, "failed": 4, "last_error": "ZeroDivisionError: division by zero"}}
    assert json.loads((run / "grpo" / "metrics.json").read_text())["reward_errors"] == m["reward_errors"]
    err = capsys.readouterr().err
    assert err.count("warning: reward test_grpo:always_fails") == 1
    assert "grpo: reward test_grpo:always_fails failed 4 of 4 calls (last error: ZeroDivisionError" in err


def test_a_reward_failing_sometimes_is_counted_and_the_run_goes_on(sft_run, tmp_path, capsys):
    fails_every_other_call.calls = 0
    run = _copy_base(sft_run, tmp_path / "flaky")
    m, _ = run_stage(_pipe(run, "grpo.rewards=[nano_accuracy,test_grpo:fails_every_other_call]",
                           "grpo.eval_problems=0", "grpo.max_failing_steps=2"), "grpo")
    assert fails_every_other_call.calls == 4  # once per step: steps 1 and 3 failed, never 2 in a row
    assert m["steps"] == 4 and m["reward_errors"]["test_grpo:fails_every_other_call"] == {
        "calls": 4, "failed": 2, "last_error": "ConnectionError: judge unreachable second line of the message"}
    steps = json.loads((run / "grpo" / "curve.json").read_text())["steps"]
    assert [bool(s["reward_failed"]) for s in steps] == [True, False, True, False]
    assert [s["reward_test_grpo:fails_every_other_call"] for s in steps] == [0.0, 0.5, 0.0, 0.5]
    err = capsys.readouterr().err
    assert err.count("warning: reward test_grpo:fails_every_other_call failed at step 1") == 1
    assert "failed 2 of 4 calls" in err


def test_a_pass_reward_that_fails_measuring_pass_rates_stops_before_training(sft_run, tmp_path):
    from thinkfast.rl.rewards import RewardFailed

    run = _copy_base(sft_run, tmp_path / "pass")
    with pytest.raises(RewardFailed, match=r"^grpo: the pass reward test_grpo:always_fails failed while measuring "
                       r"the pass rates before training \(ZeroDivisionError: division by zero\); it would count "
                       r"every prompt unsolved"):
        run_stage(_pipe(run, "grpo.rewards=[nano_accuracy,test_grpo:always_fails]",
                        "grpo.pass_reward=test_grpo:always_fails"), "grpo")
    assert not (run / "grpo.partial" / "pass_rates.json").exists()  # no rates of 0 saved for reuse


def test_max_failing_steps_is_validated(tmp_path):
    from thinkfast.config import ConfigError

    with pytest.raises(ConfigError, match=r"max_failing_steps=-1 must be >= 0 \(0 or null: never stop"):
        _pipe(tmp_path, "grpo.max_failing_steps=-1")
    assert _pipe(tmp_path, "grpo.max_failing_steps=null").configs["grpo"].max_failing_steps is None


def fails_on_two(completions, target, **kwargs):
    """Fails only on the 2 greedy answers of the held-out check (the training calls have 6 completions)."""
    if len(completions) == 2:
        raise RuntimeError("held-out failure")
    return [1.0 if str(t) in c[0]["content"] else 0.0 for c, t in zip(completions, target)]


def test_a_pass_reward_failing_in_the_held_out_check_gives_an_unknown_pass_rate_not_0(sft_run, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "target": str(2 * i)}) + "\n"
                            for i in range(8)))
    run = _copy_base(sft_run, tmp_path / "held")
    m, _ = run_stage(_pipe(run, f"grpo.files=[{data}]", "grpo.rewards=[test_grpo:fails_on_two]",
                           "grpo.eval_problems=2", "grpo.train_steps=2", "grpo.eval_every=2"), "grpo")
    assert m["held_out_pass_before"] is None and m["held_out_pass_after"] is None
    assert m["reward_errors"] == {"test_grpo:fails_on_two": {"calls": 2, "failed": 0}}  # training calls only
    assert capsys.readouterr().err.count("reward test_grpo:fails_on_two failed at step 0 (held-out check): "
                                        "RuntimeError: held-out failure") == 1
    errors = [json.loads(x) for x in (run / "grpo" / "log.jsonl").read_text().splitlines()]
    assert [(x["step"], x["during"]) for x in errors if x["event"] == "reward_error"] == [(0, "held_out"),
                                                                                         (2, "held_out")]


def _never_right(completions, **kwargs):
    return [0.0] * len(completions)


def _third_malformed(completions, **kwargs):
    return [0.0 if i % 3 == 2 else 1.0 for i in range(len(completions))]


def _first_right(completions, **kwargs):
    return [1.0 if i % 3 == 0 else 0.0 for i in range(len(completions))]


@pytest.mark.parametrize("reinforce", ["all", "passing"])
def test_reinforce_passing_never_pushes_a_wrong_answer_up(reinforce, monkeypatch):
    # group 0 (prompt 0): no sample right, the third malformed; group 1 (prompt 1) alike, its first sample right
    seen = {}
    real = grpo_lib.policy_update

    def spy(model, opt, batch, groups, advantages, *a, **k):
        seen["adv"], seen["groups"] = advantages.clone(), groups.clone()
        return real(model, opt, batch, groups, advantages, *a, **k)

    def right_in_group_1(completions, **kwargs):
        return [1.0 if i == 3 else 0.0 for i in range(len(completions))]

    monkeypatch.setattr(grpo_lib, "policy_update", spy)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0, stop_token_ids=tuple(range(64)))
    model = hetero_model(seed=9)
    runner = RewardRunner([("acc", right_in_group_1, 1.0), ("fmt", _third_malformed, 1.0)])
    rec, errors = grpo_lib.grpo_step(model, train_loop.adamw(model, lr=0.1), [[9, 10, 11], [12, 13]], {}, runner,
                                     params, group_size=3, decode=str, conversational=False, pass_reward="acc",
                                     reinforce=reinforce)
    assert not errors
    adv, groups = seen["adv"], seen["groups"]
    assert groups.tolist() == [0, 0, 0, 1, 1, 1]
    want = group_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 1, 1, 1]))
    if reinforce == "passing":  # only the right answer keeps its positive advantage; every negative one stays
        want = torch.where((want > 0) & (torch.arange(6) != 3), torch.zeros(6), want)
        assert adv[0] == 0 and adv[1] == 0 and adv[2] < 0 and adv[3] > 0
    assert torch.allclose(adv, want)
    with pytest.raises(ValueError, match="reads pass_reward 'nope'"):
        grpo_lib.grpo_step(model, train_loop.adamw(model, lr=0.1), [[9, 10, 11]], {}, runner, params, group_size=3,
                           decode=str, conversational=False, pass_reward="nope", reinforce="passing")


def test_never_solved_prompts_join_every_step_for_the_format(sft_run, tmp_path):
    from thinkfast.config import ConfigError

    with pytest.raises(ConfigError, match="unsolved_per_step needs reinforce: passing"):
        _pipe(tmp_path, "grpo.unsolved_per_step=2")
    run = _copy_base(sft_run, tmp_path / "run")
    m, _ = run_stage(_pipe(run, "grpo.reinforce=passing", "grpo.unsolved_per_step=2",
                           "grpo.easy_threshold=0.75", "grpo.eval_problems=0"), "grpo")
    rates = json.loads((run / "grpo" / "pass_rates.json").read_text())["pass_rates"]
    never = sum(r == 0 for r in rates)
    steps = json.loads((run / "grpo" / "curve.json").read_text())["steps"]
    assert never and [s["unsolved_prompts"] for s in steps] == [min(2, never)] * 4


def test_malformed_first_draws_the_never_solved_prompts_whose_samples_broke_the_format(sft_run, tmp_path, monkeypatch):
    draws, draw = [], grpo_stage.unsolved_draw

    def spy(unsolved, first, n, rng, head=None):
        picks = draw(unsolved, first, n, rng, head=head)
        draws.append((list(first), picks))
        return picks

    monkeypatch.setattr(grpo_stage, "unsolved_draw", spy)
    run = _copy_base(sft_run, tmp_path / "run")
    run_stage(_pipe(run, "grpo.reinforce=passing", "grpo.unsolved_per_step=2", "grpo.unsolved_order=malformed_first",
                    "grpo.easy_threshold=0.75", "grpo.eval_problems=0"), "grpo")
    saved = json.loads((run / "grpo" / "pass_rates.json").read_text())
    rates, malformed = saved["pass_rates"], saved["malformed_rates"]
    assert len(malformed) == len(rates) == 12 and all(m * 2 in (0, 1, 2) for m in malformed)  # 2 samples each
    first = [i for i, r in enumerate(rates) if r == 0 and malformed[i] > 0]
    assert first, "the 2-step smoke child breaks the format somewhere"
    curriculum = next(json.loads(line) for line in (run / "grpo" / "log.jsonl").read_text().splitlines()
                      if json.loads(line).get("event") == "curriculum")
    assert curriculum["unsolved_malformed"] == len(first)
    assert len(draws) == 4 and all(f == first for f, _ in draws)
    for _, picks in draws:  # the malformed ones come first, the rest fill up
        k = min(2, len(first))
        assert set(picks[:k]) <= set(first) and len(set(picks)) == len(picks) == min(2, sum(r == 0 for r in rates))
