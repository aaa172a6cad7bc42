"""The smallest pipeline end to end, stage skip/resume, config errors and the CLI."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import thinkfast
from thinkfast.cli import main
from thinkfast.config import ConfigError
from thinkfast.pipeline import default_config_path, load_pipeline, run_all, run_stage
from thinkfast.rundir import StageConfigMismatch, StageDir
from thinkfast.stages import pretrain

SMOKE = default_config_path("smoke")
REPO = Path(__file__).resolve().parents[1]


def smoke(tmp_path, *overrides):
    return load_pipeline(SMOKE, [f"run_dir={tmp_path / 'run'}", *overrides])


def test_repo_configs_are_the_embedded_ones():
    for name in ("nano", "smoke"):
        assert (REPO / "configs" / f"{name}.yaml").read_text() == default_config_path(name).read_text()
        load_pipeline(default_config_path(name))  # every section validates


def test_smoke_pipeline_end_to_end(tmp_path):
    pipe = smoke(tmp_path)
    results = run_all(pipe)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "pretrain").iterdir()) == [
        "COMPLETE.json", "STARTED.json", "log.jsonl", "metrics.json", "model"]
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "COMPLETE.json", "STARTED.json", "log.jsonl", "metrics.json", "samples.jsonl", "table.txt"]
    model_files = {p.name for p in (run / "pretrain" / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "thinkfast.json"} <= model_files
    assert results["pretrain"]["train_steps"] == 6 and results["pretrain"]["tokens"] == 6 * 4 * 256
    ev = results["eval"]
    assert ev["prompting"] == "text" and set(ev["modes"]) == {"think", "direct"}
    assert set(ev["modes"]["think"]["cells"]) == {"add/1d", "mul/1d"}
    assert ev["modes"]["think"]["cells"]["add/1d"]["n"] == 4
    events = [json.loads(line)["event"] for line in (run / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "done" and "train" in events
    # the parent is a plain Llama with the nano tokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "pretrain" / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(run / "pretrain" / "model").chat_template

    # Puzzle: library -> scores -> costs -> search, and the child is a nemotron-nas model with the tokenizer
    assert {p.name for p in (run / "library" / "library").iterdir()} == {"library.json", "weights.safetensors"}
    assert (run / "scores" / "scores.json").is_file() and (run / "costs" / "costs.json").is_file()
    assert {"architecture.txt", "search.json", "pareto.json", "pareto.md", "model"} <= {
        p.name for p in (run / "search").iterdir()}
    assert results["search"]["speedup"] >= 1.2 and results["search"]["optimal"]
    child = AutoModelForCausalLM.from_pretrained(run / "search" / "model")
    assert type(child).__name__ == "DeciLMForCausalLM"
    assert json.loads((run / "search" / "model" / "thinkfast.json").read_text())["prompting"] == "text"

    # a second run skips every stage and changes nothing
    marker = (run / "pretrain" / "COMPLETE.json").read_text()
    again = run_all(smoke(tmp_path))
    assert (run / "pretrain" / "COMPLETE.json").read_text() == marker
    assert again["pretrain"] == results["pretrain"]


def test_changed_config_of_completed_stage_needs_force(tmp_path):
    run_stage(smoke(tmp_path), "pretrain")
    with pytest.raises(StageConfigMismatch, match="--force"):
        run_stage(smoke(tmp_path, "pretrain.lr=0.01"), "pretrain")
    metrics, ran = run_stage(smoke(tmp_path, "pretrain.lr=0.01"), "pretrain", force=True)
    assert ran and metrics["train_steps"] == 6


def test_redone_upstream_reruns_downstream(tmp_path):
    run_all(smoke(tmp_path, "stages=[pretrain,eval]"))
    first = json.loads((tmp_path / "run" / "eval" / "COMPLETE.json").read_text())
    run_all(smoke(tmp_path, "stages=[pretrain,eval]"), force=True)
    second = json.loads((tmp_path / "run" / "eval" / "COMPLETE.json").read_text())
    assert first["config_hash"] != second["config_hash"]  # the upstream marker is part of its identity
    # forcing pretrain alone leaves eval stale: running eval without --force is refused
    run_stage(smoke(tmp_path, "stages=[pretrain,eval]"), "pretrain", force=True)
    with pytest.raises(StageConfigMismatch):
        run_stage(smoke(tmp_path, "stages=[pretrain,eval]"), "eval")


class Interrupt(Exception):
    pass


def test_interrupted_pretrain_resumes_to_the_same_weights(tmp_path, monkeypatch):
    # uninterrupted reference
    ref_pipe = load_pipeline(SMOKE, [f"run_dir={tmp_path / 'ref'}"])
    run_stage(ref_pipe, "pretrain")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "pretrain" / "model").state_dict()

    real_make_batch = pretrain.make_batch

    def failing(cfg, tok, step):
        if step == 4:  # after the checkpoint at step 3
            raise Interrupt
        return real_make_batch(cfg, tok, step)

    pipe = smoke(tmp_path)
    monkeypatch.setattr(pretrain, "make_batch", failing)
    with pytest.raises(Interrupt):
        run_stage(pipe, "pretrain")
    stage = StageDir(tmp_path / "run", "pretrain")
    assert not stage.is_complete() and (stage.checkpoint_dir / "state.pt").is_file()
    assert torch.load(stage.checkpoint_dir / "state.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(pretrain, "make_batch", real_make_batch)
    metrics, ran = run_stage(smoke(tmp_path), "pretrain")
    assert ran and stage.is_complete() and not stage.checkpoint_dir.exists()
    got = AutoModelForCausalLM.from_pretrained(stage.model_dir).state_dict()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k
    starts = [json.loads(x) for x in stage.log_path.read_text().splitlines() if '"start"' in x]
    assert [s["resume_step"] for s in starts] == [0, 3]


def test_pretrain_changes_every_parameter_and_batches_are_deterministic():
    cfg = pretrain.PretrainConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48,
                                  batch_size=2, seq_len=64, digits=[1])
    tok = thinkfast.nano.tokenizer.build_tokenizer()
    a, b = pretrain.make_batch(cfg, tok, 5), pretrain.make_batch(cfg, tok, 5)
    assert torch.equal(a, b) and not torch.equal(a, pretrain.make_batch(cfg, tok, 6))
    assert a.shape == (2, 65)
    assert tok.decode(a[0].tolist()).startswith("Problem: ")  # every row opens a document
    model = pretrain.build_parent(cfg, tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = pretrain._optimizer(model, cfg)
    out = model(input_ids=a[:, :-1], labels=a[:, :-1])
    out.loss.backward()
    opt.step()
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p)] == []


def test_lr_schedule():
    cfg = pretrain.PretrainConfig(train_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert pretrain.lr_at(cfg, 0) == pytest.approx(0.1)
    assert pretrain.lr_at(cfg, 9) == pytest.approx(1.0)
    assert pretrain.lr_at(cfg, 100) == pytest.approx(0.1)
    assert 0.1 < pretrain.lr_at(cfg, 55) < 1.0


def test_bad_configs_name_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nstages: [pretrain]\npretrain:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line 4: unknown key 'pretrain.hiden_size'.*did you mean 'pretrain.hidden_size'"):
        load_pipeline(bad)
    bad.write_text("stages: [pretrain, finetune]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown stage\(s\) \['finetune'\]"):
        load_pipeline(bad)
    bad.write_text("pretrain:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"line 2: 'pretrain.lr' must be float"):
        load_pipeline(bad)
    bad.write_text("pretrain:\n  kinds: [add, div]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'pretrain'.*unknown kind\(s\) \['div'\]"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="unknown key 'eval.per_cel'"):
        load_pipeline(SMOKE, ["eval.per_cel=3"])


def test_cli_runs_and_reports_errors(tmp_path, capsys):
    assert main(["pretrain", "--config", str(SMOKE), f"run_dir={tmp_path / 'r'}", "pretrain.train_steps=2"]) == 0
    assert json.loads((tmp_path / "r" / "pretrain" / "metrics.json").read_text())["train_steps"] == 2
    model = tmp_path / "r" / "pretrain" / "model"
    assert main(["eval", "--config", str(SMOKE), "--model", str(model), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "eval" / "metrics.json").is_file()
    assert main(["convert", str(model), str(tmp_path / "nas")]) == 0
    assert json.loads((tmp_path / "nas" / "config.json").read_text())["model_type"] == "nemotron-nas"
    assert (tmp_path / "nas" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "nas" / "thinkfast.json").read_text())["prompting"] == "text"
    capsys.readouterr()
    assert main(["run", "--config", str(SMOKE), "pretrain.nope=1"]) == 2
    assert "unknown key 'pretrain.nope'" in capsys.readouterr().err
    assert main(["search", "--config", str(SMOKE), f"run_dir={tmp_path / 'none'}"]) == 2  # nothing to search yet
    assert "stage 'costs' (before 'search') has not completed" in capsys.readouterr().err


def test_eval_chat_modes_sample_on_and_greedy_off(tmp_path):
    pipe = smoke(tmp_path, "eval.prompting=chat", "eval.samples=2")
    run_stage(pipe, "pretrain")
    metrics, _ = run_stage(pipe, "eval")
    assert metrics["prompting"] == "chat" and set(metrics["modes"]) == {"on", "off"}
    assert metrics["modes"]["on"]["cells"]["add/1d"]["n"] == 8  # per_cell x samples
    assert metrics["modes"]["off"]["cells"]["add/1d"]["n"] == 4  # greedy: one sample
    for mode in ("on", "off"):
        assert 0.0 <= metrics["modes"][mode]["format_ok"] <= 1.0
    samples = [json.loads(x) for x in (tmp_path / "run" / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {s["mode"] for s in samples} == {"on", "off"}


def test_documents_longer_than_a_row_are_measured():
    tok = thinkfast.nano.tokenizer.build_tokenizer()
    short = pretrain.PretrainConfig(seq_len=64, digits=[2], kinds=["mul"], think_fraction=1.0)
    assert pretrain.too_long_fraction(short, tok) == 1.0  # every worked 2-digit product exceeds 64 tokens
    assert pretrain.too_long_fraction(pretrain.PretrainConfig(seq_len=1024, digits=[1, 2]), tok) == 0.0
