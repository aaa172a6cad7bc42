"""A thinking budget: a cap on the reasoning tokens of each request, enforced by the rollout engine's step hook.

Once a request has written ``budget`` tokens inside its think block, thinking ends at the next token that
contains a newline (the line in progress is finished), or at ``budget + grace`` tokens at the latest; the
engine then writes ``</think>`` and the blank line the chat template puts before the answer, and the model
answers from there (think tags are banned for it from then on: a model trained only on whole traces would
otherwise open a second block). Budget 0 closes the block as soon as the model opens it (an empty think
block: the answer comes without reasoning; with a prefilled ``<think>`` one token is written before the
close). A request whose think block the prompt already opened (a prefilled ``<think>``) is counted from its
first generated token; one that never opens a block, or closes it itself in time, is left alone.
``None`` means no budget.

Usage (one budget for every request, or one per request)::

    hook = ThinkingBudget(tokenizer, prompts, budget=128)
    completions = generate(model, prompts, params, hook=hook)
    hook.closed  # {request: thinking tokens written when the engine closed its block}

A server adds requests as they arrive (:meth:`ThinkingBudget.add`, keyed by its own request ids) and forgets
them when they end (:meth:`ThinkingBudget.discard`): :mod:`thinkfast.generation.continuous` shares one hook across
its running batch.

Departure: Llama-Nemotron has no thinking budget; the closing text (``</think>`` and a blank line, nothing
else) is the simplest one that keeps the response well formed for :func:`thinkfast.toggle.parse_response`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..toggle import THINK_CLOSE, THINK_OPEN

__all__ = ["ThinkingBudget", "newline_token_ids"]

_CACHE: dict[int, frozenset[int]] = {}


def newline_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the vocabulary's tokens whose text contains a newline (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _CACHE:
        vocab = tokenizer.get_vocab()
        ids = sorted(vocab.values())
        texts = tokenizer.batch_decode([[i] for i in ids])
        _CACHE[key] = frozenset(i for i, t in zip(ids, texts) if "\n" in t)
    return _CACHE[key]


def _single(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not one token of this tokenizer (install the chat template first)")
    return ids[0]


class ThinkingBudget:
    """Step hook (:func:`thinkfast.generation.generate`) that ends each request's thinking at its budget."""

    def __init__(self, tokenizer, prompts: Sequence[Sequence[int]], budget: int | None | Sequence[int | None],
                 grace: int = 32):
        n = len(prompts)
        budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * n
        if len(budgets) != n:
            raise ValueError(f"{len(budgets)} budgets for {n} prompts")
        if grace < 0:
            raise ValueError("grace must be >= 0")
        self.open_id, self.close_id = _single(tokenizer, THINK_OPEN), _single(tokenizer, THINK_CLOSE)
        self.closing = [self.close_id] + tokenizer.encode("\n\n", add_special_tokens=False)
        self.newline_ids = tokenizer.encode("\n", add_special_tokens=False)
        self.newlines = newline_token_ids(tokenizer)
        self.budgets: dict[int, int] = {}
        self.grace = grace
        # per request: thinking tokens so far, or None while no think block is open; closed requests leave
        self.count: dict[int, int | None] = {}
        self.closed: dict[int, int] = {}
        for r, (p, b) in enumerate(zip(prompts, budgets)):
            self.add(r, p, b)

    def add(self, request: int, prompt: Sequence[int], budget: int | None) -> None:
        """Put ``request`` (its prompt ids) under ``budget`` (None: no budget); a server adds requests as they
        arrive."""
        if budget is None:
            return
        if budget < 0:
            raise ValueError(f"budget={budget} must be >= 0 (None: no budget)")
        self.budgets[request] = budget
        opened = max((i for i, t in enumerate(prompt) if t == self.open_id), default=-1)
        closed = max((i for i, t in enumerate(prompt) if t == self.close_id), default=-1)
        self.count[request] = 0 if opened > closed else None

    def discard(self, request: int) -> None:
        """Forget ``request`` (it ended)."""
        for d in (self.budgets, self.count, self.closed):
            d.pop(request, None)

    def __call__(self, view) -> None:
        for r, tok in zip(view.requests, view.tokens):
            if r not in self.count:
                continue
            n = self.count[r]
            if n is None:  # not thinking yet
                if tok == self.open_id:
                    self.count[r] = 0
                    if self.budgets[r] == 0:
                        self._close(view, r, 0)
                continue
            if tok == self.close_id:  # the model closed it itself
                del self.count[r]
                continue
            n += 1
            self.count[r] = n
            budget = self.budgets[r]
            if n >= budget and (tok in self.newlines or n >= budget + self.grace or budget == 0):
                self._close(view, r, n)

    def _close(self, view, r: int, n: int) -> None:
        view.force(r, (self.newline_ids if n == 0 else []) + self.closing)  # budget 0: "<think>\n</think>\n\n"
        view.ban(r, [self.open_id, self.close_id])  # the answer follows: no second think block
        self.closed[r] = n
        del self.count[r]
