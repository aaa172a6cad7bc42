"""The OpenAI-compatible server, driven by the official ``openai`` client against uvicorn on localhost: round
trips, both toggle modes, streaming, the thinking budget, errors, disconnects and concurrent clients."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import serve_in_thread
from test_modeling import hetero_config

from thinkfast.generation import SamplingParams, generate
from thinkfast.modeling import DeciLMForCausalLM
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.serving.app import ServerState
from thinkfast.generation.continuous import ContinuousEngine
from thinkfast.toggle import stop_token_ids

SCRIPT = {"mode": "answer"}  # what the scripted model does after "<think>": answer, or think forever


def _scripted_model(tok):
    """A random model over the nano vocabulary, steered by its last input token: after the chat template's
    "\\n" it writes "<think>xy</think>7<|eot_id|>" (or, in "loop" mode, "<think>xyxyxy..." without end)."""
    cfg = hetero_config()
    cfg.vocab_size, cfg.max_position_embeddings = len(tok), 4096
    torch.manual_seed(0)
    model = DeciLMForCausalLM(cfg).eval()
    one = {s: tok.encode(s, add_special_tokens=False)[0] for s in ("\n", "x", "y", "7")}
    think, close, eot = tok.convert_tokens_to_ids(["<think>", "</think>", "<|eot_id|>"])
    chains = {"answer": {one["\n"]: think, think: one["x"], one["x"]: one["y"], one["y"]: close, close: one["7"],
                         one["7"]: eot},
              "loop": {one["\n"]: think, think: one["x"], one["x"]: one["y"], one["y"]: one["x"]}}

    def steer(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        chain = chains[SCRIPT["mode"]]
        for b, t in enumerate(ids[:, -1].tolist()):
            if t in chain:
                output.logits[b, -1, chain[t]] += 100.0
        return output

    model.register_forward_hook(steer, with_kwargs=True)
    return model


@pytest.fixture(scope="module")
def server():
    tok = build_tokenizer()
    model = _scripted_model(tok)
    engine = ContinuousEngine(model, tok, max_batch=8, budget_grace=8).start()
    state = ServerState(engine=engine, tokenizer=tok, model_name="tiny", max_model_len=4096,
                        stop_token_ids=tuple(stop_token_ids(tok)))
    prompts: list[list[int]] = []
    requests: list = []
    submit = engine.submit

    def spy(request):  # the prompts the server built (the toggle's tests) and the engine's requests
        prompts.append(list(request.prompt))
        requests.append(request)
        return submit(request)

    engine.submit = spy
    base, stop = serve_in_thread(state)
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    yield {"client": client, "base": base, "state": state, "tok": tok, "prompts": prompts, "requests": requests,
           "model": model}
    stop()


@pytest.fixture(autouse=True)
def _answer_mode():
    SCRIPT["mode"] = "answer"
    yield
    SCRIPT["mode"] = "answer"


def _chat(client, thinking=None, **kw):
    extra = {"chat_template_kwargs": {"enable_thinking": thinking}} if thinking is not None else {}
    extra.update(kw.pop("extra_body", {}))
    messages = kw.pop("messages", [{"role": "user", "content": "hi"}])
    return client.chat.completions.create(model="tiny", messages=messages,
                                          temperature=kw.pop("temperature", 0), extra_body=extra or None, **kw)


def test_models_health_and_a_chat_round_trip_with_reasoning_apart(server):
    client, tok = server["client"], server["tok"]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"
    r = _chat(client, thinking=True)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == "7" and msg.reasoning_content == "xy"
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == "tiny"
    prompt = server["prompts"][-1]
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 6  # <think> x y </think> 7 <eot>
    assert r.usage.total_tokens == len(prompt) + 6
    assert tok.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("how", ["kwargs", "system"])
@pytest.mark.parametrize("thinking", [True, False])
def test_the_toggle_reaches_the_prompt_by_system_message_or_chat_template_kwargs(server, how, thinking):
    line = "detailed thinking on" if thinking else "detailed thinking off"
    if how == "kwargs":
        _chat(server["client"], thinking=thinking)
    else:
        _chat(server["client"], messages=[{"role": "system", "content": line}, {"role": "user", "content": "hi"}])
    text = server["tok"].decode(server["prompts"][-1])
    assert f"system<|end_header_id|>\n\n{line}<|eot_id|>" in text


def test_streaming_sends_reasoning_and_content_deltas_then_usage(server):
    stream = _chat(server["client"], thinking=True, stream=True, stream_options={"include_usage": True})
    reasoning, content, reasons, usage = "", "", [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert reasoning == "xy" and content == "7" and reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert usage.completion_tokens == 6


def test_the_thinking_budget_ends_thinking(server):
    SCRIPT["mode"] = "loop"
    free = _chat(server["client"], thinking=True, max_tokens=40)
    assert free.choices[0].finish_reason == "length" and free.choices[0].message.content == ""
    assert free.choices[0].message.reasoning_content == ("xy" * 20)[:39]
    capped = _chat(server["client"], thinking=True, max_tokens=40, extra_body={"max_thinking_tokens": 4})
    msg = capped.choices[0].message
    # no newline in this model's thoughts: the hard stop at budget + grace (8) thinking tokens
    assert msg.reasoning_content == ("xy" * 10)[:12] and "<think>" not in (msg.content or "")


@pytest.mark.parametrize("stream", [False, True])
def test_vllms_thinking_token_budget_is_the_same_budget(server, stream):
    """vLLM's ``thinking_token_budget`` is ``max_thinking_tokens`` under vLLM's name (-1: no budget): the engine gets
    the same budget and the response is the same."""
    SCRIPT["mode"] = "loop"

    def reasoning(extra):
        r = _chat(server["client"], thinking=True, max_tokens=40, extra_body=extra, stream=stream)
        if not stream:
            return r.choices[0].message.reasoning_content, server["requests"][-1].budget
        text = "".join(getattr(c.delta, "reasoning_content", None) or "" for chunk in r for c in chunk.choices)
        return text, server["requests"][-1].budget

    capped = (("xy" * 10)[:12], 4)  # budget 4 + grace 8 thinking tokens, as test_the_thinking_budget_ends_thinking
    assert reasoning({"max_thinking_tokens": 4}) == capped
    assert reasoning({"thinking_token_budget": 4}) == capped
    assert reasoning({"max_thinking_tokens": 4, "thinking_token_budget": 4}) == capped
    assert reasoning({"max_thinking_tokens": 4, "thinking_token_budget": None}) == capped  # null: not given
    free = (("xy" * 20)[:39], None)
    assert reasoning({"thinking_token_budget": -1}) == reasoning({}) == free
    assert reasoning({"thinking_token_budget": 0})[1] == 0
    # the completions endpoint takes it too
    server["client"].completions.create(model="tiny", prompt="hi\n", max_tokens=4, temperature=0,
                                        extra_body={"thinking_token_budget": 3})
    assert server["requests"][-1].budget == 3


@pytest.mark.parametrize("extra,words", [
    ({"max_thinking_tokens": 4, "thinking_token_budget": 8}, "max_thinking_tokens (4) and thinking_token_budget (8)"),
    ({"max_thinking_tokens": 4, "thinking_token_budget": -1}, "max_thinking_tokens (4) and thinking_token_budget (-1)"),
    ({"thinking_token_budget": -2}, "greater than or equal to -1"),
    ({"thinking_token_budget": 1.5}, "valid integer"),
    ({"thinking_token_budget": True}, "valid integer"),
    ({"thinking_token_budget": "4"}, "valid integer"),
])
def test_two_different_thinking_budgets_or_a_bad_one_are_a_400_naming_the_fields(server, extra, words):
    n = len(server["requests"])
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server["client"], thinking=True, max_tokens=8, extra_body=extra)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == "thinking_token_budget" and words in error["message"], error
    assert len(server["requests"]) == n  # refused before anything reached the engine


def test_completions_with_text_and_token_prompts_n_and_stop_strings(server):
    client, tok = server["client"], server["tok"]
    r = client.completions.create(model="tiny", prompt="hi\n", max_tokens=8, temperature=0)
    assert r.choices[0].text == "<think>xy</think>7" and r.choices[0].finish_reason == "stop"
    ids = tok("hi\n")["input_ids"]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0, n=2)
    assert [c.text for c in r2.choices] == ["<think>xy"] * 2 and r2.choices[0].finish_reason == "length"
    assert r2.usage.prompt_tokens == 2 * len(ids) and r2.usage.completion_tokens == 6
    r3 = client.completions.create(model="tiny", prompt="hi\n", max_tokens=8, temperature=0, stop=["</thi"])
    assert r3.choices[0].text == "<think>xy" and r3.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="hi\n", max_tokens=8, temperature=0, stream=True,
                                            stop="7"))
    assert "".join(c.choices[0].text for c in chunks) == "<think>xy</think>"


@pytest.mark.parametrize("kw,param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"extra_body": {"temperature": "hot"}}, "temperature"),
    ({"max_tokens": 4000, "messages": [{"role": "user", "content": "x" * 200}]}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),
    ({"logprobs": True}, "logprobs"),
    ({"messages": []}, "messages"),
])
def test_malformed_requests_get_a_400_naming_the_field(server, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(server["client"], **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert e.value.body["message"]


def test_invalid_json_unknown_model_and_unknown_path(server):
    r = httpx.post(server["base"] + "/v1/chat/completions", content=b"{bad",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server["client"].chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(server["base"] + "/v2/nothing").status_code == 404
    assert _chat(server["client"], thinking=True).choices[0].message.content == "7"  # still serving


def test_a_client_disconnecting_mid_stream_frees_its_slot(server):
    SCRIPT["mode"] = "loop"
    engine = server["state"].engine
    finished = engine.stats["finished"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "stream": True,
            "chat_template_kwargs": {"enable_thinking": True}}
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(10)]
    assert any('"reasoning_content"' in line for line in got)
    request = server["requests"][-1]
    assert request.done.wait(10), "the disconnected request kept its slot"
    assert request.finish_reason == "abort" and len(request.tokens) < 1000
    assert engine.running == 0 and engine.stats["finished"] > finished


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(server):
    client, tok, engine = server["client"], server["tok"], server["state"].engine
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(30, 90, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (16,), generator=g)]
    joins = engine.stats["joins_into_running"]
    engine.stats["max_running"] = 0  # a running maximum: measure this test's batches only
    out: dict[int, object] = {}

    def ask(i):
        out[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=24 + i, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 16
    assert engine.stats["joins_into_running"] > joins and engine.stats["max_running"] > 1  # batched, and joined
    stops = tuple(stop_token_ids(tok))
    for i, p in enumerate(prompts):
        want = generate(engine.model, [p], SamplingParams(max_new_tokens=24 + i, stop_token_ids=stops))[0]
        ids = [t for t in want.token_ids if t not in stops]
        assert out[i].choices[0].text == tok.decode(ids, skip_special_tokens=True), i
        assert out[i].usage.completion_tokens == len(want.token_ids)


def test_sse_lines_are_openai_shaped(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False}}
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_a_client_giving_up_on_a_plain_request_frees_its_slot(server):
    SCRIPT["mode"] = "loop"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
            "chat_template_kwargs": {"enable_thinking": True}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=0.5)
    request = server["requests"][-1]
    assert request.done.wait(10), "the abandoned request kept its slot"
    assert request.finish_reason == "abort" and len(request.tokens) < 4000


def _clients_alongside(server, n, special):
    """Run ``n`` greedy completions in threads while ``special()`` runs; returns (special's result, the clients'
    texts checked against generating each prompt alone)."""
    client, tok, engine = server["client"], server["tok"], server["state"].engine
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(30, 90, (int(k),), generator=g).tolist() for k in torch.randint(3, 30, (n,), generator=g)]
    out: dict[int, object] = {}

    def ask(i):
        out[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=30, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    result = special()
    for t in threads:
        t.join(60)
    assert len(out) == n, "a client was never answered"
    stops = tuple(stop_token_ids(tok))
    for i, p in enumerate(prompts):
        want = generate(engine.model, [p], SamplingParams(max_new_tokens=30, stop_token_ids=stops))[0]
        assert out[i].choices[0].text == tok.decode([t for t in want.token_ids if t not in stops],
                                                    skip_special_tokens=True), i
    return result


def test_out_of_range_seeds_and_underflowing_sampling_never_touch_other_requests(server):
    """Issue 23's two server defects, sent while 12 clients run: a seed outside 64 bits is a 400 naming it; a
    temperature of 1e-39 samples at 0.01 and a top_p of 1e-46 keeps the top token (vLLM's conventions): 200s."""
    client = server["client"]

    def special():
        codes = []
        for seed in (1180591620717411303424, -9223372036854775809):
            with pytest.raises(openai.BadRequestError) as e:
                _chat(client, temperature=1.0, seed=seed, max_tokens=4)
            assert e.value.body["param"] == "seed", e.value.body
            codes.append(e.value.status_code)
        tiny_t = _chat(client, thinking=True, temperature=1e-39, max_tokens=8)
        tiny_p = _chat(client, thinking=True, temperature=1.0, top_p=1e-46, max_tokens=8)
        wrapped = _chat(client, thinking=True, temperature=1.0, seed=2**63 - 1, n=2, max_tokens=8)
        return codes, tiny_t, tiny_p, wrapped

    codes, tiny_t, tiny_p, wrapped = _clients_alongside(server, 12, special)
    assert codes == [400, 400]
    for r in (tiny_t, tiny_p):  # the scripted model's steered answer is the top token: sampled at 0.01, kept
        assert r.choices[0].message.content == "7" and r.choices[0].message.reasoning_content == "xy"
    assert [c.message.content for c in wrapped.choices] == ["7", "7"]


@pytest.mark.parametrize("phase", ["detokenising", "checking stop strings"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_failing_to_become_text_fails_alone(server, monkeypatch, phase, stream):
    """Fault injection after the engine: the victim's detokenisation or stop-string check raises; it gets a 500
    (a stream: an error event) naming the phase, and 8 clients batched with it get their own answers."""
    from thinkfast.serving import app

    name = "_decode" if phase == "detokenising" else "_cut"
    original = getattr(app._Choice, name)

    def failing(self, *args):
        if "VICTIM" in self.stops:
            raise RuntimeError("injected fault")
        return original(self, *args)

    monkeypatch.setattr(app._Choice, name, failing)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["VICTIM"], "stream": stream,
            "temperature": 0, "chat_template_kwargs": {"enable_thinking": True}}

    def special():
        if not stream:
            return httpx.post(server["base"] + "/v1/chat/completions", json=body, timeout=30)
        with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body, timeout=30) as r:
            return [line for line in r.iter_lines() if line]

    got = _clients_alongside(server, 8, special)
    if stream:
        error = json.loads(next(line for line in got if '"error"' in line)[6:])["error"]
        assert got[-1] == "data: [DONE]"
    else:
        assert got.status_code == 500
        error = got.json()["error"]
    assert error["message"] == f"generation failed: {phase} failed: RuntimeError: injected fault"
    assert error["type"] == "server_error"
    engine, t0 = server["state"].engine, time.time()
    while engine.running or engine.waiting:  # the victim's engine request was cancelled: its slot is free
        assert time.time() - t0 < 10, "the failed request kept its slot"
        time.sleep(0.01)


@pytest.mark.parametrize("body,param,words", [
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content", "lone UTF-16 surrogate"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages.0.content.0.text",
     "lone UTF-16 surrogate"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content", "a user message needs content"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user"}]}, "messages.1.content",
     "a user message needs content"),
    ({"chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs",
     "enable_thinking must be true or false, not 'yes'"),
    ({"stop": ["\ud800"]}, "stop", "lone UTF-16 surrogate"),
    ({"seed": 2**63}, "seed", "less than or equal to 9223372036854775807"),
])
def test_request_values_the_engine_cannot_take_are_400s_in_the_requests_terms(server, body, param, words):
    full = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    r = httpx.post(server["base"] + "/v1/chat/completions", content=json.dumps(full),
                   headers={"content-type": "application/json"}, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"].startswith(param) and words in error["message"], error
    assert "Value error" not in error["message"]


def test_an_assistant_turn_may_have_null_content_and_a_text_plain_body_is_named(server):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                {"role": "user", "content": "again"}]
    assert _chat(server["client"], thinking=True, messages=messages).choices[0].message.content == "7"
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    r = httpx.post(server["base"] + "/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("the request body must be JSON sent with Content-Type: application/json "
                                            "(this request says text/plain)")
    r = httpx.post(server["base"] + "/v1/completions", content=b'{"prompt": "\\ud800"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "lone UTF-16 surrogate" in r.json()["error"]["message"]
