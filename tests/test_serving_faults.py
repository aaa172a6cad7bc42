"""Fault injection in continuous batching: one request failing at any phase (admission, prefill, choosing its
next token, the batch's decode forward) ends that request alone, with an error naming the phase; every other
request finishes with exactly the tokens it gets alone, and the engine goes on serving."""

from __future__ import annotations

import time

import pytest
import torch
from test_modeling import V, hetero_model

from thinkfast.generation import SamplingParams, generate
from thinkfast.generation.continuous import ContinuousEngine, Request

POISON = 7  # a token id the model refuses to take as input (and never chooses itself)


def _poisoned_model():
    """A small random model whose forward raises on POISON in its input; its logits never pick POISON."""
    model = hetero_model(seed=5)

    def refuse(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if (ids == POISON).any():
            raise RuntimeError("injected fault: poisoned input")

    def never(module, args, kwargs, output):
        output.logits[..., POISON] = float("-inf")
        return output

    model.register_forward_pre_hook(refuse, with_kwargs=True)
    model.register_forward_hook(never, with_kwargs=True)
    return model


def _prompts(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, V, (int(k),), generator=g).tolist() for k in torch.randint(3, 25, (n,), generator=g)]


def _wait_tokens(r: Request, n: int, timeout=30.0):
    t0 = time.time()
    while len(r.tokens) < n and not r.done.is_set():
        assert time.time() - t0 < timeout
        time.sleep(0.001)


def _victim(phase: str, engine: ContinuousEngine) -> Request:
    """The request that fails, and the fault that makes it fail at ``phase``."""
    params = SamplingParams(max_new_tokens=40)
    if phase == "admission: token id":  # a prompt id the model does not have
        return Request([9, 10, V + 5], params)
    if phase == "admission: seed":  # the defect of issue 23: a seed outside 64 bits reaching the engine
        bad = SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
        object.__setattr__(bad, "seed", 2**70)
        return Request([9, 10, 11], bad)
    if phase == "prefill":  # its prompt breaks the batch's prefill
        return Request([9, POISON, 11, 12], params)
    victim = Request([9, 10, 11, 12, 13], params)
    choose = engine._choose
    if phase == "choosing the next token":
        def failing(idx, logits, picked):
            if len(victim.tokens) >= 2 and any(engine._rows[i] is victim for i in idx):
                raise RuntimeError("injected fault: sampler")
            choose(idx, logits, picked)
    else:  # "decode forward": its third token breaks the batch's forward
        def failing(idx, logits, picked):
            choose(idx, logits, picked)
            for i in idx:
                if engine._rows[i] is victim and len(victim.tokens) == 2:
                    picked[i] = POISON
    engine._choose = failing
    return victim


@pytest.mark.parametrize("phase,expect", [
    ("admission: token id", "admission: ValueError: prompt token ids"),
    ("admission: seed", "admission: ValueError"),
    ("prefill", "prefill: RuntimeError: injected fault"),
    ("choosing the next token", "choosing the next token: RuntimeError: injected fault"),
    ("decode forward", "prefill: RuntimeError: injected fault"),
])
def test_one_failing_request_ends_alone_and_the_others_get_their_own_tokens(phase, expect):
    model = _poisoned_model()
    prompts = _prompts(7)
    greedy = [SamplingParams(max_new_tokens=14 + 3 * i) for i in range(6)]
    seeded = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=5)
    engine = ContinuousEngine(model, max_batch=8).start()
    try:
        seeded_alone = engine.generate(prompts[6], seeded, timeout=60).tokens
        victim = _victim(phase, engine)
        first = [engine.submit(Request(prompts[i], greedy[i])) for i in range(3)]
        engine.submit(victim)
        first.append(engine.submit(Request(prompts[6], seeded)))
        _wait_tokens(first[0], 3)  # the rest arrive while the first ones (and the victim) decode
        rest = [engine.submit(Request(prompts[i], greedy[i])) for i in range(3, 6)]
        everyone = first + rest + [victim]
        assert all(r.done.wait(60) for r in everyone), "a request was never answered"
        after = engine.generate(prompts[0], greedy[0], timeout=60)  # the engine goes on serving
    finally:
        engine.stop()
    assert victim.finish_reason == "error" and victim.error.startswith(expect), victim.error
    assert engine.stats["errors"] == 1
    assert engine.stats["recomputes"] == (1 if phase == "decode forward" else 0)
    for i, r in enumerate(first[:3] + rest):
        alone = generate(model, [prompts[i]], greedy[i])[0]
        assert r.finish_reason == "length" and r.tokens == alone.token_ids, (phase, i)
    assert first[3].tokens == seeded_alone and first[3].finish_reason == "length"
    assert after.tokens == generate(model, [prompts[0]], greedy[0])[0].token_ids


def test_a_fault_no_request_can_be_blamed_for_answers_every_request_held():
    """The last resort (a bug in the engine's own bookkeeping, here while requests join a running batch) ends
    every request the engine holds with an error, the joining ones included, and the engine goes on."""
    model = hetero_model(seed=5)
    prompts = _prompts(4)
    engine = ContinuousEngine(model, max_batch=8)
    merge, calls = engine._merge, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:  # the second join: requests arriving while another decodes
            raise RuntimeError("injected fault: bookkeeping")
        merge(*args)

    engine._merge = failing
    engine.start()
    try:
        running = engine.submit(Request(prompts[0], SamplingParams(max_new_tokens=200)))
        _wait_tokens(running, 2)
        joining = [engine.submit(Request(p, SamplingParams(max_new_tokens=5))) for p in prompts[1:]]
        assert all(r.done.wait(60) for r in [running, *joining]), "a request was never answered"
        after = engine.generate(prompts[1], SamplingParams(max_new_tokens=5), timeout=60)
    finally:
        engine.stop()
    for r in [running, *joining]:
        assert r.finish_reason == "error" and "bookkeeping" in r.error
    assert after.tokens == generate(model, [prompts[1]], SamplingParams(max_new_tokens=5))[0].token_ids


def test_sampling_limits_follow_vllm():
    """A temperature under 0.01 samples at 0.01 (logits / 1e-39 would be inf, and softmax NaN); a top_p that
    rounds to 0 in float32 keeps the most likely token; seeds are 64-bit."""
    from thinkfast.generation import MIN_TEMPERATURE, filter_logits

    assert SamplingParams(temperature=1e-39).temperature == MIN_TEMPERATURE
    assert SamplingParams(temperature=0).temperature == 0 and SamplingParams(temperature=0.5).temperature == 0.5
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    kept = filter_logits(logits, 0, 1e-46)
    assert kept[0, 1] == 3.0 and torch.isinf(kept[0, [0, 2]]).all()
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="64 bits"):
            SamplingParams(seed=seed)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
    model = hetero_model(seed=2)
    prompt = _prompts(1)[0]
    tiny = generate(model, [prompt], SamplingParams(max_new_tokens=8, temperature=1e-39, top_p=1e-46, seed=0))[0]
    assert tiny.token_ids == generate(model, [prompt], SamplingParams(max_new_tokens=8))[0].token_ids


def test_a_thinking_budget_failing_for_one_request_ends_that_request_alone():
    from test_budget import _model

    from thinkfast.generation.budget import ThinkingBudget
    from thinkfast.nano.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = _model(tok)
    prompt = tok.encode("<|begin_of_text|>x<think>\n", add_special_tokens=False)
    engine = ContinuousEngine(model, tok, max_batch=4, budget_grace=8)
    victim = Request(prompt, SamplingParams(max_new_tokens=30), budget=20)

    class Faulty(ThinkingBudget):
        def __call__(self, view):
            if victim.id in view.requests and len(victim.tokens) >= 3:
                raise RuntimeError("injected fault: budget")
            super().__call__(view)

    engine.budget.__class__ = Faulty
    engine.start()
    try:
        params = [SamplingParams(max_new_tokens=30 + i) for i in range(3)]
        others = [engine.submit(Request(prompt, params[i], budget=5 + i)) for i in range(3)]
        engine.submit(victim)
        assert all(r.done.wait(60) for r in [*others, victim])
    finally:
        engine.stop()
    assert victim.finish_reason == "error" and victim.error == "thinking budget: RuntimeError: injected fault: budget"
    for r, p, b in zip(others, params, (5, 6, 7)):  # each as the rollout engine gives it alone, budget applied
        alone = generate(model, [prompt], p, hook=ThinkingBudget(tok, [prompt], b, grace=8))[0]
        assert r.tokens == alone.token_ids and r.finish_reason == alone.finish_reason
