"""Evaluating a model folder as issue 27 does (a real parent, SmolLM2-135M-Instruct): a chat model whose template has
no reasoning toggle is asked once per prompt in its own mode ("single"), and ``thinkfast eval --model DIR`` with
the embedded config works on any suites, the settings that do not apply skipped with a note."""

from __future__ import annotations

import json

import pytest
from test_eval_endpoint import tiny_chat_model
from transformers import AutoTokenizer

import thinkfast.stages.eval as stage
from thinkfast.cli import main
from thinkfast.evaluation.harness import chat_ids, chat_modes, models_table
from thinkfast.generation import LocalBackend
from thinkfast.stages.eval import EvalConfig, evaluate_folder
from thinkfast.toggle import has_toggle

# ChatML as SmolLM2 and Qwen write it, without the toggle: enable_thinking changes nothing
PLAIN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def plain_chat_model(path):
    """:func:`tiny_chat_model` with its toggle template replaced by a plain one (no toggle)."""
    folder = tiny_chat_model(path)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = PLAIN_TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def asked(monkeypatch):
    """Every prompt the eval stage generates from, in order (the local backend, recorded)."""
    prompts: list[tuple[int, ...]] = []

    class Recording(LocalBackend):
        def generate(self, batch, params, **kwargs):
            prompts.extend(tuple(p) for p in batch)
            return super().generate(batch, params, **kwargs)

    monkeypatch.setattr(stage, "LocalBackend", Recording)
    return prompts


@pytest.fixture
def cli(capsys, monkeypatch):
    """``thinkfast eval --model FOLDER --out OUT key=value...`` -> (exit code, stdout, stderr), no progress bars."""
    monkeypatch.setattr("tqdm.auto.tqdm", lambda iterable, **kwargs: iterable)

    def run(folder, out, *overrides) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["eval", "--model", str(folder), "--out", str(out), *overrides])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_chat_modes_follow_the_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(plain_chat_model(tmp_path / "plain"))
    assert not has_toggle(tok) and chat_modes(tok) == ("single",)
    text = tok.decode(chat_ids(tok, [{"role": "user", "content": "2+2?"}], None))
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"  # its own template, nothing added
    toggled = AutoTokenizer.from_pretrained(tiny_chat_model(tmp_path / "nano"))
    assert chat_modes(toggled) == ("on", "off")


def test_a_chat_model_without_the_toggle_is_asked_once_in_its_own_mode(tmp_path, asked):
    cfg = EvalConfig(suites=["nano", "nano_phrased", "nano_if"], kinds=["add"], digits=[1], per_cell=3, samples=2,
                     if_problems=2, budgets=[0, None], max_new_tokens=4, device="cpu")
    m = evaluate_folder(cfg, plain_chat_model(tmp_path / "model"), tmp_path / "out")
    assert m["prompting"] == "chat" and list(m["modes"]) == ["single"]
    r = m["modes"]["single"]
    assert r["cells"]["add/1d"]["n"] == 3  # once per problem, greedy: not "on"'s samples, not "off" again
    assert r["format_ok"] is None and r["cells"]["add/1d"]["format_ok"] is None  # no toggle to obey
    assert list(m["suites"]["nano_phrased"]) == ["single"] and list(m["suites"]["nano_if"]) == ["single"]
    nano_if = m["suites"]["nano_if"]["single"]
    assert nano_if["format_ok"] is None and 0 <= nano_if["pass@1"] <= 1
    # nano 3 + nano_phrased 3 + nano_if 2, each asked once; the sweep skipped (no think block to budget)
    assert len(asked) == 3 + 3 + 2 and len(set(asked)) == len(asked)
    assert "budget" not in m and m["notes"] == [
        "the chat template has no reasoning toggle (enable_thinking changes nothing): every prompt is asked once, "
        "greedy, in its own mode 'single'; no toggle compliance",
        "budgets skipped: the model's chat template has no reasoning toggle, so no think block to budget"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert not any("detailed thinking" in tok.decode(p) for p in asked)  # no toggle system message
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {s["mode"] for s in samples} == {"single"} and all(s["format_ok"] is None for s in samples)
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "single acc" in table and "single (no toggle)" in table
    row = next(line for line in models_table({"parent": m}).splitlines() if line.startswith("parent"))
    assert row.split()[:5] == ["parent", "chat", "single", "(no", "toggle)"] and row.split()[-2] == "-"  # format n/a


def test_a_model_with_the_toggle_is_still_asked_in_both_modes(tmp_path, asked):
    cfg = EvalConfig(suites=["nano"], kinds=["add"], digits=[1], per_cell=3, samples=2, max_new_tokens=4, device="cpu")
    m = evaluate_folder(cfg, tiny_chat_model(tmp_path / "model"), tmp_path / "out")
    assert list(m["modes"]) == ["on", "off"] and m["notes"] == []
    assert m["modes"]["on"]["cells"]["add/1d"]["n"] == 6 and m["modes"]["off"]["cells"]["add/1d"]["n"] == 3
    assert 0 <= m["modes"]["on"]["format_ok"] <= 1 and len(asked) == 6 + 3
    assert "single" not in (tmp_path / "out" / "table.txt").read_text()


def test_eval_model_with_the_embedded_config_on_a_parent_without_the_toggle(tmp_path, cli):
    """The embedded config sweeps budgets and times throughput: on a parent without the toggle the sweep is skipped
    with a note and the table says which mode the model was asked in."""
    folder = plain_chat_model(tmp_path / "model")
    code, out, err = cli(folder, tmp_path / "out", "eval.suites=[nano,nano_if]", "eval.kinds=[add]", "eval.digits=[1]",
                         "eval.per_cell=2", "eval.if_problems=2", "eval.max_new_tokens=4", "eval.device=cpu")
    assert code == 0, err
    assert "eval: note: the chat template has no reasoning toggle" in out
    assert "eval: note: budgets skipped: the model's chat template has no reasoning toggle" in out
    metrics = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    [m] = metrics["models"].values()
    assert list(m["modes"]) == ["single"] and "budget" not in m and len(m["notes"]) == 2
    assert "throughput" in metrics  # what does apply still runs
    table = (tmp_path / "out" / "eval" / "table.txt").read_text()
    assert "single (no toggle)" in table and "throughput on" in table


def test_eval_model_with_the_embedded_config_on_a_real_suite_alone(tmp_path, cli):
    """``thinkfast eval --model DIR eval.suites=[ifeval]``, nothing else: the embedded config's budget sweep needs the
    nano suite, so it is skipped with a note (printed and in the metrics), not refused; no empty nano table."""
    from thinkfast.evaluation.suites import IFEVAL_FILE, data_root

    if not (data_root() / IFEVAL_FILE).is_file():
        pytest.skip(f"{data_root()} has no ifeval")
    folder = tiny_chat_model(tmp_path / "model")
    code, out, err = cli(folder, tmp_path / "out", "eval.suites=[ifeval]", "eval.suite_limit=2",
                         "eval.max_new_tokens=4", "eval.device=cpu")
    assert code == 0, err
    note = "budgets skipped: the sweep runs on the nano suite, which is not in eval.suites"
    assert f"eval: note: {note}" in out
    metrics = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    [m] = metrics["models"].values()
    assert m["notes"] == [note] and "budget" not in m and "modes" in m and not m["modes"]
    assert set(m["suites"]["ifeval"]) == {"on", "off"}
    table = (tmp_path / "out" / "eval" / "table.txt").read_text()
    assert table.startswith("model           suite") and "prompting" not in table  # the suites' table first
