"""Preference losses (thinkfast.rl.preference) against hand-computed values and their limits."""

from __future__ import annotations

import math

import pytest
import torch

from thinkfast.rl.preference import KINDS, preference_loss

# one pair: summed log-probs of chosen / rejected under the policy and the reference, and reward scores
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.5
WC, WR = 3.0, 1.0
BETA, ETA = 0.5, 0.7


def _t(x):
    return torch.tensor([x], dtype=torch.float64)


def _loss(kind, pc=PC, pr=PR, rc=RC, rr=RR, wc=WC, wr=WR, beta=BETA, eta=ETA):
    return float(preference_loss(kind, _t(pc), _t(pr), _t(rc), _t(rr), _t(wc), _t(wr), beta=beta, eta=eta))


def _s(x):
    return 1.0 / (1.0 + math.exp(-x))


def _ls(x):
    return math.log(_s(x))


def test_every_loss_equals_its_formula_by_hand():
    d = BETA * ((PC - RC) - (PR - RR))  # 0.5 * (1 - (-0.5)) = 0.75
    r = ETA * (WC - WR)  # 1.4
    assert d == pytest.approx(0.75) and r == pytest.approx(1.4)
    want = {
        "rpo_bwd_kl": _s(r) * (_ls(r) - _ls(d)) + _s(-r) * (_ls(-r) - _ls(-d)),
        # the paper's D[a || b] with a = Δ, b = Δr, written with probabilities
        "rpo_fwd_kl": _s(d) * (_ls(d) - _ls(r)) + _s(-d) * (_ls(-d) - _ls(-r)),
        "rpo_sq": (d - r) ** 2,
        "dpo": -_ls(d),
        "ipo": (d / BETA - 1 / (2 * BETA)) ** 2,  # margin 1.5 unscaled, against 1 / (2 beta) = 1
    }
    paper = _s(r) * math.log(_s(r) / _s(d)) + (1 - _s(r)) * math.log((1 - _s(r)) / (1 - _s(d)))
    assert want["rpo_bwd_kl"] == pytest.approx(paper, abs=1e-12)
    for kind in KINDS:
        assert _loss(kind) == pytest.approx(want[kind], abs=1e-12), kind


def test_rpo_bwd_kl_tends_to_dpo_as_the_reward_gap_grows():
    dpo = _loss("dpo")
    gaps = [abs(_loss("rpo_bwd_kl", wc=gap) - dpo) for gap in (2.0, 8.0, 20.0, 60.0)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-12


def test_swapping_chosen_and_rejected_leaves_the_rpo_losses_unchanged():
    for kind in ("rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"):
        swapped = _loss(kind, pc=PR, pr=PC, rc=RR, rr=RC, wc=WR, wr=WC)
        assert swapped == pytest.approx(_loss(kind), abs=1e-12), kind
    assert _loss("dpo", pc=PR, pr=PC, rc=RR, rr=RC) != pytest.approx(_loss("dpo"))  # DPO needs the order


def test_agreeing_margins_cost_nothing_and_disagreeing_ones_do():
    # Δ = 0.75 here; choose rewards so that Δr = Δ
    agree = {"wc": 0.75 / ETA, "wr": 0.0}
    for kind in ("rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"):
        assert _loss(kind, **agree) == pytest.approx(0.0, abs=1e-12), kind
        assert _loss(kind) > 1e-3, kind


def test_gradients_push_the_chosen_response_up_until_the_margins_agree():
    pc = torch.tensor([PC], dtype=torch.float64, requires_grad=True)
    rest = [torch.tensor([x], dtype=torch.float64) for x in (PR, RC, RR)]
    preference_loss("dpo", pc, *rest, beta=BETA).sum().backward()
    assert pc.grad.item() < 0  # raising the chosen log-prob lowers DPO's loss
    pc.grad = None
    # RPO with a reward margin smaller than the policy's: the loss pulls the chosen log-prob down instead
    preference_loss("rpo_bwd_kl", pc, *rest, _t(0.2), _t(0.0), beta=BETA, eta=1.0).sum().backward()
    assert pc.grad.item() > 0


def test_one_loss_per_pair_and_clear_errors():
    p = torch.randn(5, dtype=torch.float64)
    out = preference_loss("rpo_sq", p, p - 1, p, p, torch.ones(5), torch.zeros(5), beta=0.1)
    assert out.shape == (5,) and torch.allclose(out, torch.full((5,), (0.1 - 1.0) ** 2, dtype=torch.float64))
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="reward-aware"):
        preference_loss("rpo_bwd_kl", z, z, z, z, beta=0.1)
    with pytest.raises(ValueError, match="choose from"):
        preference_loss("kto", z, z, z, z, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("dpo", z, z, z, z, beta=0.0)
