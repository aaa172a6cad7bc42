"""The policy-gradient core (thinkfast.rl.advantages, thinkfast.rl.policy): group-normalised and leave-one-out
advantages by hand, unscorable samples (every reward None) left out of the baselines and of the loss."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from thinkfast.generation import LocalBackend
from thinkfast.rl.advantages import group_normalised_advantages, leave_one_out_advantages, rewards_tensor
from thinkfast.rl.grpo import grpo_loss
from thinkfast.rl.policy import policy_update
from thinkfast.rl.rewards import RewardRunner

NAN = float("nan")


def test_leave_one_out_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    a = leave_one_out_advantages(r, g)
    # group 0: baselines (0+0+2)/3, (1+0+2)/3, (1+0+2)/3, (1+0+0)/3; group 1: 1 and 3
    want = [1 - 2 / 3, 0 - 1, 0 - 1, 2 - 1 / 3, 3 - 1, 1 - 3]
    assert a.tolist() == pytest.approx(want, abs=1e-6)
    # the leave-one-out advantages are the group-centred ones scaled by k/(k-1)
    assert torch.allclose(a[:4], (r[:4] - r[:4].mean()) * 4 / 3)
    assert leave_one_out_advantages(torch.tensor([5.0]), torch.tensor([0])).tolist() == [0.0]  # no peer


def test_an_unscorable_sample_is_left_out_of_its_groups_baseline():
    r = torch.tensor([1.0, 0.0, NAN, 0.0, 4.0, 2.0, NAN, NAN])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    a = group_normalised_advantages(r, g, eps=0.0)
    # group 0 is {1, 0, 0}: mean 1/3, sample std sqrt(1/3); counted as a 0 instead, the baseline would be 1/4
    m, s = 1 / 3, statistics.stdev([1, 0, 0])
    want = [(1 - m) / s, -m / s, 0.0, -m / s, 1 / math.sqrt(2), -1 / math.sqrt(2), 0.0, 0.0]
    assert a.tolist() == pytest.approx(want, abs=1e-6)
    assert a[2] == 0 and a[6] == 0 and a[7] == 0  # an unscorable group: nothing
    loo = leave_one_out_advantages(r, g)
    assert loo.tolist() == pytest.approx([1.0, -0.5, 0.0, -0.5, 2.0, -2.0, 0.0, 0.0], abs=1e-6)


def _none_for_the_third(completions, **kwargs):
    return [None if i == 2 else float(len(c) % 2) for i, c in enumerate(completions)]


def _format(completions, **kwargs):
    return [None if i == 2 else 0.5 for i in range(len(completions))]


def _never(completions, **kwargs):
    return [None] * len(completions)


def test_reward_runner_none_is_unscorable_not_0():
    texts = ["a", "bb", "ccc", "dddd"]
    # one reward: the third sample cannot be scored, even when truncated
    total, parts, errors = RewardRunner([("odd", _none_for_the_third, 1.0)])(texts, [False] * 4, {})
    assert not errors and total == [1.0, 0.0, None, 0.0] and parts["odd"] == [1.0, 0.0, None, 0.0]
    total, _, _ = RewardRunner([("odd", _none_for_the_third, 1.0)])(texts, [True] * 4, {})
    assert total == [0.0, 0.0, None, 0.0]  # truncated: 0 where scorable
    # several weighted rewards: a None drops that reward's term only (TRL's nansum); all None: unscorable
    total, parts, _ = RewardRunner([("odd", _none_for_the_third, 2.0), ("never", _never, 1.0),
                                    ("fmt", _format, 0.5)])(texts, [False] * 4, {})
    assert total == [2.25, 0.25, None, 0.25] and parts["never"] == [None] * 4
    # into the advantages: the unscorable sample is out of the baseline of its group of 4
    a = group_normalised_advantages(rewards_tensor(total), torch.zeros(4, dtype=torch.long), eps=0.0)
    m, s = statistics.fmean([2.25, 0.25, 0.25]), statistics.stdev([2.25, 0.25, 0.25])
    assert a.tolist() == pytest.approx([(2.25 - m) / s, (0.25 - m) / s, 0.0, (0.25 - m) / s], abs=1e-6)


class _Table(torch.nn.Module):
    """A "policy" whose per-token log-probs are a table: row i of the batch reads ``theta[row[i]]``."""

    def __init__(self, n: int, t: int):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.log(torch.full((n, t), 0.5)))


def _logprobs_of(m, batch):
    return m.theta[batch["row"]]


def test_policy_update_leaves_unscorable_samples_out_of_the_loss():
    n, t = 3, 2
    batch = {"input_ids": torch.zeros(n, t, dtype=torch.long), "row": torch.arange(n),
             "completion_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]),
             "sampler_logprobs": torch.zeros(n, t)}
    rewards = torch.tensor([1.0, 0.0, NAN])
    adv = group_normalised_advantages(rewards, torch.zeros(n, dtype=torch.long), eps=0.0)
    model = _Table(n, t)
    seen = []

    def loss_fn(logp, old, advantages, mask, ref):
        loss, st = grpo_loss(logp, old, advantages, mask, ref_logp=ref)
        seen.append((len(logp), float(loss.detach())))
        return loss, st

    before = model.theta.detach().clone()
    losses, stats = policy_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch,
                                  torch.zeros(n, dtype=torch.long), adv, loss_fn, logprobs_of=_logprobs_of,
                                  scorable=~torch.isnan(rewards), grad_clip=None)
    # ratio 1 (old = the first update's own log-probs): the loss is minus the mean advantage over the 3 scored
    # tokens (2 of sample 0, 1 of sample 1); with sample 2's tokens counted it would be over 5
    a = 1 / math.sqrt(2)
    assert seen == [(2, pytest.approx(-(2 * a - a) / 3))] and losses == [pytest.approx(-a / 3)] and len(stats) == 1
    assert torch.equal(model.theta.detach()[2], before[2])  # the unscorable row did not move
    assert not torch.equal(model.theta.detach()[0], before[0])
    # all scorable: the same step over every row
    seen.clear()
    other = _Table(n, t)
    policy_update(other, torch.optim.SGD(other.parameters(), lr=1.0), batch,
                  torch.zeros(n, dtype=torch.long), torch.tensor([1.0, -1.0, 0.0]), loss_fn,
                  logprobs_of=_logprobs_of, grad_clip=None)
    assert seen == [(3, pytest.approx(-(2 - 1) / 5))]


def test_a_grpo_step_scores_and_trains_on_scorable_samples_only():
    from test_modeling import hetero_model

    from thinkfast.generation import SamplingParams
    from thinkfast.rl.grpo import grpo_step
    from thinkfast.train.loop import adamw

    def first_of_each_group_unscorable(completions, **kwargs):  # groups of 3: samples 0, 3 are unscorable
        return [None if i % 3 == 0 else float(i % 3 == 1) for i in range(len(completions))]

    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=0, stop_token_ids=tuple(range(64)))
    model = hetero_model(seed=9)
    rec, errors = grpo_step(model, adamw(model, lr=0.1), [[9, 10, 11], [12, 13]], {},
                            RewardRunner([("r", first_of_each_group_unscorable, 1.0)]), params, group_size=3,
                            decode=str, conversational=False, pass_reward="r")
    assert not errors and rec["reward"] == 0.5 and rec["reward_r"] == 0.5  # over the 4 scored samples
    assert rec["groups_with_signal"] == 2 and rec["updates"] == 1
    # nothing scorable: no signal, no update, no reward
    model = hetero_model(seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec, _ = grpo_step(model, adamw(model, lr=0.1), [[9, 10, 11], [12, 13]], {},
                       RewardRunner([("r", lambda completions, **kw: [None] * len(completions), 1.0)]), params,
                       group_size=3, decode=str, conversational=False, pass_reward="r")
    assert rec["reward"] is None and rec["pass_rate"] == 0.0 and rec["updates"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rloo_is_a_thin_use_of_the_core():
    """REINFORCE leave-one-out as the next stage will run it: the same sampling, scoring and policy step as
    GRPO, with leave-one-out advantages and no clipping (REFERENCE.md section 6)."""
    from test_modeling import hetero_model

    from thinkfast.generation import SamplingParams
    from thinkfast.rl.policy import sample_and_score
    from thinkfast.rl.rollout import token_logprobs
    from thinkfast.train.loop import adamw

    def reward(completions, **kwargs):
        return [float(len(c) % 4) for c in completions]

    model = hetero_model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scored = sample_and_score(LocalBackend(model), [[9, 10, 11], [12, 13]], {}, RewardRunner([("r", reward, 1.0)]),
                              SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=(5, 6, 7, 8)),
                              group_size=4, decode=str, conversational=False)
    groups = torch.tensor(scored.rollout.groups)
    adv = leave_one_out_advantages(rewards_tensor(scored.total), groups)
    r = [[v for v, g in zip(scored.total, scored.rollout.groups) if g == k] for k in (0, 1)]
    assert adv.tolist() == pytest.approx([x - (sum(rs) - x) / 3 for rs in r for x in rs], abs=1e-6)
    assert adv.abs().max() > 0
    batch = scored.rollout.batch()
    start = batch.pop("prompt_width")
    losses, stats = policy_update(
        model, adamw(model, lr=0.05), batch, groups, adv,
        lambda logp, old, a, mask, ref: grpo_loss(logp, old, a, mask, clip_eps=1e9, ref_logp=ref),
        logprobs_of=lambda m, b: token_logprobs(m, b, start), grad_clip=None)
    assert len(losses) == 1 and stats[0]["clip_fraction"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
