"""Supervised fine-tuning data for the reasoning toggle: examples, an assistant-only loss mask, and
packing in which packed samples never attend to each other.

Llama-Nemotron (arXiv 2505.00949) section 4 / REFERENCE.md section 4: every prompt comes as an "on" example
(system ``detailed thinking on``, response ``<think>trace</think>answer``) and an "off" example (system
``detailed thinking off``, the answer alone); the loss is token-level cross entropy on the assistant's
tokens only.

Sources:

* the nano world (:func:`nano_examples`): the programmatic teacher writes both responses of each prompt;
* JSON-lines files (:func:`read_examples`, ``.jsonl`` / ``.json``, optionally gzipped), one example per
  line, in either of two schemas:

  - the Llama-Nemotron post-training schema: ``input`` (a string, or a list of ``{"role", "content"}``
    messages), ``output`` (the assistant's response), ``reasoning`` (``"on"`` / ``"off"``, optional) and
    ``system_prompt`` (optional; built from ``reasoning`` when absent); other keys are ignored;
  - chat messages: ``messages``, a list ending with the assistant's turn; its mode is read from a toggle
    line leading the system message, when there is one.

  A row whose mode is stated must obey it (an "on" response with exactly one well-formed think block, an
  "off" response with none). A malformed row is a :class:`~thinkfast.data.DataError` naming the file and
  line, or, with ``skip_bad=True``, skipped and counted.

Packing (:func:`pack`): best-fit decreasing into rows of ``seq_len`` tokens. Each sample keeps its own
position ids (starting at 0) and a sample id per token; :func:`thinkfast.data.packed_attention` turns the ids
into each sample attending to itself only (:func:`block_causal_mask`, the same rule as a dense mask), so the
logits of a packed sample equal those it gets alone (tested).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..data import _short, block_causal_mask, read_json_rows  # block_causal_mask: re-exported, SFT's mask
from ..toggle import SYSTEM_OFF, SYSTEM_ON, format_ok, parse_response

__all__ = ["Example", "block_causal_mask", "mix_modes", "nano_examples", "pack", "packed_batch", "read_examples",
           "row_to_example", "tokenize_example"]


@dataclass(frozen=True)
class Example:
    """One conversation to learn: ``messages`` (the last is the assistant's response), its mode
    (``thinking``: True on, False off, None not stated) and where it came from (``file:line`` or a tag)."""

    messages: tuple
    thinking: bool | None
    source: str


def _toggle_of(system: str) -> bool | None:
    first = system.lstrip().split("\n", 1)[0].strip()
    return True if first == SYSTEM_ON else False if first == SYSTEM_OFF else None


def _check_mode(response: str, thinking: bool | None) -> str | None:
    if thinking is True and not format_ok(response, True):
        return (f"reasoning is on but the response has no single well-formed think block "
                f"({parse_response(response).form}): {_short(response)}")
    if thinking is False and not format_ok(response, False, allow_empty_think=True):
        return f"reasoning is off but the response has think tags: {_short(response)}"
    return None


def _messages(value, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list of {{'role', 'content'}} messages, got {_short(value)}")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message of {what} needs string 'role' and 'content', got {_short(m)}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {m['role']!r} in {what}; expected system, user or assistant")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def row_to_example(row, source: str = "") -> Example:
    """One JSON row (either schema) -> :class:`Example`; a ValueError says what is wrong with it.

    >>> row_to_example({"input": "What is 2+2?", "output": "4", "reasoning": "off"}).messages[0]
    {'role': 'system', 'content': 'detailed thinking off'}
    >>> chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    >>> row_to_example({"messages": chat}).thinking is None
    True
    """
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's response")
        if sum(m["role"] == "system" for m in messages) > (messages[0]["role"] == "system"):
            raise ValueError("a system message may only come first")
        thinking = _toggle_of(messages[0]["content"]) if messages[0]["role"] == "system" else None
    elif "input" in row and "output" in row:
        inp, output = row["input"], row["output"]
        messages = [{"role": "user", "content": inp}] if isinstance(inp, str) else _messages(inp, "input")
        if messages[-1]["role"] != "user":
            raise ValueError("input must end with a user message")
        if not isinstance(output, str):
            raise ValueError(f"output must be a string, got {_short(output)}")
        reasoning = row.get("reasoning")
        if reasoning not in (None, "on", "off"):
            raise ValueError(f"reasoning must be 'on' or 'off', got {_short(reasoning)}")
        system = row.get("system_prompt")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system_prompt must be a string, got {_short(system)}")
        if messages[0]["role"] == "system":
            if system is not None:
                raise ValueError("both system_prompt and a system message in input")
            system = messages.pop(0)["content"]
        stated = None if reasoning is None else reasoning == "on"
        toggle = _toggle_of(system) if system is not None else None
        if stated is not None and toggle is not None and stated != toggle:
            raise ValueError(f"reasoning is {reasoning!r} but system_prompt says {system.splitlines()[0]!r}")
        thinking = stated if stated is not None else toggle
        if system is None and thinking is not None:
            system = SYSTEM_ON if thinking else SYSTEM_OFF
        elif system is not None and toggle is None and thinking is not None:
            system = (SYSTEM_ON if thinking else SYSTEM_OFF) + ("\n\n" + system if system.strip() else "")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + messages
        messages.append({"role": "assistant", "content": output})
    else:
        raise ValueError(f"a row needs 'messages', or 'input' and 'output'; it has keys {sorted(row)}")
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("a system message may only come first")
    problem = _check_mode(messages[-1]["content"], thinking)
    if problem:
        raise ValueError(problem)
    return Example(tuple(messages), thinking, source)


def read_examples(patterns: Sequence[str], skip_bad: bool = False) -> tuple[list[Example], list[str]]:
    """Examples of JSON-lines files (paths or globs). Returns (examples, skipped): ``skipped`` lists
    ``"file line N: why"`` for each row left out (only with ``skip_bad``; otherwise the first bad row raises)."""
    return read_json_rows(patterns, row_to_example, skip_bad=skip_bad, what="SFT data")


def nano_examples(n: int, seed: int, kinds: Sequence[str], digits: Sequence[int], steps: Sequence[int],
                  split: str = "train", *, phrasing: str = "canonical", off_prompts: int = 0,
                  off_digits: Sequence[int] = (1, 2, 3), off_steps: Sequence[int] = (1, 2, 3)) -> list[Example]:
    """``n`` nano-world prompts, each as an "on" and an "off" example (the pair, one after the other), then
    ``off_prompts`` prompts of ``off_digits`` / ``off_steps`` (harder than the traces cover, typically) as "off"
    examples only: the answer alone, at every difficulty, so that "off" never thinks (an "off" answer may be wrong).

    ``phrasing``: "canonical" (:func:`thinkfast.nano.tasks.chat_prompt`'s one wording) or "varied" (each example's
    user turn in one of :data:`thinkfast.nano.tasks.PHRASINGS`' "train" templates, drawn per example, so the two
    examples of a pair are usually worded differently)."""
    from ..nano import tasks
    from ..toggle import messages_for

    if phrasing not in ("canonical", "varied"):
        raise ValueError(f"phrasing={phrasing!r}: choose canonical or varied")
    rng = random.Random(f"sft-phrasing:{seed}")

    def user(p):
        return tasks.chat_prompt(p, tasks.phrasing(p, rng) if phrasing == "varied" else None)

    out = []
    for i, p in enumerate(tasks.make_problems(n, seed=seed, kinds=tuple(kinds), digits=tuple(digits),
                                              steps=tuple(steps), split=split)):
        for thinking in (True, False):
            msgs = messages_for(user(p), thinking, tasks.chat_response(p, thinking))
            out.append(Example(tuple(msgs), thinking, f"nano:{i}:{'on' if thinking else 'off'}"))
    if off_prompts:  # another stream of the same split: problems drawn apart from the pairs'
        for i, p in enumerate(tasks.make_problems(off_prompts, seed=seed + 7919, kinds=tuple(kinds),
                                                  digits=tuple(off_digits), steps=tuple(off_steps), split=split)):
            out.append(Example(tuple(messages_for(user(p), False, tasks.chat_response(p, False))), False,
                               f"nano-off:{i}:off"))
    return out


def nano_if_examples(n: int, seed: int, kinds: Sequence[str], digits: Sequence[int], steps: Sequence[int],
                     split: str = "train", instructions: Sequence[int] = (1, 3)) -> list[Example]:
    """``n`` nano instruction-following prompts (:func:`thinkfast.tasks.instructions.nano_if_items`: a problem with
    1-3 of IFEval's instructions), each as an "on" and an "off" example whose answer the teacher rewrote to follow
    every instruction (:func:`thinkfast.tasks.instructions.if_response`)."""
    import dataclasses

    from ..tasks.instructions import if_response, nano_if_items
    from ..toggle import messages_for

    out = []
    items = nano_if_items(n, seed=seed, kinds=tuple(kinds), digits=tuple(digits), steps=tuple(steps), split=split,
                          instructions=tuple(instructions), thinking="on")
    for i, item in enumerate(items):
        for thinking in (True, False):
            moded = dataclasses.replace(item, thinking=thinking)
            msgs = messages_for(item.prompt, thinking, if_response(moded))
            out.append(Example(tuple(msgs), thinking, f"nano-if:{i}:{'on' if thinking else 'off'}"))
    return out


def mix_modes(examples: list[Example], on_share: float | None, seed: int) -> list[Example]:
    """Keep as many examples as possible with ``on_share`` of the moded ones "on" (the larger pool is
    subsampled, deterministically); examples without a stated mode all stay. ``None``: keep everything."""
    if on_share is None:
        return list(examples)
    on = [e for e in examples if e.thinking is True]
    off = [e for e in examples if e.thinking is False]
    rest = [e for e in examples if e.thinking is None]
    if on_share in (0.0, 1.0):
        n_on, n_off = (len(on), 0) if on_share == 1.0 else (0, len(off))
    else:
        total = min(len(on) / on_share, len(off) / (1 - on_share))
        n_on, n_off = round(total * on_share), round(total * (1 - on_share))
    rng = random.Random(f"sft-mix:{seed}")
    keep = set(map(id, rng.sample(on, min(n_on, len(on))) + rng.sample(off, min(n_off, len(off))) + rest))
    return [e for e in examples if id(e) in keep]


def tokenize_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask marking the assistant's response (its content and
    the end-of-turn token), through the tokenizer's chat template. With a template that marks assistant
    turns (``{% generation %}``), transformers' assistant mask is used; otherwise the response is what
    follows the rendering of the earlier messages with the generation prompt (which must be a prefix)."""
    messages = list(example.messages)
    template = getattr(tokenizer, "chat_template", None) or ""
    if "{% generation %}" in template or "{%- generation -%}" in template:
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        # only the final (target) turn is learned: earlier assistant turns are context
        last_start = len(tokenizer.apply_chat_template(messages[:-1], tokenize=True, return_dict=True,
                                                       add_generation_prompt=True)["input_ids"])
        mask = [0] * last_start + mask[last_start:]
    else:
        prefix = list(tokenizer.apply_chat_template(messages[:-1], tokenize=True, return_dict=True,
                                                    add_generation_prompt=True)["input_ids"])
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        if ids[:len(prefix)] != prefix:
            raise ValueError(f"{example.source}: the chat template renders the prompt differently alone; "
                             "add {% generation %} tags to it to mark the response")
        mask = [0] * len(prefix) + [1] * (len(ids) - len(prefix))
    if not any(mask):
        raise ValueError(f"{example.source}: the response has no tokens to learn")
    return ids, mask


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of ``lengths`` grouped into rows whose lengths sum to <= ``capacity``.
    Rows come out in order of their first (longest) item; items within a row longest first.

    >>> pack([5, 3, 4, 2, 6], 8)
    [[4, 3], [0, 1], [2]]
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item of length {max(lengths)} does not fit in a row of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        best = -1
        for r, free in enumerate(room):  # tightest row that still fits
            if lengths[i] <= free and (best < 0 or free < room[best]):
                best = r
        if best < 0:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[best].append(i)
            room[best] -= lengths[i]
    return rows


def packed_sequences(sequences: Sequence[Sequence[int]], capacity: int | None = None, pad_id: int = 0
                     ) -> dict[str, torch.Tensor]:
    """Whole token sequences packed best-fit (:func:`pack`) into rows of ``capacity`` tokens (default: the longest
    sequence) without padding between them: ``input_ids``, ``position_ids`` (from 0 in every sequence), ``seq_ids``
    (the sequence's index within its row, -1 on padding: :func:`block_causal_mask` makes each attend to itself
    only), ``owner`` (the sequence's index in ``sequences``, -1 on padding), each ``[rows, capacity]``, and
    ``starts`` [N, 2] (row and column where each sequence starts). A sequence gets the hidden states it gets alone.

    >>> b = packed_sequences([[5, 6, 7], [8], [9, 9]])
    >>> b["input_ids"].tolist(), b["owner"].tolist(), b["starts"].tolist()
    ([[5, 6, 7], [9, 9, 8]], [[0, 0, 0], [2, 2, 1]], [[0, 0], [1, 2], [1, 0]])
    """
    lengths = [len(s) for s in sequences]
    if not sequences or min(lengths) < 1:
        raise ValueError("packed_sequences: give at least one sequence, none empty")
    capacity = capacity or max(lengths)
    rows = pack(lengths, capacity)
    shape = (len(rows), capacity)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seq = torch.full(shape, -1, dtype=torch.long)
    owner = torch.full(shape, -1, dtype=torch.long)
    starts = torch.zeros(len(sequences), 2, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for j, k in enumerate(members):
            n = lengths[k]
            ids[r, at:at + n] = torch.tensor(list(sequences[k]), dtype=torch.long)
            pos[r, at:at + n] = torch.arange(n)
            seq[r, at:at + n] = j
            owner[r, at:at + n] = k
            starts[k] = torch.tensor([r, at])
            at += n
    return {"input_ids": ids, "position_ids": pos, "seq_ids": seq, "owner": owner, "starts": starts}


def packed_batch(samples: Sequence[tuple[list[int], list[int]]], rows: Iterable[Sequence[int]], seq_len: int,
                 pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Rows of packed samples -> ``input_ids``, ``labels`` (-100 off the assistant's tokens and at each
    sample's first position), ``position_ids`` (from 0 in every sample) and ``seq_ids`` (the sample's index
    within its row; -1 on padding), each ``[rows, seq_len]``."""
    rows = [list(r) for r in rows]
    shape = (len(rows), seq_len)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seq = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for j, k in enumerate(members):
            tok, mask = samples[k]
            n = len(tok)
            if at + n > seq_len:
                raise ValueError(f"row {r} holds {at + n} tokens, more than seq_len={seq_len}")
            t = torch.tensor(tok, dtype=torch.long)
            ids[r, at:at + n] = t
            lab = torch.where(torch.tensor(mask, dtype=torch.bool), t, torch.full_like(t, -100))
            lab[0] = -100
            labels[r, at:at + n] = lab
            pos[r, at:at + n] = torch.arange(n)
            seq[r, at:at + n] = j
            at += n
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq}


def sft_model_loss(model, batch: dict[str, torch.Tensor], **forward) -> tuple[torch.Tensor, int]:
    """:func:`sft_loss` of ``model`` on a :func:`packed_batch` (``input_ids``, ``labels``, ``position_ids``;
    ``forward``: the attention keywords, e.g. :func:`thinkfast.data.packed_attention`). Where the model allows it
    (:func:`thinkfast.modeling.head.has_split_head`) the LM head runs only at the positions that have a label:
    prompts, system turns and padding cost no vocabulary-wide logits (40% of the GSM8K toggle pairs' tokens; with
    a 49k vocabulary the head is a third of a small model's work). Equal to the loss of the full logits (tested)."""
    from ..modeling.head import has_split_head

    labels = batch["labels"]
    if not has_split_head(model):
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], **forward).logits
        return sft_loss(logits, labels)
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         **forward).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    n = int(keep.sum())
    logits = model.get_output_embeddings()(hidden[keep]).float()
    loss = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    return loss / max(n, 1), n


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token-level cross entropy of next-token ``logits`` [B, T, V] against ``labels`` [B, T] (-100 ignored),
    averaged over the assistant tokens of the batch. Returns (loss, number of tokens)."""
    shift_logits = logits[:, :-1].float().flatten(0, 1)
    shift_labels = labels[:, 1:].flatten()
    n = int((shift_labels != -100).sum())
    loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss / max(n, 1), n
