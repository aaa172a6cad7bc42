"""Preference losses on per-sequence log-probabilities: reward-aware preference optimisation (RPO) and its kin.

Llama-Nemotron section 6 (REFERENCE.md section 6) aligns with iterative online RPO, the loss of the Nemotron-4 340B
report (arXiv 2406.11704, section 3.4.2) as NeMo-Aligner codes it (``megatron_gpt_dpo_model.py``). For a pair of
responses, chosen ``c`` and rejected ``r``, with summed token log-probs under the policy (``pi``) and the frozen
reference (``ref``) and, for RPO, reward-model scores:

* ``Δ  = beta * ((pi_c - ref_c) - (pi_r - ref_r))``: the policy's implicit reward margin;
* ``Δr = eta * (reward_c - reward_r)``: the reward model's margin.

With ``s`` the sigmoid and ``ls`` the log-sigmoid, per pair:

* ``rpo_bwd_kl`` (the paper's): the Bernoulli KL ``D[Δr || Δ] = s(Δr)(ls(Δr) - ls(Δ)) + s(-Δr)(ls(-Δr) - ls(-Δ))``,
  i.e. ``D[a || b] = s(b) log(s(b) / s(a)) + (1 - s(b)) log((1 - s(b)) / (1 - s(a)))`` with ``a = Δ``, ``b = Δr``;
* ``rpo_fwd_kl``: ``s(Δ)(ls(Δ) - ls(Δr)) + s(-Δ)(ls(-Δ) - ls(-Δr))``;
* ``rpo_sq``: ``(Δ - Δr) ** 2``;
* ``dpo``: ``-ls(Δ)`` (Rafailov et al. 2023);
* ``ipo``: ``(Δ / beta - 1 / (2 beta)) ** 2`` (Azar et al. 2023, as TRL codes it: the unscaled log-ratio margin
  against ``1 / (2 beta)``).

Properties the tests check: ``rpo_bwd_kl`` tends to DPO as the reward gap grows; swapping chosen and rejected leaves
the three RPO losses unchanged (online pairs need no sorting); ``rpo_sq`` is 0 when ``Δ = Δr``; the KL losses are 0
when the margins agree and positive otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KINDS", "preference_loss"]

KINDS = ("rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq", "dpo", "ipo")
_REWARD_AWARE = ("rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq")


def _bernoulli_kl(p_logit: torch.Tensor, q_logit: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(s(p)) || Bernoulli(s(q))) from logits, elementwise, in log-sigmoids (stable for large margins)."""
    return (torch.sigmoid(p_logit) * (F.logsigmoid(p_logit) - F.logsigmoid(q_logit))
            + torch.sigmoid(-p_logit) * (F.logsigmoid(-p_logit) - F.logsigmoid(-q_logit)))


def preference_loss(kind: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, reward_chosen: torch.Tensor | None = None,
                    reward_rejected: torch.Tensor | None = None, *, beta: float, eta: float = 1.0) -> torch.Tensor:
    """One loss per pair, [P], for ``kind`` in :data:`KINDS`. The log-prob arguments are [P] summed token
    log-probs of each pair's chosen and rejected response (policy and reference); ``reward_chosen`` /
    ``reward_rejected`` [P] the reward model's scores, needed by the RPO kinds. ``beta`` > 0 scales the policy's
    margin, ``eta`` the reward margin (1: the author's default).

    >>> z = torch.zeros(1)
    >>> round(float(preference_loss("dpo", z, z, z, z, beta=0.1)), 4)  # -log sigmoid(0) = log 2
    0.6931
    >>> float(preference_loss("rpo_sq", torch.tensor([1.0]), z, z, z, torch.tensor([2.0]), z, beta=1.0, eta=0.5))
    0.0
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose from {list(KINDS)}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    if kind == "dpo":
        return -F.logsigmoid(margin)
    if kind == "ipo":
        return (margin / beta - 1.0 / (2.0 * beta)) ** 2
    if reward_chosen is None or reward_rejected is None:
        raise ValueError(f"kind={kind!r} is reward-aware: give reward_chosen and reward_rejected")
    reward_margin = eta * (torch.as_tensor(reward_chosen, dtype=margin.dtype, device=margin.device)
                           - torch.as_tensor(reward_rejected, dtype=margin.dtype, device=margin.device))
    if kind == "rpo_bwd_kl":
        return _bernoulli_kl(reward_margin, margin)
    if kind == "rpo_fwd_kl":
        return _bernoulli_kl(margin, reward_margin)
    return (margin - reward_margin) ** 2
