"""Continuous batching: requests that join a running batch, or leave it, are computed as they would be alone."""

from __future__ import annotations

import time

import pytest
import torch
from test_modeling import V, hetero_model, tiny_llama

from thinkfast.generation import SamplingParams, generate
from thinkfast.modeling.kvcache import StaticKVCache
from thinkfast.generation.continuous import ContinuousEngine, Request

STOPS = (0, 1, 2, 3, 4, 5, 6, 7)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, V, (int(k),), generator=g).tolist() for k in torch.randint(2, 30, (n,), generator=g)]


def _wait_running(engine, tokens_of: Request, n: int, timeout=30.0):
    t0 = time.time()
    while len(tokens_of.tokens) < n and not tokens_of.done.is_set():
        assert time.time() - t0 < timeout
        time.sleep(0.001)


def test_cache_join_right_aligns_and_drop_front_keeps_the_tail():
    a, b = StaticKVCache(100, chunk=4), StaticKVCache(100, chunk=4)
    ka = torch.randn(2, 1, 3, 2)
    kb = torch.randn(1, 1, 5, 2)
    a.update(ka, ka + 1, 0)
    b.update(kb, kb + 1, 0)
    assert a.join(b) == (2, 0)
    k, v = a.update(torch.zeros(3, 1, 1, 2), torch.zeros(3, 1, 1, 2), 0)
    assert k.shape == (3, 1, 6, 2) and a.get_seq_length() == 6
    assert torch.equal(k[:2, :, 2:5], ka) and torch.equal(k[2:, :, :5], kb) and torch.equal(v[2:, :, :5], kb + 1)
    assert not k[:2, :, :2].any()
    a.drop_front(2)
    k, _ = a.update(torch.ones(3, 1, 1, 2), torch.ones(3, 1, 1, 2), 0)
    assert k.shape == (3, 1, 5, 2) and torch.equal(k[:2, :, :3], ka) and torch.equal(k[2:, :, :3], kb[:, :, 2:])


@pytest.mark.parametrize("make", [lambda: hetero_model(seed=5), lambda: tiny_llama(seed=4)], ids=["decilm", "llama"])
def test_greedy_requests_joining_and_leaving_a_running_batch_equal_generate_alone(make):
    model = make()
    prompts = _prompts(12)
    engine = ContinuousEngine(model, max_batch=6).start()
    try:
        params = [SamplingParams(max_new_tokens=10 + 3 * i, stop_token_ids=STOPS if i % 2 else ()) for i in range(12)]
        first = [engine.submit(Request(prompts[i], params[i])) for i in range(3)]
        _wait_running(engine, first[0], 4)  # the others arrive while the first three decode
        rest = [engine.submit(Request(prompts[i], params[i])) for i in range(3, 12)]
        for r in first + rest:
            assert r.done.wait(60)
    finally:
        engine.stop()
    assert engine.stats["joins_into_running"] >= 1 and engine.stats["max_running"] <= 6
    want_model = engine.model  # the Llama model was converted; compare on the same weights
    for i, r in enumerate(first + rest):
        alone = generate(want_model, [prompts[i]], params[i])[0]
        assert r.tokens == alone.token_ids and r.finish_reason == alone.finish_reason, i
        assert max(abs(a - b) for a, b in zip(r.logprobs, alone.logprobs)) < 1e-4


def test_a_seeded_request_samples_the_same_alone_or_among_others():
    model = hetero_model(seed=2)
    prompts = _prompts(6, seed=1)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=11)
    engine = ContinuousEngine(model, max_batch=8).start()
    try:
        alone = engine.generate(prompts[0], params, timeout=60)
        crowd = [engine.submit(Request(p, SamplingParams(max_new_tokens=25, temperature=0.7, top_k=5)))
                 for p in prompts[1:]]
        again = engine.submit(Request(prompts[0], params))
        assert again.done.wait(60) and all(r.done.wait(60) for r in crowd)
    finally:
        engine.stop()
    assert again.tokens == alone.tokens


def test_cancel_frees_the_slot_and_emit_sees_every_token():
    model = hetero_model(seed=3)
    seen: list[int] = []
    reasons: list = []

    def emit(tokens, reason):
        seen.extend(tokens)
        reasons.append(reason)

    engine = ContinuousEngine(model, max_batch=2).start()
    try:
        long = engine.submit(Request(_prompts(1)[0], SamplingParams(max_new_tokens=100_000), emit=emit))
        _wait_running(engine, long, 5)
        engine.cancel(long)
        assert long.done.wait(30) and long.finish_reason == "abort"
        assert seen == long.tokens and reasons[-1] == "abort" and reasons.count(None) == len(reasons) - 1
        short = engine.generate(_prompts(1, seed=9)[0], SamplingParams(max_new_tokens=3), timeout=30)
        assert short.finish_reason == "length" and len(short.tokens) == 3
        time.sleep(0.05)
        assert engine.running == 0 and engine.waiting == 0
    finally:
        engine.stop()


def test_engine_applies_the_thinking_budget_per_request():
    from thinkfast.nano.tokenizer import build_tokenizer
    from test_budget import _model

    tok = build_tokenizer()
    model = _model(tok)
    nl = tok.encode("\n", add_special_tokens=False)[0]
    tags = tok.convert_tokens_to_ids(["<think>", "</think>"])

    def steer(module, args, output):
        output.logits[..., nl] += 4.0
        output.logits[..., tags] = float("-inf")
        return output

    model.register_forward_hook(steer)
    prompt = tok.encode("<|begin_of_text|>x<think>\n", add_special_tokens=False)
    engine = ContinuousEngine(model, tok, max_batch=4, budget_grace=8).start()
    close = tok.convert_tokens_to_ids("</think>")
    try:
        params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=0)
        out = {b: engine.submit(Request(prompt, params, budget=b)) for b in (0, 5, 20, None)}
        assert all(r.done.wait(60) for r in out.values())
    finally:
        engine.stop()
    for b, r in out.items():
        if b is None:
            assert close not in r.tokens
            continue
        thought = r.tokens.index(close)
        assert b <= thought <= b + 8 + 1 or (b == 0 and thought == 1), (b, thought)
        assert r.tokens.count(close) == 1  # banned after the close
    assert not engine.budget.count and not engine.budget.budgets  # ended requests are forgotten


def test_a_request_that_is_not_streamed_gets_one_emit_with_every_token():
    calls = []
    engine = ContinuousEngine(hetero_model(seed=1), max_batch=2).start()
    try:
        r = engine.submit(Request(_prompts(1, seed=4)[0], SamplingParams(max_new_tokens=12), stream=False,
                                  emit=lambda tokens, reason: calls.append((list(tokens), reason))))
        assert r.done.wait(30)
    finally:
        engine.stop()
    assert calls == [(r.tokens, "length")] and len(r.tokens) == 12
