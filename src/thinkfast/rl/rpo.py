"""Preference optimisation on pairs of responses: one update of DPO or reward-aware preference optimisation (RPO).

The losses are :func:`thinkfast.rl.preference.preference_loss` on per-sequence summed log-probs (Llama-Nemotron
section 6; REFERENCE.md section 6). This module lays pairs out for one forward pass and takes the step:

* :func:`pair_batch`: ``P`` pairs -> one batch of ``2P`` rows, chosen rows first, then rejected ones, each
  ``[pad.. prompt | response ..pad]`` (prompts left-padded, responses right-padded), the two rows of a pair one
  group, so the prompt is computed once per pair (:func:`thinkfast.rl.rollout.policy_logprobs`);
* :func:`packed_pair_batch`: the same sequences packed without padding, each attending to itself only (the
  stage's choice: a batch of responses of uneven length is otherwise mostly padding);
* :func:`sequence_logps`: summed response-token log-probs of the chosen and rejected rows under a model;
* :func:`preference_step`: one optimizer step on the mean of the per-pair losses, the reference's log-probs given
  (computed once per iteration by the caller, or in the step by :func:`sequence_logps` under ``no_grad``).

"Chosen" and "rejected" are names only for the RPO kinds: their losses are symmetric under the swap, so online
pairs need no sorting; DPO and IPO need the chosen response first.
"""

from __future__ import annotations

import contextlib

import torch

from ..data import packed_attention
from ..train import loop as train_loop
from ..train.sft import packed_sequences
from .preference import KINDS, preference_loss
from .rollout import policy_logprobs

__all__ = ["packed_pair_batch", "pair_batch", "preference_step", "response_tokens", "sequence_logps"]


def pair_batch(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_id: int = 0,
               device: torch.device | str = "cpu") -> dict:
    """``input_ids``, ``attention_mask``, ``position_ids``, ``completion_mask`` [2P, T], ``group`` [2P] and
    ``prompt_width`` (the column where responses start). Row ``i`` is pair ``i``'s chosen response, row ``P + i``
    its rejected one. An empty response is allowed (its log-prob is 0).

    >>> b = pair_batch([[5, 6], [7]], [[1], [2, 3]], [[4, 4], []], pad_id=0)
    >>> b["input_ids"].tolist(), b["prompt_width"]
    ([[5, 6, 1, 0], [0, 7, 2, 3], [5, 6, 4, 4], [0, 7, 0, 0]], 2)
    """
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError(f"pair_batch: {len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    rows = [(p, c) for p, c in zip(prompts, chosen)] + [(p, r) for p, r in zip(prompts, rejected)]
    p_width = max(len(p) for p in prompts)
    r_width = max(max(len(r) for _, r in rows), 1)
    shape = (len(rows), p_width + r_width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    att = torch.zeros(shape, dtype=torch.long)
    cmask = torch.zeros(shape, dtype=torch.float32)
    for i, (p, r) in enumerate(rows):
        ids[i, p_width - len(p):p_width] = torch.tensor(p, dtype=torch.long)
        att[i, p_width - len(p):p_width + len(r)] = 1
        if r:
            ids[i, p_width:p_width + len(r)] = torch.tensor(r, dtype=torch.long)
            cmask[i, p_width:p_width + len(r)] = 1.0
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    group = torch.arange(len(prompts)).repeat(2)
    out = {"input_ids": ids, "attention_mask": att, "position_ids": pos, "completion_mask": cmask, "group": group}
    out = {k: v.to(device) for k, v in out.items()}
    out["prompt_width"] = p_width
    return out


def packed_pair_batch(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_id: int = 0,
                      device: torch.device | str = "cpu", capacity: int | None = None) -> dict:
    """The ``2P`` sequences of :func:`pair_batch` (chosen ones first) packed without padding into rows of
    ``capacity`` tokens (default: the longest sequence; :func:`thinkfast.train.sft.packed_sequences`), each sequence
    attending to itself only: the same log-probs as :func:`pair_batch` (tested) on fewer tokens, since a batch of
    responses of uneven length is mostly padding otherwise. Adds ``response_mask`` (the response's tokens) and
    ``pairs`` (P)."""
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise ValueError(f"packed_pair_batch: {len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    seqs = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    prompt_len = [len(p) for p in prompts] * 2
    out = packed_sequences(seqs, capacity, pad_id)
    resp = torch.zeros_like(out["input_ids"], dtype=torch.bool)
    for k, (row, col) in enumerate(out.pop("starts").tolist()):
        resp[row, col + prompt_len[k]:col + len(seqs[k])] = True
    out["response_mask"] = resp
    out = {k: v.to(device) for k, v in out.items()}
    out["pairs"] = len(prompts)
    return out


def _packed_logps(model, batch: dict) -> torch.Tensor:
    """Summed response log-probs of every sequence of a packed batch, [2P]; the LM head only where a response token
    is predicted."""
    ids = batch["input_ids"]
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=ids, **packed_attention(batch["seq_ids"]),
                  position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    want = batch["response_mask"][:, 1:]  # the token at t + 1 is a response token, predicted at t
    logits = model.get_output_embeddings()(hidden[:, :-1][want]).float()
    picked = logits.log_softmax(-1).gather(-1, ids[:, 1:][want][:, None]).squeeze(-1)
    total = torch.zeros(2 * batch["pairs"], dtype=picked.dtype, device=picked.device)
    return total.index_add(0, batch["owner"][:, 1:][want], picked)


def response_tokens(batch: dict) -> int:
    """The response tokens of a pair batch (padded or packed)."""
    return int(batch["response_mask"].sum() if "response_mask" in batch else batch["completion_mask"].sum())


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each pair's chosen and rejected response under ``model`` -> ([P], [P]); ``batch`` from
    :func:`pair_batch` or :func:`packed_pair_batch`."""
    if "seq_ids" in batch:
        total = _packed_logps(model, batch)
        return total[:batch["pairs"]], total[batch["pairs"]:]
    sub = {k: v for k, v in batch.items() if k != "prompt_width"}
    logp = policy_logprobs(model, sub, batch["prompt_width"])
    total = (logp * batch["completion_mask"]).sum(-1)
    p = total.shape[0] // 2
    return total[:p], total[p:]


def preference_step(model, opt, batch: dict, *, kind: str = "dpo", beta: float = 0.1, eta: float = 1.0,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, reward_chosen=None, reward_rejected=None,
                    grad_clip: float | None = 1.0, autocast_ctx=None) -> dict:
    """One optimizer step on the mean :func:`~thinkfast.rl.preference.preference_loss` of the batch's pairs.
    Returns ``loss``, ``margin`` (mean policy margin Δ), ``accuracy`` (share of pairs with Δ > 0: the policy
    prefers the chosen response more than the reference does), ``reward_margin`` (mean ``eta (r_c - r_r)``, RPO
    kinds), ``logp_chosen`` / ``logp_rejected`` (means). A non-finite loss raises FloatingPointError before the
    weights change."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose from {list(KINDS)}")
    model.train()
    with autocast_ctx() if autocast_ctx is not None else contextlib.nullcontext():
        pc, pr = sequence_logps(model, batch)
        losses = preference_loss(kind, pc, pr, ref_chosen.to(pc.device), ref_rejected.to(pc.device),
                                 reward_chosen, reward_rejected, beta=beta, eta=eta)
        loss = losses.mean()
    value = float(loss.detach())
    if value != value or value in (float("inf"), float("-inf")):
        raise FloatingPointError(f"the loss is {value}")
    train_loop.optimizer_step(opt, loss, clip=grad_clip)
    with torch.no_grad():
        margin = beta * ((pc - ref_chosen.to(pc.device)) - (pr - ref_rejected.to(pc.device)))
        record = {"loss": value, "margin": float(margin.mean()), "accuracy": float((margin > 0).float().mean()),
                  "logp_chosen": float(pc.mean()), "logp_rejected": float(pr.mean())}
        if reward_chosen is not None and reward_rejected is not None:
            record["reward_margin"] = float(eta * (torch.as_tensor(reward_chosen, dtype=torch.float32)
                                                   - torch.as_tensor(reward_rejected, dtype=torch.float32)).mean())
    return record
