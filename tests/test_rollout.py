"""The rollout engine: sequences leaving the batch change nothing, log-probs equal full recomputation,
step hooks force and finish, Llama models work too."""

from __future__ import annotations

import torch
from test_modeling import V, hetero_model, tiny_llama

from thinkfast.generation import SamplingParams, generate

STOPS = (0, 1, 2, 3, 4, 5, 6, 7)  # many stop tokens: sequences end at very different steps


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(8, V, (int(k),), generator=g).tolist() for k in torch.randint(2, 15, (n,), generator=g)]


def test_sequences_leaving_the_batch_change_nothing():
    model = hetero_model(seed=5)
    prompts = _prompts(24)
    params = SamplingParams(max_new_tokens=40, stop_token_ids=STOPS, batch_size=24)
    batched = generate(model, prompts, params)
    lengths = {len(c.token_ids) for c in batched}
    assert len(lengths) > 4 and any(c.finish_reason == "stop" for c in batched)  # the batch did shrink
    for p, c in zip(prompts, batched):
        alone = generate(model, [p], params)[0]
        assert c.token_ids == alone.token_ids and c.finish_reason == alone.finish_reason
        assert max(abs(a - b) for a, b in zip(c.logprobs, alone.logprobs)) < 1e-4


def test_logprobs_equal_full_recomputation():
    model = hetero_model(seed=2)
    prompts = _prompts(6, seed=1)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, stop_token_ids=STOPS, seed=3, batch_size=6)
    for p, c in zip(prompts, generate(model, prompts, params)):
        full = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            logp = model(full).logits[0, len(p) - 1:-1].log_softmax(-1)
        want = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(want, torch.tensor(c.logprobs), atol=1e-4)


def test_llama_model_runs_on_the_engine_with_shrinking_batches():
    model = tiny_llama(seed=4)
    prompts = _prompts(10, seed=2)
    params = SamplingParams(max_new_tokens=25, stop_token_ids=STOPS, batch_size=10)
    for p, c in zip(prompts, generate(model, prompts, params)):
        assert c.token_ids == generate(model, [p], params)[0].token_ids


def test_hook_sees_every_step_and_can_force_and_finish():
    model = hetero_model(seed=5)
    prompts = _prompts(5, seed=3)
    params = SamplingParams(max_new_tokens=12, batch_size=5)
    seen = []

    def hook(view):
        seen.append((view.step, list(view.requests)))
        for r, tok in zip(view.requests, view.tokens):
            assert view.generated(r)[-1] == tok
        if view.step == 2:
            view.force(1, [9, 10, 11])
            view.finish(3)

    out = generate(model, prompts, params, hook=hook)
    assert seen[0][0] == 0 and sorted(seen[0][1]) == [0, 1, 2, 3, 4]  # longest prompts first
    assert out[1].token_ids[3:6] == [9, 10, 11]
    assert len(out[3].token_ids) == 3 and out[3].finish_reason == "stop"
    assert all(len(out[i].token_ids) == 12 for i in (0, 1, 2, 4))
    # forced tokens' log-probs are the model's, as for sampled ones
    full = torch.tensor([prompts[1] + out[1].token_ids])
    with torch.no_grad():
        logp = model(full).logits[0, len(prompts[1]) - 1:-1].log_softmax(-1)
    assert abs(float(logp[3, 9]) - out[1].logprobs[3]) < 1e-4
