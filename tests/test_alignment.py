"""RLOO and preference steps (issue 25): the leave-one-out step with unscorable and truncated samples, the KL folded
into the reward, the token-level loss by hand; pair batches and one DPO / RPO step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_modeling import hetero_model

from thinkfast.generation import LocalBackend, SamplingParams
from thinkfast.rl import rloo as rloo_lib
from thinkfast.rl.rewards import RewardRunner
from thinkfast.rl.rloo import kl_penalised_rewards, rloo_loss, rloo_step
from thinkfast.rl.rollout import token_logprobs
from thinkfast.rl.rpo import packed_pair_batch, pair_batch, preference_step, sequence_logps
from thinkfast.train.loop import adamw


def test_rloo_loss_by_hand_with_and_without_clipping():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss, st = rloo_loss(logp, old, adv, mask)
    e = torch.e
    want = -(e ** 0.5 * 1 + 1 * 1 + e ** -0.5 * -2) / 3
    assert float(loss) == pytest.approx(want, rel=1e-6) and st["clip_fraction"] == 0.0
    loss, st = rloo_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 0 of row 0: min(1.6487, 1.2) * 1 = 1.2; row 1: min(0.6065 * -2, 0.8 * -2) = -1.6
    assert float(loss) == pytest.approx(-(1.2 + 1.0 - 1.6) / 3, rel=1e-6)
    assert st["clip_fraction"] == pytest.approx(2 / 3)


def test_kl_is_folded_into_the_reward_per_sequence():
    r, kl = kl_penalised_rewards(torch.tensor([1.0, 0.0]), torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0]]),
                                 torch.tensor([[-1.5, -2.5, 0.0], [-1.0, -1.0, -1.0]]),
                                 torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), 0.5)
    assert kl.tolist() == [1.0, 0.0] and r.tolist() == [0.5, 0.0]  # the padded token's log-prob does not count


def _scripted_reward(values):
    def reward(completions, **kw):
        return list(values)
    return reward


def test_rloo_step_leaves_truncated_and_unscorable_samples_out_of_baseline_and_gradient(monkeypatch):
    model = hetero_model(seed=3)
    opt = adamw(model, lr=1e-3)
    seen = {}
    real = rloo_lib.policy_update

    def spy(model, opt, batch, groups, adv, loss_fn, **kw):
        seen.update(adv=adv.clone(), scorable=kw["scorable"].clone(), groups=groups.clone())
        return real(model, opt, batch, groups, adv, loss_fn, **kw)

    monkeypatch.setattr(rloo_lib, "policy_update", spy)
    real_sample = rloo_lib.sample_and_score

    def sample_spy(*a, **k):
        seen["scored"] = real_sample(*a, **k)
        return seen["scored"]

    monkeypatch.setattr(rloo_lib, "sample_and_score", sample_spy)
    # 2 prompts x 4 samples; sample 1 unscorable (None), and whatever the sampler truncates is unscorable too
    rewards = [1.0, None, 0.0, 2.0, 3.0, 1.0, 1.0, 1.0]
    runner = RewardRunner([("r", _scripted_reward(rewards), 1.0)])
    params = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=(3, 4, 5, 6, 7, 8), seed=1)
    record, errors = rloo_step(model, opt, [[9, 10, 11], [12, 13]], {}, runner, params, group_size=4,
                               decode=lambda ids: str(ids), backend=LocalBackend(model))
    assert not errors
    truncated = seen["scored"].truncated  # from the rollout itself, not from what rloo_step decided
    assert any(truncated) and not all(truncated)  # the case under test occurs
    want = [v is not None and not t for v, t in zip(rewards, truncated)]
    assert seen["scorable"].tolist() == want
    r = torch.tensor([float("nan") if not ok else v for v, ok in zip(rewards, want)])
    for g in (0, 1):  # hand leave-one-out over each group's scorable samples
        idx = [i for i in range(4 * g, 4 * g + 4) if r[i] == r[i]]
        for i in range(4 * g, 4 * g + 4):
            if i not in idx or len(idx) < 2:
                assert seen["adv"][i] == 0
            else:
                others = [float(r[j]) for j in idx if j != i]
                assert float(seen["adv"][i]) == pytest.approx(float(r[i]) - sum(others) / len(others))
    assert seen["scorable"][1].item() is False  # the None reward
    assert record["scorable"] == pytest.approx(float(seen["scorable"].float().mean()))


def test_rloo_step_pushes_up_only_passing_samples_in_the_groups_marked_passing_only(monkeypatch):
    """passing_only marks prompt 1 (a plain task prompt among instruction prompts): there a sample above its
    siblings' mean gets a positive advantage only when every reward that scored it gave >= 1 (and it was not cut
    off); prompt 0's groups keep plain leave-one-out. The IFEval-like reward leaves prompt 1's samples unscored."""
    model = hetero_model(seed=5)
    opt = adamw(model, lr=1e-3)
    seen = {}
    real = rloo_lib.policy_update

    def spy(model, opt, batch, groups, adv, loss_fn, **kw):
        seen["adv"] = adv.clone()
        return real(model, opt, batch, groups, adv, loss_fn, **kw)

    monkeypatch.setattr(rloo_lib, "policy_update", spy)
    real_sample = rloo_lib.sample_and_score

    def sample_spy(*a, **k):  # every sample finished, whatever the tiny model sampled
        scored = real_sample(*a, **k)
        seen["scored"] = dataclasses.replace(scored, truncated=[False] * 8, total=[
            sum(v for v in vs if v is not None) for vs in zip(instr, accuracy, fmt)])
        return seen["scored"]

    monkeypatch.setattr(rloo_lib, "sample_and_score", sample_spy)
    accuracy = [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    fmt = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    instr = [1.0, 0.0, 1.0, 0.0, None, None, None, None]
    runner = RewardRunner([("instr", _scripted_reward(instr), 1.0), ("acc", _scripted_reward(accuracy), 1.0),
                           ("fmt", _scripted_reward(fmt), 1.0)])
    params = SamplingParams(max_new_tokens=3, temperature=1.0, stop_token_ids=(), seed=1)
    rloo_step(model, opt, [[9, 10, 11], [12, 13]], {}, runner, params, group_size=4, decode=lambda ids: str(ids),
              backend=LocalBackend(model), passing_only=[False, True])
    assert rloo_lib.passes(seen["scored"]) == [False, False, False, False, True, False, False, False]
    adv = seen["adv"].tolist()
    # prompt 1: sample 4 (correct, well formed) passes and goes up; sample 5 (wrong, well formed) is above its
    # siblings' mean (1 against 2/3) but never pushed up; samples 6 and 7 (wrong, malformed) are pushed down
    assert adv[4] == pytest.approx(2 - 1 / 3) and adv[5] == 0 and adv[6:] == pytest.approx([-1.0, -1.0])
    # prompt 0 keeps plain leave-one-out: sample 0 (instruction followed, wrong answer) still goes up
    assert adv[:4] == pytest.approx([2 - 4 / 3, 2 - 4 / 3, 1 - 5 / 3, 1 - 5 / 3])


def test_rloo_step_with_reference_equal_to_policy_has_zero_kl():
    model = hetero_model(seed=4)
    ref = copy.deepcopy(model).requires_grad_(False)
    opt = adamw(model, lr=1e-3)
    runner = RewardRunner([("len", lambda completions, **kw: [float(len(c)) for c in completions], 1.0)])
    params = SamplingParams(max_new_tokens=5, temperature=1.0, stop_token_ids=(3, 4, 5, 6), seed=2)
    record, _ = rloo_step(model, opt, [[9, 10, 11]], {}, runner, params, group_size=4, decode=lambda ids: "x" * len(ids),
                          kl_beta=0.1, reference=ref, conversational=False)
    assert record["kl"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="needs the reference"):
        rloo_step(model, opt, [[9]], {}, runner, params, group_size=2, decode=str, kl_beta=0.1)


def test_pair_batch_log_probs_equal_each_sequence_alone():
    model = hetero_model(seed=5)
    prompts, chosen, rejected = [[9, 10, 11], [12]], [[20, 21], [22, 23, 24]], [[25], [26, 27]]
    b = pair_batch(prompts, chosen, rejected, pad_id=0)
    with torch.no_grad():
        c, r = sequence_logps(model, b)
        for i in range(2):
            for resp, got in ((chosen[i], c[i]), (rejected[i], r[i])):
                ids = torch.tensor([prompts[i] + resp])
                one = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "position_ids": torch.arange(ids.shape[1])[None]}
                want = token_logprobs(model, one, len(prompts[i]))[0, len(prompts[i]):].sum()
                assert float(got) == pytest.approx(float(want), abs=1e-4)


def test_packed_pairs_give_the_padded_log_probs_and_gradients():
    model = hetero_model(seed=8)
    prompts = [[9, 10, 11], [12], [13, 14]]
    chosen, rejected = [[20, 21], [22, 23, 24, 25, 26], [27]], [[28], [29, 30], [31, 32, 33, 34]]
    padded, packed = pair_batch(prompts, chosen, rejected), packed_pair_batch(prompts, chosen, rejected)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # fewer tokens: no padding between sequences
    grads = []
    for b in (padded, packed):
        model.zero_grad()
        c, r = sequence_logps(model, b)
        (c.sum() - 2 * r.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if b is padded:
            want = (c.detach(), r.detach())
    assert torch.allclose(c.detach(), want[0], atol=1e-4) and torch.allclose(r.detach(), want[1], atol=1e-4)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("kind", ["dpo", "rpo_bwd_kl"])
def test_a_preference_step_moves_the_margin_toward_the_chosen_response(kind):
    model = hetero_model(seed=6)
    ref = copy.deepcopy(model).requires_grad_(False)
    opt = adamw(model, lr=3e-3)
    b = packed_pair_batch([[9, 10], [11, 12]], [[20, 21], [22]], [[25, 26], [27]], pad_id=0)
    with torch.no_grad():
        rc, rr = sequence_logps(ref, b)
    rewards = {"reward_chosen": torch.tensor([3.0, 3.0]), "reward_rejected": torch.tensor([-3.0, -3.0])} \
        if kind.startswith("rpo") else {}
    first = preference_step(model, opt, b, kind=kind, beta=0.5, ref_chosen=rc, ref_rejected=rr, **rewards)
    assert first["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    for _ in range(5):
        last = preference_step(model, opt, b, kind=kind, beta=0.5, ref_chosen=rc, ref_rejected=rr, **rewards)
    assert last["margin"] > 0.05 and last["accuracy"] == 1.0 and last["loss"] < first["loss"]
    if rewards:
        assert last["reward_margin"] == pytest.approx(6.0)
