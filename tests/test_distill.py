"""Recovery training: the distillation losses, and the `distill` stage (lowers KL to its teacher, resumes to the
same weights, continued pretraining without a teacher, clear errors)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.stages import distill
from thinkfast.train.distill import TeacherCache, cosine_loss, forward_kl, layer_map, topk_kl


def test_forward_kl_and_temperature():
    t = torch.randn(3, 5, 11)
    assert forward_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(3, 5, 11)
    p, q = torch.softmax(t, -1), torch.log_softmax(s, -1)
    assert forward_kl(t, s).item() == pytest.approx((p * (p.log() - q)).sum(-1).mean().item(), rel=1e-5)
    assert forward_kl(t, s, 2.0).item() == pytest.approx(4 * forward_kl(t / 2, s / 2).item(), rel=1e-5)


def test_topk_kl_is_the_kl_over_the_cached_tokens(tmp_path):
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    full = t.topk(11, dim=-1)
    assert topk_kl(full.values, full.indices, s, 1.5).item() == pytest.approx(forward_kl(t, s, 1.5).item(), rel=1e-5)
    top = t.topk(3, dim=-1)
    p = torch.softmax(top.values, -1)
    q = torch.log_softmax(s, -1).gather(-1, top.indices)
    assert topk_kl(top.values, top.indices, s).item() == pytest.approx((p * (p.log() - q)).sum(-1).mean().item(),
                                                                       rel=1e-5)
    # the cache: shards on disk, resumable, the same rows and top-k the teacher gives
    teacher = torch.nn.Module()
    teacher.device = torch.device("cpu")
    teacher.forward = lambda x: type("Out", (), {"logits": torch.nn.functional.one_hot(x, 13).float() * 3})()
    rows = lambda step: torch.arange(step, step + 8).reshape(2, 4) % 13  # noqa: E731
    cache = TeacherCache(tmp_path / "cache", k=2, shard_steps=3)
    cache.build(teacher, rows, steps=7, progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"shard-0000{i}.safetensors" for i in range(3)]
    ids, values, indices = cache.get(5)
    assert torch.equal(ids, rows(5)) and values.shape == (2, 3, 2) and torch.equal(indices[..., 0], rows(5)[:, :-1])
    (tmp_path / "cache" / "shard-00001.safetensors").unlink()
    cache.build(teacher, rows, steps=7, progress=False)
    assert (tmp_path / "cache" / "shard-00001.safetensors").is_file()


def test_cosine_loss_and_layer_map():
    h = [torch.randn(2, 3, 8) for _ in range(4)]  # embeddings + 3 layers
    assert cosine_loss(h, h, [(0, 0), (1, 1), (2, 2)]).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(h, [-x for x in h], [(2, 2)]).item() == pytest.approx(2.0, abs=1e-5)
    assert layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]
    # a Puzzle child that keeps its removed layers as identities: a layer to what the next kept one reads
    assert layer_map(5, 5, identity=[True, False, True, True, False]) == [(1, 3), (4, 4)]
    assert layer_map(2, 5) == [(1, 4)]
    assert layer_map(3, 5, [[0], [3], [4]]) == [(0, 0), (1, 3), (2, 4)]
    assert layer_map(3, 8, [[0], [1, 2, 3, 4, 5, 6], [7]]) == [(0, 0), (1, 6), (2, 7)]  # what the next layer reads
    for bad in ([[0], [7], [4]], [[0], [3, 2], [4]], [[0], [], [4]], [[0, 1], [1], [4]]):
        with pytest.raises(ValueError, match="layer map"):
            layer_map(3, 5, bad)


def _llama(path, seed, layers=2):
    tok = build_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _pipe(tmp_path, run, *extra):
    return load_pipeline(default_config_path("smoke"), [
        f"run_dir={run}", "stages=[parent,distill]", f"parent.path={tmp_path / 'student'}",
        "distill.train_steps=12", "distill.batch_size=2", "distill.seq_len=48", "distill.lr=0.01",
        "distill.warmup_steps=2", "distill.eval_every=6", "distill.eval_rows=4", "distill.eval_problems=2",
        "distill.eval_max_new_tokens=6", "distill.checkpoint_every=4", *extra])


def run_distill(pipe):
    run_stage(pipe, "parent")
    return run_stage(pipe, "distill")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    _llama(tmp / "student", 0)
    _llama(tmp / "teacher", 1, layers=3)
    return tmp


def test_distill_lowers_kl_and_writes_its_curve(folders, tmp_path):
    run = tmp_path / "run"
    m, _ = run_distill(_pipe(folders, run, f"distill.teacher={folders / 'teacher'}"))
    assert m["kl_after"] < 0.8 * m["kl_before"], m
    assert m["layer_pairs"] == 1  # 2 student layers, 3 teacher layers: the last ones only
    curve = json.loads((run / "distill" / "curve.json").read_text())["points"]
    assert [p["step"] for p in curve] == [0, 6, 12] and all("accuracy" in p for p in curve)
    assert curve[-1]["tokens"] == 12 * 2 * 47
    assert (run / "distill" / "curve.png").stat().st_size > 1000
    assert json.loads((run / "distill" / "model" / "thinkfast.json").read_text())["made_by"] == "distill"


def test_interrupted_distill_resumes_to_the_same_weights(folders, tmp_path, monkeypatch):
    teacher = f"distill.teacher={folders / 'teacher'}"
    run_distill(_pipe(folders, tmp_path / "ref", teacher))
    ref = load_file(tmp_path / "ref" / "distill" / "model" / "model.safetensors")
    real, calls = distill.optimizer_step, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 7:  # after the checkpoint at step 4 (and the eval at 6)
            raise KeyboardInterrupt
        return real(*a, **k)

    run = tmp_path / "run"
    monkeypatch.setattr(distill, "optimizer_step", failing)
    with pytest.raises(KeyboardInterrupt):
        run_distill(_pipe(folders, run, teacher))
    monkeypatch.setattr(distill, "optimizer_step", real)
    run_distill(_pipe(folders, run, teacher))
    got = load_file(run / "distill" / "model" / "model.safetensors")
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6), k
    ref_curve = json.loads((tmp_path / "ref" / "distill" / "curve.json").read_text())["points"]
    curve = json.loads((run / "distill" / "curve.json").read_text())["points"]
    assert [p["step"] for p in curve] == [p["step"] for p in ref_curve]
    assert curve[-1]["kl"] == pytest.approx(ref_curve[-1]["kl"], rel=1e-5)


def test_continued_pretraining_needs_no_teacher_and_distill_needs_one(folders, tmp_path):
    m, _ = run_distill(_pipe(folders, tmp_path / "lm", "distill.mode=lm"))
    assert m["mode"] == "lm" and m["kl_before"] is None and m["lm_loss_after"] < m["lm_loss_before"]
    with pytest.raises(ValueError, match="teacher and a student"):
        run_distill(_pipe(folders, tmp_path / "kd"))


def test_distill_from_cached_top_k_logits(folders, tmp_path):
    run = tmp_path / "run"
    m, _ = run_distill(_pipe(folders, run, f"distill.teacher={folders / 'teacher'}", "distill.teacher_top_k=8",
                             "distill.cosine_weight=0"))
    assert m["teacher"] == "top-8 cache" and m["kl_after"] < 0.8 * m["kl_before"], m
    assert not (run / "distill" / "teacher_cache").exists()  # an intermediate: gone with the stage
    with pytest.raises(ValueError, match="cosine_weight: 0"):
        distill.DistillConfig(teacher_top_k=8)
