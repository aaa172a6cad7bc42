"""The shared training loop: schedule, optimizer groups, RNG state, and a resumed run that equals an
uninterrupted one (weights, optimizer, counters, random draws)."""

import json
import os
import random

import numpy as np
import pytest
import torch

from thinkfast.rundir import StageDir
from thinkfast.runtime import autocast, native_bf16, resolve_precision
from thinkfast.train.loop import TrainLoop, adamw, get_rng_state, optimizer_step, set_rng_state, warmup_cosine


def test_warmup_cosine():
    lr = [warmup_cosine(s, lr=1.0, total=100, warmup=10, min_ratio=0.1) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0) and lr[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))
    assert warmup_cosine(500, lr=1.0, total=100, warmup=0) == pytest.approx(0.0)


def test_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = adamw(model, lr=0.1, weight_decay=0.5)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.5 and [p.dim() for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert adamw(model.parameters(), lr=0.1).param_groups[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="precision"):
        autocast(torch.device("cpu"), "fp16")


def test_auto_precision_is_bf16_only_where_native():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve_precision(cpu, "fp32") == "fp32" and resolve_precision(cpu, "bf16") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision(cpu, "half")


def test_rng_state_round_trip():
    state = get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def _train(stage, steps, stop_at=None):
    """A model trained on noisy batches drawn from the global RNGs (so resume must restore them)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = adamw(model, lr=0.05, weight_decay=0.1)
    loop = TrainLoop(stage, "fit", steps, opt, schedule=lambda s: warmup_cosine(s, lr=0.05, total=steps, warmup=2),
                     log_every=2, checkpoint_every=3, save=lambda: {"model": model.state_dict()},
                     load=lambda st: model.load_state_dict(st["model"]))
    for step in loop:
        if step == stop_at:
            raise KeyboardInterrupt
        x = torch.randn(8, 4) + float(np.random.rand()) + random.random()
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        optimizer_step(opt, loss, clip=1.0)
        loop.end_step(step, loss=loss.item(), tokens=8)
    loop.close()
    loop.log.close()
    return model, loop


def test_resumed_loop_equals_uninterrupted(tmp_path):
    random.seed(5), np.random.seed(5)
    ref, ref_loop = _train(StageDir(tmp_path, "a"), 10)
    stage = StageDir(tmp_path, "b")
    random.seed(5), np.random.seed(5)
    with pytest.raises(KeyboardInterrupt):
        _train(stage, 10, stop_at=7)  # after the checkpoint at step 6
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # other draws in between: restored on resume
    got, loop = _train(stage, 10)
    assert loop.start == 6
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)
    assert loop.counters == ref_loop.counters == {"tokens": 80}
    assert loop.loss_ema == pytest.approx(ref_loop.loss_ema, rel=1e-12)
    events = [json.loads(x) for x in stage.log_path.read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "fit"] == [2, 4, 6, 8, 10]
    assert any(e["event"] == "resume" and e["step"] == 6 for e in events)
    assert "lr" in events[-1] and events[-1]["tokens"] == 80


def test_old_checkpoints_without_rng_or_counters_resume(tmp_path):
    from thinkfast.train.checkpoint import save_state

    stage = StageDir(tmp_path, "old")
    model = torch.nn.Linear(2, 1)
    opt = adamw(model, lr=0.1)
    save_state(stage.checkpoint_dir, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 4,
                                      "elapsed": 2.0, "tokens": 40})
    loop = TrainLoop(stage, "fit", 10, opt, load=lambda st: model.load_state_dict(st["model"]))
    assert loop.start == 4 and loop.counters == {"tokens": 40} and loop.seconds >= 2.0
    loop.log.close()


def test_setup_device_respects_omp_num_threads(monkeypatch):
    from thinkfast.runtime import setup_device

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert setup_device("cpu").type == "cpu" and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        setup_device("cpu")
        assert torch.get_num_threads() == max(1, os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
