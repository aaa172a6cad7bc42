"""Stage ``pretrain``: every parameter trained, deterministic batches, the learning-rate schedule, resuming an
interrupted run to the same weights, easy steps first."""

import json

import pytest
import torch
from helpers import smoke, state
from safetensors.torch import load_file

import thinkfast
from thinkfast.data import DataConfig
from thinkfast.pipeline import run_stage
from thinkfast.rundir import StageDir
from thinkfast.stages import pretrain



def test_interrupted_pretrain_resumes_to_the_same_weights(base, tmp_path, monkeypatch):
    ref = load_file(base[0] / "pretrain" / "model" / "model.safetensors")
    real_make_batch = pretrain.make_batch

    def failing(cfg, data, tok, step):
        if step == 4:  # after the checkpoint at step 3
            raise KeyboardInterrupt
        return real_make_batch(cfg, data, tok, step)

    run = tmp_path / "run"
    monkeypatch.setattr(pretrain, "make_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        run_stage(smoke(run), "pretrain")
    work = StageDir(run, "pretrain.partial")
    assert not (run / "pretrain").exists() and (work.checkpoint_dir / "state.json").is_file()
    assert not list(work.checkpoint_dir.glob("*.pt"))  # no pickle
    assert state(run, "pretrain") == "partial"
    monkeypatch.setattr(pretrain, "make_batch", real_make_batch)
    metrics, ran = run_stage(smoke(run), "pretrain")
    assert ran and not work.path.exists() and not (run / "pretrain" / "checkpoint").exists()
    got = load_file(run / "pretrain" / "model" / "model.safetensors")
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k
    starts = [json.loads(x) for x in (run / "pretrain" / "log.jsonl").read_text().splitlines() if '"start"' in x]
    assert [s["resume_step"] for s in starts] == [0, 3]


def test_pretrain_changes_every_parameter_and_batches_are_deterministic():
    cfg = pretrain.PretrainConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48,
                                  batch_size=2, seq_len=64)
    data = DataConfig(digits=[1])
    tok = thinkfast.nano.tokenizer.build_tokenizer()
    a, b = pretrain.make_batch(cfg, data, tok, 5), pretrain.make_batch(cfg, data, tok, 5)
    assert torch.equal(a, b) and not torch.equal(a, pretrain.make_batch(cfg, data, tok, 6))
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


def test_documents_longer_than_a_row_are_measured():
    tok = thinkfast.nano.tokenizer.build_tokenizer()
    short, mul = pretrain.PretrainConfig(seq_len=64), DataConfig(digits=[2], kinds=["mul"], think_fraction=1.0)
    assert pretrain.too_long_fraction(short, mul, tok) == 1.0  # every worked 2-digit product exceeds 64 tokens
    long = pretrain.PretrainConfig(seq_len=1024)
    assert pretrain.too_long_fraction(long, DataConfig(digits=[1, 2]), tok) == 0.0


def test_pretrain_easy_steps_draw_small_numbers_first():
    import re

    from thinkfast.data import DataConfig
    from thinkfast.nano.tokenizer import build_tokenizer
    from thinkfast.stages.pretrain import PretrainConfig, make_batch

    tok = build_tokenizer()
    cfg = PretrainConfig(easy_steps=2, batch_size=2, seq_len=256)
    data = DataConfig(kinds=["add"], digits=[3], think_fraction=0.0)
    early = tok.batch_decode(make_batch(cfg, data, tok, 1))
    late = tok.batch_decode(make_batch(cfg, data, tok, 2))
    questions = lambda rows: [q for r in rows for q in re.findall(r"Problem: (\d+) \+ (\d+)", r)]  # noqa: E731
    assert questions(early) and all(len(a) == 1 and len(b) == 1 for a, b in questions(early))
    assert questions(late) and all(len(a) == 3 for a, _ in questions(late))
    with pytest.raises(ValueError, match="easy_digits"):
        PretrainConfig(easy_digits=[])

