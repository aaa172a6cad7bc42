"""The eval harness grades a model behind an OpenAI-compatible server exactly as it grades the local folder, and a
server that misbehaves (wrong URL, garbage, errors, no answer) ends the evaluation with one line saying so."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from helpers import serve_in_thread
from test_modeling import hetero_config

from thinkfast.artifacts import write_model_sidecar
from thinkfast.cli import main
from thinkfast.generation.endpoint import Endpoint, EndpointError
from thinkfast.generation import SamplingParams
from thinkfast.modeling import DeciLMForCausalLM
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.stages.eval import EvalConfig, evaluate_folder


def tiny_chat_model(path):
    """A random nemotron-nas model with the nano tokenizer (toggle chat template), saved as a chat model."""
    tok = build_tokenizer()
    cfg = hetero_config()
    cfg.vocab_size, cfg.max_position_embeddings = len(tok), 1024
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    model = DeciLMForCausalLM(cfg).eval()
    with torch.no_grad():  # big enough weights that the responses differ from prompt to prompt
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_model_sidecar(path, prompting="chat", made_by="test")
    return path


def _samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_a_served_model_is_graded_like_the_local_folder(tmp_path):
    from thinkfast.serving.server import load_state

    folder = tiny_chat_model(tmp_path / "model")
    common = dict(model=str(folder), per_cell=2, digits=[1], max_new_tokens=24, on_temperature=0.0, save_samples=2,
                  device="cpu")
    local = evaluate_folder(EvalConfig(**common), folder, tmp_path / "local")
    base, stop = serve_in_thread(load_state(folder, max_batch=8, device="cpu"))
    try:
        served = evaluate_folder(EvalConfig(**common, endpoint=base + "/v1", endpoint_concurrency=4), folder,
                                 tmp_path / "served")
    finally:
        stop()
    assert served["model"].endswith(f"at {base}/v1")
    n = 2 * 4 * 2  # problems per cell x kinds (one digit, one step) x modes: one request each, and GET /models
    assert served["endpoint"] == {"url": base + "/v1", "model": str(folder), "requests": 1 + n, "retries": 0,
                                  "timeout": 300.0, "max_retries": 2}
    assert served["notes"] == [] and local["notes"] == [] and "endpoint" not in local
    for mode in ("on", "off"):
        a, b = local["modes"][mode], served["modes"][mode]
        assert a["accuracy"] == b["accuracy"] and a["format_ok"] == b["format_ok"]
        assert abs(a["mean_tokens"] - b["mean_tokens"]) <= 0.1 * a["mean_tokens"]  # re-tokenized text
    responses = [s["response"] for s in _samples(tmp_path / "local")]
    assert len(set(responses)) > 2 and responses == [s["response"] for s in _samples(tmp_path / "served")]


class FakeServer:
    """An OpenAI-compatible server that misbehaves as ``mode`` says (stdlib, a thread per request, port 0).

    ``/v1/models`` lists one model (``models-html``: an HTML page instead); any other path is a 404 as FastAPI
    answers it. ``/v1/completions`` answers by mode: ``ok``, ``html``, ``not-json``, ``wrong-shape``,
    ``empty-choices``, ``no-text``, ``bad-tokens``, ``http-500`` (always), ``500-once`` (then ok), ``http-400``
    (a request error, as vLLM words one) or ``hang`` (no answer until the server is stopped)."""

    PAGE = "<!DOCTYPE html>\n<html>\n<head><title>Welcome to nginx!</title></head>\n<body>\n</body>\n</html>\n"
    ANSWERS = {
        "ok": (200, {"object": "text_completion", "model": "fake", "usage": {"completion_tokens": 4},
                     "choices": [{"index": 0, "text": "Answer: 5", "finish_reason": "stop"}]}),
        "html": (200, PAGE),
        "not-json": (200, "choices: none today"),
        "wrong-shape": (200, {"result": "Answer: 5"}),
        "empty-choices": (200, {"choices": [], "usage": {"completion_tokens": 0}}),
        "no-text": (200, {"choices": [{"index": 0, "finish_reason": "stop"}]}),
        "bad-tokens": (200, {"choices": [{"text": "5"}], "usage": {"completion_tokens": "four"}}),
        "http-500": (500, "Internal Server Error"),
        "http-400": (400, {"object": "error", "type": "BadRequestError", "code": 400,
                           "message": "This model's maximum context length is 1024 tokens."}),
    }

    def __init__(self, mode: str = "ok"):
        self.mode, self.posts, self.release = mode, 0, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, body):
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path != "/v1/models":
                    return self.reply(404, {"detail": "Not Found"})
                if server.mode == "models-html":
                    return self.reply(200, FakeServer.PAGE)
                self.reply(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/v1/completions":
                    return self.reply(404, {"detail": "Not Found"})
                server.posts += 1
                mode = server.mode
                if mode == "hang":
                    server.release.wait(10)
                    mode = "ok"
                elif mode == "500-once":
                    mode = "http-500" if server.posts == 1 else "ok"
                self.reply(*FakeServer.ANSWERS[mode])

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64  # not 5: sixteen clients connecting at once are not reset

            def handle_error(self, request, client_address):  # a client that timed out and left is no failure
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


PROMPTS = [[1, 2, 3]] * 3


def _fails(url: str, **kw) -> str:
    """The EndpointError of evaluating PROMPTS at ``url``, checked to be one line naming the endpoint."""
    with pytest.raises(EndpointError) as e:
        Endpoint(url, build_tokenizer(), backoff=0.01, **kw).generate(PROMPTS, SamplingParams(max_new_tokens=4))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"eval.endpoint={url}: ")
    return message


@pytest.mark.parametrize("mode, says", [
    ("html", "HTTP 200 that is not JSON: '<!DOCTYPE html> <html> <head><title>Welcome to nginx!"),
    ("not-json", "HTTP 200 that is not JSON: 'choices: none today'"),
    ("wrong-shape", 'HTTP 200 of the wrong shape (no "choices" list): \'{"result": "Answer: 5"}\''),
    ("empty-choices", 'HTTP 200 of the wrong shape (an empty "choices" list)'),
    ("no-text", 'HTTP 200 of the wrong shape (no "text" string in choices[0])'),
    ("bad-tokens", "HTTP 200 of the wrong shape (usage.completion_tokens='four' is not a count)"),
    ("http-400", "HTTP 400: \"This model's maximum context length is 1024 tokens.\""),
])
def test_a_garbage_answer_is_one_line_naming_request_and_answer_and_is_not_retried(mode, says):
    with FakeServer(mode) as fake:
        message = _fails(fake.url + "/v1", concurrency=1)
        assert " POST /v1/completions (prompt 1 of 3) answered " + says in message
        assert fake.posts == 1  # neither retried nor followed by the other prompts


def test_server_errors_are_retried_counted_and_reported_with_the_attempts():
    with FakeServer("http-500") as fake:
        message = _fails(fake.url + "/v1", concurrency=1, retries=2)
        assert message.endswith(" POST /v1/completions (prompt 1 of 3) answered HTTP 500: 'Internal Server Error' "
                                "(gave up after 3 attempts)")
        assert fake.posts == 3
    lines = []
    with FakeServer("500-once") as fake:
        endpoint = Endpoint(fake.url + "/v1", build_tokenizer(), backoff=0.01, on_retry=lines.append)
        out = endpoint.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4))
    assert [(c.text, c.num_tokens, c.finish_reason) for c in out] == [("Answer: 5", 4, "stop")]
    assert endpoint.stats() == {"url": fake.url + "/v1", "model": "fake", "requests": 3, "retries": 1,
                                "timeout": 300.0, "max_retries": 2}
    assert lines == [f"eval.endpoint={fake.url}/v1: POST /v1/completions (prompt 1 of 1) answered HTTP 500: "
                     "'Internal Server Error'; retry 1 of 2 in 0.01 s"]


def test_retries_are_in_the_metrics_and_the_log(tmp_path):
    folder = tiny_chat_model(tmp_path / "model")
    with FakeServer("500-once") as fake:
        m = evaluate_folder(EvalConfig(model=str(folder), endpoint=fake.url + "/v1", endpoint_concurrency=1,
                                       kinds=["add"], per_cell=1, digits=[1], device="cpu"), folder, tmp_path / "out")
    # GET /models, one prompt per mode, one retry
    assert m["endpoint"]["requests"] == 1 + 2 + 1 and m["endpoint"]["retries"] == 1
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    [retry] = [e for e in log if e["event"] == "endpoint_retry"]
    assert "(prompt 1 of 1) answered HTTP 500: 'Internal Server Error'; retry 1 of 2 in 0.5 s" in retry["message"]


def test_a_server_that_stops_answering_times_out_once_per_attempt():
    t0 = time.monotonic()
    with FakeServer("hang") as fake:
        message = _fails(fake.url + "/v1", timeout=0.5, retries=1)
    assert time.monotonic() - t0 < 5  # two timeouts of 0.5 s, not one per prompt, and the server let go
    assert "POST /v1/completions (prompt " in message and " of 3) got no answer in 0.5 s (gave up after 2 " \
        "attempts; raise eval.endpoint_timeout if the server is only slow)" in message


def test_a_wrong_url_or_a_server_that_is_not_openai_fails_at_the_start():
    with FakeServer() as fake:
        message = _fails(fake.url)
        assert message == (f"eval.endpoint={fake.url}: GET /models answered HTTP 404: 'Not Found'; did you mean "
                           f"{fake.url}/v1?")
        fake.mode = "models-html"
        assert " GET /v1/models answered HTTP 200 that is not JSON: '<!DOCTYPE html>" in _fails(fake.url + "/v1")
        assert fake.posts == 0
    message = _fails("http://127.0.0.1:9/v1", retries=1)
    assert message.startswith("eval.endpoint=http://127.0.0.1:9/v1: GET /v1/models connection failed (")
    assert "Connection refused" in message and message.endswith("(gave up after 2 attempts)")


@pytest.fixture
def cli(capsys, monkeypatch):
    """``thinkfast eval --model FOLDER --out OUT key=value...`` -> (exit code, stdout, stderr), no progress bars."""
    monkeypatch.setattr("tqdm.auto.tqdm", lambda iterable, **kwargs: iterable)

    def run(folder, out, *overrides) -> tuple[int, str, str]:
        capsys.readouterr()  # not what came before
        code = main(["eval", "--model", str(folder), "--out", str(out), *overrides])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.mark.parametrize("mode, path, says", [
    ("ok", "", "GET /models answered HTTP 404: 'Not Found'; did you mean "),
    ("html", "/v1", "POST /v1/completions (prompt 1 of 4) answered HTTP 200 that is not JSON: '<!DOCTYPE html>"),
    ("empty-choices", "/v1", 'answered HTTP 200 of the wrong shape (an empty "choices" list)'),
    ("http-500", "/v1", "answered HTTP 500: 'Internal Server Error' (gave up after 2 attempts)"),
])
def test_the_cli_reports_a_misbehaving_server_in_one_line(tmp_path, cli, mode, path, says):
    folder = tiny_chat_model(tmp_path / "model")
    with FakeServer(mode) as fake:
        code, _, err = cli(folder, tmp_path / "out", f"eval.endpoint={fake.url}{path}", "eval.per_cell=1",
                            "eval.digits=[1]", "eval.steps=[2]", "eval.endpoint_retries=1",
                            "eval.endpoint_concurrency=1")
    assert code == 1 and err.count("\n") == 1 and "bug in thinkfast" not in err
    assert err.startswith(f"thinkfast: error: eval.endpoint={fake.url}{path}: ") and says in err
    assert not list((tmp_path / "out" / "eval").glob("*/metrics.json"))  # nothing half-done is kept


def test_the_readme_endpoint_command_works_with_the_embedded_config(tmp_path, cli):
    """`thinkfast eval --model DIR eval.endpoint=URL` as the README writes it: the embedded config's budget sweep
    and throughput do not apply to a server and are skipped with a note, not refused."""
    folder = tiny_chat_model(tmp_path / "model")
    with FakeServer() as fake:
        code, out, err = cli(folder, tmp_path / "out", f"eval.endpoint={fake.url}/v1")
    assert code == 0, err
    [metrics_file] = (tmp_path / "out" / "eval").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    # the embedded config: per_cell x cells (3 arithmetic kinds x 3 digits + word problems x 3 digits x 2 steps) x
    # modes, for nano and nano_phrased, then nano_if x modes
    n = 40 * (3 * 3 + 3 * 2) * 2 * 2 + 100 * 2
    assert metrics["endpoint"] == {"url": fake.url + "/v1", "model": "fake", "requests": 1 + n, "retries": 0,
                                   "timeout": 300.0, "max_retries": 2} and fake.posts == n
    assert metrics["notes"] == ["budgets skipped: the thinking budget runs inside the local engine, not on a "
                                "server (eval.endpoint)"] and "budget" not in metrics
    assert "eval: note: budgets skipped" in out and "eval: note: throughput_batches skipped" in out
    assert not (tmp_path / "out" / "eval" / "throughput.json").exists()


def test_settings_that_do_not_apply_are_notes_and_wrong_ones_errors(tmp_path):
    from thinkfast.stages.eval import budget_note

    assert "server" in budget_note(EvalConfig(model="m", endpoint="http://h:1/v1", budgets=[0], throughput_batches=[1]))
    assert "nano suite" in budget_note(EvalConfig(suites=["gsm8k"], budgets=[0]))
    assert budget_note(EvalConfig(budgets=[0]), "chat") is None and budget_note(EvalConfig(), "text") is None
    for wrong, key in [(dict(endpoint="localhost:8000"), "http"), (dict(endpoint_timeout=0), "endpoint_timeout"),
                       (dict(endpoint_retries=-1), "endpoint_retries"), (dict(budgets=[-1]), "budgets")]:
        with pytest.raises(ValueError, match=key):
            EvalConfig(model="m", **wrong)
    with pytest.raises(ValueError, match="eval.model"):
        EvalConfig(endpoint="http://127.0.0.1:1/v1")
    # a text-prompted model has no think block to budget: skipped with a note (it used to be silent)
    folder = tiny_chat_model(tmp_path / "model")
    m = evaluate_folder(EvalConfig(prompting="text", budgets=[0], kinds=["add"], per_cell=1, digits=[1],
                                   max_new_tokens=4, device="cpu"), folder, tmp_path / "out")
    assert m["notes"] == ["budgets skipped: the model is prompted as text, with no think block to budget"]
    assert "budget" not in m and set(m["modes"]) == {"think", "direct"}


def test_missing_suite_data_fails_before_anything_is_generated(tmp_path, monkeypatch, cli):
    import thinkfast.stages.eval as stage

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded or a suite evaluated before the data was checked")

    for name in ("load_model", "evaluate", "evaluate_items", "evaluate_ifeval"):
        monkeypatch.setattr(stage, name, never)
    monkeypatch.setenv("THINKFAST_DATA", str(tmp_path / "data"))
    folder = tiny_chat_model(tmp_path / "model")
    code, _, err = cli(folder, tmp_path / "out", "eval.suites=[nano,gsm8k,ifeval]", "eval.budgets=[]")
    data = tmp_path / "data"
    assert code == 2 and err == (f"thinkfast: error: eval: no data for suite(s) gsm8k ({data}/gsm8k/test.jsonl), "
                                 f"ifeval ({data}/ifeval/input_data.jsonl): put the files under {data} (the shared "
                                 "data folder; see its SOURCES.md), set THINKFAST_DATA to a folder that has them, "
                                 "or drop the suites from eval.suites\n")
    with pytest.raises(FileNotFoundError, match="gsm8k"):
        evaluate_folder(EvalConfig(suites=["nano", "gsm8k"], device="cpu"), folder, tmp_path / "direct")
