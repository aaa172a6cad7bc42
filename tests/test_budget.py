"""Thinking budget: the engine closes the think block at the budget (next newline, hard stop after the grace)."""

from __future__ import annotations

import pytest
import torch
from test_modeling import hetero_config

from thinkfast.generation.budget import ThinkingBudget, newline_token_ids
from thinkfast.generation import SamplingParams, generate
from thinkfast.modeling import DeciLMForCausalLM
from thinkfast.nano.tokenizer import build_tokenizer


def _model(tok):
    """A random model over the nano tokenizer's vocabulary."""
    cfg = hetero_config()
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    return DeciLMForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer()
    model = _model(tok)
    nl = tok.encode("\n", add_special_tokens=False)[0]
    tags = tok.convert_tokens_to_ids(["<think>", "</think>"])

    def steer(module, args, output):  # newlines common (so "the next newline" is exercised), no think tags
        output.logits[..., nl] += 4.0
        output.logits[..., tags] = float("-inf")
        return output

    model.register_forward_hook(steer)
    return tok, model


def _think(tok, ids: list[int]) -> list[int]:
    """The tokens inside the think block of a generated sequence that started inside one."""
    close = tok.convert_tokens_to_ids("</think>")
    return ids[: ids.index(close)] if close in ids else ids


def test_thinking_ends_at_the_next_newline_after_the_budget_or_after_the_grace(setup):
    tok, model = setup
    nl_ids = newline_token_ids(tok)
    assert tok.encode("\n", add_special_tokens=False)[0] in nl_ids
    prompts = [tok.encode("<|begin_of_text|>x<think>\n", add_special_tokens=False)] * 6
    budgets = [0, 3, 10, 25, None, 40]
    hook = ThinkingBudget(tok, prompts, budgets, grace=8)
    out = generate(model, prompts, SamplingParams(max_new_tokens=80, temperature=1.0, seed=0, batch_size=6),
                   hook=hook)
    close = tok.convert_tokens_to_ids("</think>")
    closing = [close] + tok.encode("\n\n", add_special_tokens=False)
    for r, b in enumerate(budgets):
        ids = out[r].token_ids
        if b is None:
            assert r not in hook.closed
            continue
        n = hook.closed[r]
        thought = _think(tok, ids)
        start = n + (1 if n == 0 else 0)  # budget 0 with the block open: a newline, then the close
        assert len(thought) == start and ids[start:start + len(closing)] == closing  # the close follows at once
        assert tok.convert_tokens_to_ids("<think>") not in ids  # banned after the close
        assert b <= n <= b + 8 or (b == 0 and n == 1)
        assert n == b + 8 or thought[-1] in nl_ids or b == 0  # a newline ended it, or the grace ran out
        if b > 0 and n > b:  # no newline between the budget and the close, except the last token
            assert not any(t in nl_ids for t in thought[b - 1:-1])


def test_the_block_opened_by_the_model_is_counted_from_its_open_tag(setup):
    tok, model = setup
    open_id = tok.convert_tokens_to_ids("<think>")
    prompt = tok.encode("<|begin_of_text|>x", add_special_tokens=False)

    def opens(view):  # the model "writes" <think> at step 2
        if view.step == 1:
            view.force(view.requests[0], [open_id])

    budget = ThinkingBudget(tok, [prompt], 5, grace=0)

    def both(view):
        opens(view)
        budget(view)

    out = generate(model, [prompt], SamplingParams(max_new_tokens=20, temperature=1.0, seed=3, batch_size=1),
                   hook=both)
    ids = out[0].token_ids
    assert ids[2] == open_id and budget.closed[0] == 5
    assert ids[3 + 5] == tok.convert_tokens_to_ids("</think>")  # 5 thinking tokens, then the close


def test_bad_budgets_are_refused(setup):
    tok, _ = setup
    with pytest.raises(ValueError, match="2 budgets for 1 prompts"):
        ThinkingBudget(tok, [[1]], [1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        ThinkingBudget(tok, [[1]], -1)


def test_no_second_think_block_after_the_close():
    tok = build_tokenizer()
    model = _model(tok)
    open_id, close_id = tok.convert_tokens_to_ids(["<think>", "</think>"])

    def loves_think(module, args, output):  # a model that would open a think block at every step
        output.logits[..., open_id] += 50.0
        return output

    model.register_forward_hook(loves_think)
    prompt = tok.encode("<|begin_of_text|>x<think>\n", add_special_tokens=False)
    hook = ThinkingBudget(tok, [prompt], 3, grace=0)
    ids = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=1.0, seed=0), hook=hook)[0].token_ids
    assert ids[:3] == [open_id] * 3 and ids[3] == close_id  # counted as thinking, then closed at the budget
    assert open_id not in ids[4:] and close_id not in ids[4:]
