"""A reward model: a scalar head on the policy's architecture, trained on preference pairs with the
Bradley-Terry loss, and used as a reward (``reward_model:PATH``, :mod:`thinkfast.rl.rewards`).

* The model: :class:`thinkfast.modeling.DeciLMForSequenceClassification` for a nemotron-nas policy, transformers'
  ``LlamaForSequenceClassification`` for a Llama-layout one (:func:`reward_model_from_policy`); ``score`` is a
  Linear(hidden, 1) read at the **last attended token** of each sequence (:func:`last_token_scores`), never at a
  pad: where pad = eos (the nano tokenizer's case, and many others'), a classifier that looks for the pad token
  reads the wrong position (transformers#35352), so thinkfast always goes by the attention mask.
* The loss (:func:`bradley_terry_loss`): ``-logsigmoid(r_c - r_l - margin)`` averaged over pairs, plus
  ``center_coef * mean((r_c + r_l)^2)``, TRL's ``RewardTrainer.compute_loss`` (``center_rewards_coefficient``,
  Eisenstein et al., arXiv 2312.09244; margin as in Llama 2, arXiv 2307.09288, section 3.2.2).
* The pairs (:class:`Pair`): JSON lines (:func:`read_pairs`) or, in the nano world, ranked by
  :func:`nano_rank_key` (:func:`nano_pairs`).
* A step (:func:`reward_model_step`), held-out accuracy (:func:`pair_accuracy`), and scoring a trained model
  (:class:`RewardScorer`, :func:`load_reward_model`).

A sequence is the chat template's prompt (:func:`thinkfast.evaluation.chat_ids`, the mode set by the toggle),
the response's tokens and the end-of-turn token (:func:`response_ids`), the same in training and in scoring.

Shapes: P pairs; a pair batch holds the P chosen sequences then the P rejected ones, [2P, T].
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import read_json_rows
from ..evaluation import chat_ids
from ..toggle import stop_token_ids
from ..train import loop as train_loop
from .prompts import row_to_prompt

__all__ = ["Pair", "RewardScorer", "bradley_terry_loss", "collate_pairs", "encode_pairs", "last_token_scores",
           "load_reward_model", "nano_pairs", "nano_rank_key", "packed_scores", "pair_accuracy", "pair_row", "read_pairs",
           "response_ids", "reward_model_from_policy", "reward_model_step"]


# ----------------------------------------------------------------------------------------------- the loss


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of scores ``chosen`` [P] over ``rejected`` [P]: mean of ``-logsigmoid(chosen - rejected
    - margin)`` plus ``center_coef * mean((chosen + rejected) ** 2)`` (TRL's ``RewardTrainer.compute_loss``).

    >>> c, r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    >>> round(float(bradley_terry_loss(c, r)), 4)  # (log(1 + e^-1) + log 2) / 2
    0.5032
    >>> round(float(bradley_terry_loss(c, r, margin=torch.tensor([1.0, 0.0]), center_coef=0.1)), 4)
    0.7431
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.to(diff)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen.float() + rejected.float()) ** 2).mean()
    return loss


# ------------------------------------------------------------------------------------------ the model


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence's score [B] (float32), read at its last attended token: ``input_ids`` / ``attention_mask``
    [B, T], padded on either side (position ids count real tokens only, unless given). ``model``: a sequence
    classifier with a decoder under ``base_model_prefix`` and a ``score`` head (nemotron-nas or Llama); the head
    sees only the B read positions. Does not depend on the pad token id (pad may equal eos)."""
    from ..modeling.modeling_decilm import last_attended

    attention_mask = attention_mask.to(input_ids.device)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    last = last_attended(attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(picked).squeeze(-1).float()


def reward_model_from_policy(policy_dir: str | Path, pad_token_id: int | None = None):
    """A reward model on the policy folder's architecture and weights, ``score`` freshly initialised (seed torch
    first): nemotron-nas -> DeciLMForSequenceClassification, Llama -> LlamaForSequenceClassification; float32,
    ``num_labels`` 1. ``pad_token_id`` goes into the config (transformers' own forward needs one for batches);
    the folder's ``auto_map`` keeps no causal-LM entry (this is not a language model)."""
    import json

    from transformers import LlamaForSequenceClassification

    from ..modeling import DeciLMForSequenceClassification

    model_type = json.loads((Path(policy_dir) / "config.json").read_text()).get("model_type")
    if model_type == "llama":
        cls = LlamaForSequenceClassification
    elif model_type == "nemotron-nas":
        cls = DeciLMForSequenceClassification
    else:
        raise ValueError(f"{policy_dir}: a {model_type!r} model; a reward model needs a Llama-layout or nemotron-nas "
                         "policy")
    config = cls.config_class.from_pretrained(str(policy_dir))
    config.num_labels = 1  # (the setter makes id2label one label)
    if pad_token_id is not None:
        config.pad_token_id = int(pad_token_id)
    model = cls.from_pretrained(str(policy_dir), config=config).float()
    auto_map = getattr(model.config, "auto_map", None)
    if isinstance(auto_map, dict):
        model.config.auto_map = {k: v for k, v in auto_map.items() if k != "AutoModelForCausalLM"}
    return model


# ------------------------------------------------------------------------------------------ pairs


@dataclass
class Pair:
    """One preference: the prompt's messages (ending with the user's), the chosen and the rejected response, an
    optional margin (how much better the chosen one is), the mode (None: the prompt's own system message
    decides), where the pair came from and, for ranked pairs, the ``rule`` that decided it (:func:`nano_pairs`:
    ``correct``, ``obeyed`` or ``shorter``; "" unknown)."""

    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float | None = None
    thinking: bool | None = None
    source: str = ""
    rule: str = ""


def _response(value, what: str) -> str:
    """A response: a string, or TRL's conversational form, one assistant message."""
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise ValueError(f"{what} must be a string or one assistant message, got {str(value)[:80]!r}")


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _row_to_pairs(row, source: str) -> list[Pair]:
    """One JSON row -> its pairs (a ValueError says what is wrong)."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    head = row_to_prompt({k: row[k] for k in ("prompt", "input", "system_prompt", "reasoning") if k in row}, source)
    messages, thinking = list(head.messages), head.thinking
    if "responses" in row or "scores" in row:
        responses, scores = row.get("responses"), row.get("scores")
        if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
            raise ValueError("'responses' and 'scores' must be lists of the same length")
        if len(responses) < 2:
            raise ValueError(f"'responses' needs at least 2 entries, got {len(responses)}")
        texts = [_response(r, f"responses[{i}]") for i, r in enumerate(responses)]
        values = [_number(s, f"scores[{i}]") for i, s in enumerate(scores)]
        out = []
        for i, j in itertools.combinations(range(len(texts)), 2):
            if values[i] == values[j] or texts[i] == texts[j]:
                continue
            hi, lo = (i, j) if values[i] > values[j] else (j, i)
            out.append(Pair(messages, texts[hi], texts[lo], values[hi] - values[lo], thinking, source))
        return out
    if "chosen" not in row or "rejected" not in row:
        raise ValueError(f"a row needs 'chosen' and 'rejected', or 'responses' and 'scores'; it has keys {sorted(row)}")
    margin, rule = row.get("margin"), row.get("rule", "")
    if not isinstance(rule, str):
        raise ValueError(f"rule must be a string, got {rule!r}")
    return [Pair(messages, _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected"),
                 None if margin is None else _number(margin, "margin"), thinking, source, rule)]


def read_pairs(paths: Sequence[str], skip_bad: bool = False) -> list[Pair]:
    """Preference pairs of JSON-lines files (paths or globs), a row being

    * ``{"prompt": str | messages, "chosen": str, "rejected": str, "margin": 1.0 (optional)}`` (TRL's explicit-
      prompt preference format; ``chosen`` / ``rejected`` may be one assistant message each), or
    * ``{"prompt": ..., "responses": [str, ...], "scores": [number, ...]}``: every two responses with different
      scores make a pair, the higher scored chosen, margin = the score difference.

    The prompt is read as RL prompts are (:func:`thinkfast.rl.prompts.row_to_prompt`: ``input``,
    ``system_prompt``, ``reasoning`` too). A bad row is a DataError naming its file and line (or skipped with
    ``skip_bad``, and printed)."""
    rows, skipped = read_json_rows(paths, _row_to_pairs, skip_bad=skip_bad, what="reward-model pairs")
    if skipped:
        print(f"reward_model: skipped {len(skipped)} bad row(s), e.g. {skipped[0]}")
    return [p for ps in rows for p in ps]


def pair_row(pair: Pair) -> dict:
    """A pair as a JSON row that :func:`read_pairs` reads back to the same pair."""
    row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if pair.margin is not None:
        row["margin"] = pair.margin
    if pair.thinking is not None:
        row["reasoning"] = "on" if pair.thinking else "off"
    if pair.rule:
        row["rule"] = pair.rule
    if pair.source:
        row["source"] = pair.source
    return row


def nano_rank_key(correct: bool, obeyed: bool, length: int) -> tuple[int, int, int]:
    """The nano world's ranking of responses to one prompt (higher is better): a correct answer beats a wrong
    one; among equally correct ones, obeying the toggle *and* every instruction of the prompt beats not; then
    the shorter (in tokens) beats the longer. Equal keys are equally good (no pair).

    >>> nano_rank_key(True, False, 90) > nano_rank_key(False, True, 5)
    True
    >>> nano_rank_key(True, True, 90) > nano_rank_key(True, False, 5)
    True
    >>> nano_rank_key(False, True, 9) > nano_rank_key(False, False, 3)
    True
    >>> nano_rank_key(True, True, 20) > nano_rank_key(True, True, 30)
    True
    """
    return int(bool(correct)), int(bool(obeyed)), -int(length)


_RULES = ("correct", "obeyed", "shorter")  # what each part of nano_rank_key ranks by


def nano_pairs(prompt: list[dict], responses: Sequence[str], keys: Sequence[tuple], *, thinking: bool | None,
               source: str = "nano") -> list[Pair]:
    """Every pair of ``responses`` to ``prompt`` whose :func:`nano_rank_key` ``keys`` differ, the higher chosen;
    identical texts and equal keys make no pair. Each pair's ``rule`` names the first part of the key that decided
    it: ``correct``, ``obeyed`` or ``shorter``.

    >>> keys = [nano_rank_key(1, 1, 1), nano_rank_key(0, 1, 1), nano_rank_key(1, 1, 2), nano_rank_key(0, 1, 1)]
    >>> ps = nano_pairs([{"role": "user", "content": "1+1?"}], ["2", "3", "2 ", "3"], keys, thinking=False)
    >>> [(p.chosen, p.rejected, p.rule) for p in ps]
    [('2', '3', 'correct'), ('2', '2 ', 'shorter'), ('2 ', '3', 'correct')]
    """
    if len(responses) != len(keys):
        raise ValueError(f"{len(responses)} responses but {len(keys)} keys")
    seen: dict[str, tuple] = {}
    for text, key in zip(responses, keys):
        if text not in seen or key > seen[text]:
            seen[text] = key
    items = list(seen.items())
    out = []
    for (a, ka), (b, kb) in itertools.combinations(items, 2):
        if ka == kb:
            continue
        hi, lo = (a, b) if ka > kb else (b, a)
        rule = _RULES[next(i for i in range(len(ka)) if ka[i] != kb[i])]
        out.append(Pair(list(prompt), hi, lo, None, thinking, source, rule))
    return out


# ------------------------------------------------------------------------------------- tokens and batches


def end_token_id(tokenizer) -> int:
    """The token that ends an assistant turn in the chat template (``<|eot_id|>`` where the tokenizer has it,
    else eos): every scored sequence ends with it, so the score is read there."""
    return stop_token_ids(tokenizer)[-1]


def response_ids(tokenizer, prompt: list[dict], response: str, thinking: bool | None) -> list[int]:
    """The token ids a reward model scores: the chat template's prompt in mode ``thinking`` (None: the prompt's
    own system message decides), the response's tokens, the end-of-turn token."""
    return (chat_ids(tokenizer, prompt, thinking) + list(tokenizer.encode(response, add_special_tokens=False))
            + [end_token_id(tokenizer)])


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [N, T] of ``sequences`` padded to the longest (T)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def collate_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_id: int,
                  margins: Sequence[float | None] | None = None, padding_side: str = "right",
                  packed: bool = False) -> dict:
    """A pair batch: ``input_ids``, ``attention_mask`` [2P, T] (the P chosen sequences, then the P rejected
    ones), ``margin`` [P] (absent when no pair has one; a pair without one gets 0). ``packed``: the 2P sequences
    packed without padding into rows as long as the longest (:func:`thinkfast.train.sft.packed_sequences`: each
    attends to itself only; ``last`` [2P, 2] holds the row and column of each one's last token): the same scores
    on fewer tokens (tested)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"{len(chosen)} chosen and {len(rejected)} rejected sequences: need as many, at least one")
    if packed:
        from ..train.sft import packed_sequences

        seqs = list(chosen) + list(rejected)
        batch = packed_sequences(seqs, pad_id=pad_id)
        starts = batch.pop("starts")
        batch["last"] = starts + torch.tensor([[0, len(s) - 1] for s in seqs], dtype=torch.long)
    else:
        ids, mask = pad_batch(list(chosen) + list(rejected), pad_id, padding_side)
        batch = {"input_ids": ids, "attention_mask": mask}
    if margins is not None and any(m is not None for m in margins):
        batch["margin"] = torch.tensor([0.0 if m is None else float(m) for m in margins], dtype=torch.float32)
    return batch


def encode_pairs(tokenizer, pairs: Sequence[Pair], max_len: int | None = None, *, margin: bool = True,
                 padding_side: str = "right", packed: bool = False) -> dict:
    """``pairs`` tokenised (:func:`response_ids`) and collated (:func:`collate_pairs`; ``margin``: use the pairs'
    margins). A sequence longer than ``max_len`` is a ValueError naming its pair: a reward model must see the
    end of the response, so filter long pairs first rather than cut them."""
    chosen, rejected = [], []
    for p in pairs:
        c, r = (response_ids(tokenizer, p.prompt, p.chosen, p.thinking),
                response_ids(tokenizer, p.prompt, p.rejected, p.thinking))
        if max_len is not None and max(len(c), len(r)) > max_len:
            raise ValueError(f"pair {p.source or '?'}: {max(len(c), len(r))} tokens > max_len={max_len}")
        chosen.append(c)
        rejected.append(r)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate_pairs(chosen, rejected, pad, [p.margin for p in pairs] if margin else None, padding_side, packed)


def packed_scores(model, batch: dict) -> torch.Tensor:
    """Each sequence's score [N] from a packed batch (:func:`collate_pairs` with ``packed``): the decoder over the
    rows with each sequence attending to itself only, the head at each sequence's last token."""
    from ..data import packed_attention

    device = next(model.parameters()).device
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=batch["input_ids"].to(device), **packed_attention(batch["seq_ids"].to(device)),
                  position_ids=batch["position_ids"].to(device), use_cache=False).last_hidden_state
    last = batch["last"].to(device)
    return model.score(hidden[last[:, 0], last[:, 1]]).squeeze(-1).float()


def _split_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    if "seq_ids" in batch:
        scores = packed_scores(model, batch)
    else:
        scores = last_token_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
    p = scores.shape[0] // 2
    return scores[:p], scores[p:]


def _accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when the chosen scores higher, 0.5 on a tie, else 0."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def reward_model_step(model, opt, batch: dict, *, center_coef: float = 0.0, grad_clip: float | None = 1.0,
                      autocast_ctx=None) -> dict:
    """One optimizer step of the Bradley-Terry loss on a pair batch (:func:`collate_pairs`; its ``margin`` used
    when present). Returns ``loss``, ``accuracy`` (share of pairs the model ranks right before the step, ties
    half), the mean ``chosen`` and ``rejected`` scores and ``grad_norm`` (before clipping). A non-finite loss
    raises FloatingPointError before the weights change."""
    model.train()
    with autocast_ctx() if autocast_ctx is not None else contextlib.nullcontext():
        chosen, rejected = _split_scores(model, batch)
    margin = batch.get("margin")
    loss = bradley_terry_loss(chosen, rejected, None if margin is None else margin.to(chosen.device), center_coef)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss is {value}")
    norm = train_loop.optimizer_step(opt, loss, clip=grad_clip)
    c, r = chosen.detach(), rejected.detach()
    return {"loss": value, "accuracy": float(_accuracy(c, r).mean()), "chosen": float(c.mean()),
            "rejected": float(r.mean()), "grad_norm": norm}


@torch.no_grad()
def pair_accuracy(model, batches: dict | Iterable[dict], *, center_coef: float = 0.0) -> dict:
    """Held-out pair accuracy of ``model`` over pair batches (one, or an iterable): ``accuracy`` (ties half),
    mean ``loss`` (Bradley-Terry, margins as in the batches), mean score ``gap`` (chosen - rejected), ``pairs``."""
    was_training = model.training
    model.eval()
    acc, losses, gaps, n = 0.0, 0.0, 0.0, 0
    for batch in [batches] if isinstance(batches, dict) else batches:
        chosen, rejected = _split_scores(model, batch)
        margin = batch.get("margin")
        k = chosen.shape[0]
        acc += float(_accuracy(chosen, rejected).sum())
        losses += float(bradley_terry_loss(chosen, rejected, None if margin is None else margin.to(chosen.device),
                                           center_coef)) * k
        gaps += float((chosen - rejected).sum())
        n += k
    model.train(was_training)
    if not n:
        return {"accuracy": None, "loss": None, "gap": None, "pairs": 0}
    return {"accuracy": acc / n, "loss": losses / n, "gap": gaps / n, "pairs": n}


# ------------------------------------------------------------------------------------------ scoring


class RewardScorer:
    """A trained reward model and its tokenizer, scoring in batches (right padding, attention mask, the score
    at each sequence's last real token)."""

    def __init__(self, model, tokenizer, device="cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> list[float]:
        """The score of each full token sequence (prompt + response + end token), in order; batched by length."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = [0.0] * len(sequences)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = pad_batch([sequences[i] for i in rows], self.pad_id)
            scores = last_token_scores(self.model, ids.to(self.device), mask.to(self.device)).cpu().tolist()
            for i, s in zip(rows, scores):
                out[i] = float(s)
        return out

    def score(self, prompts: Sequence[list[dict]], responses: Sequence[str],
              thinking: Sequence[bool | None] | None = None, batch_size: int = 32) -> list[float]:
        """Scores of ``responses`` to chat ``prompts`` (messages) in modes ``thinking`` (None: as the prompts'
        system messages say): :func:`response_ids` of each, then :meth:`score_ids`."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        modes = list(thinking) if thinking is not None else [None] * len(prompts)
        seqs = [response_ids(self.tokenizer, list(p), r, None if t is None else bool(t))
                for p, r, t in zip(prompts, responses, modes)]
        return self.score_ids(seqs, batch_size)


def load_reward_model(path: str | Path, device="cpu") -> RewardScorer:
    """A reward model folder (the ``reward_model`` stage's ``reward_model/``, or that stage's folder itself) as a
    :class:`RewardScorer` (float32, eval mode)."""
    from transformers import AutoTokenizer

    from ..artifacts import OUTPUTS, load_sequence_classifier

    path = Path(path)
    if not (path / "config.json").is_file() and (path / OUTPUTS["reward_model"] / "config.json").is_file():
        path = path / OUTPUTS["reward_model"]
    model = load_sequence_classifier(path).float()
    return RewardScorer(model, AutoTokenizer.from_pretrained(str(path)), device)
