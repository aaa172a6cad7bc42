"""Tests for thinkfast.train.checkpoint: pickle-free resumable state (state.json + tensors.safetensors)."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.config import ConfigError
from thinkfast.train import checkpoint as ckpt
from thinkfast.train.checkpoint import CheckpointError, has_state, load_state, save_state


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with tied embeddings (so its state_dict has tensors sharing memory)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def adamw(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, opt, step: int) -> float:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 64, (2, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_model_and_adamw_resume_bit_for_bit(tmp_path):
    model = tiny_llama()
    opt = adamw(model)
    for s in range(3):
        train_step(model, opt, s)
    save_state(tmp_path / "ckpt", {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3,
                                   "rng": torch.get_rng_state()})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["state.json", "tensors.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp folders left

    # the uninterrupted run goes on one more step
    train_step(model, opt, 3)

    # a fresh process would build a different model; restore everything from the folder
    state = load_state(tmp_path / "ckpt")
    model2 = tiny_llama(seed=123)
    opt2 = adamw(model2)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    assert state["step"] == 3
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95) and isinstance(opt2.param_groups[0]["betas"], tuple)
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])
    train_step(model2, opt2, 3)

    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)
    # tied weights are still tied after load_state_dict
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    expected = torch.rand(5)
    save_state(tmp_path / "c", {"rng": rng})
    torch.manual_seed(99)
    back = load_state(tmp_path / "c")["rng"]
    assert back.dtype == torch.uint8 and torch.equal(back, rng)
    torch.set_rng_state(back)
    assert torch.equal(torch.rand(5), expected)


def test_structure_round_trip(tmp_path):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {
        "ints": {0: "a", 1: {2: [3, 4]}, -5: None},
        "mixed": {1: "int", "1": "str"},
        "tuple": (1, (2.5, "x"), [3, (4,)]),
        "empty": {"d": {}, "l": [], "t": ()},
        "none": None,
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300, 0.1],
        "bools": [True, False],
        "big": 2**70,
        "text": "héllo \"quoted\" \n",
        "looks_like_tag": {"__tensor__": "t0"},
        "bf16": torch.randn(4, 4).to(torch.bfloat16),
        "fp16": torch.randn(3).half(),
        "int64": torch.tensor([1, -2, 2**40]),
        "bool_t": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5),
        "empty_t": torch.zeros(0, 4),
        "view": t[:, 1],  # a non-contiguous view: saved as a copy
        "base": t,
        "same": [t, t],  # one object twice: stored once
    }
    save_state(tmp_path / "c", state)
    back = load_state(tmp_path / "c")

    assert back["ints"] == {0: "a", 1: {2: [3, 4]}, -5: None}
    assert list(back["ints"]) == [0, 1, -5] and all(type(k) is int for k in back["ints"])
    assert back["mixed"] == {1: "int", "1": "str"}
    assert back["tuple"] == (1, (2.5, "x"), [3, (4,)])
    assert type(back["tuple"]) is tuple and type(back["tuple"][1]) is tuple and type(back["tuple"][2]) is list
    assert type(back["tuple"][2][1]) is tuple
    assert back["empty"] == {"d": {}, "l": [], "t": ()} and type(back["empty"]["t"]) is tuple
    assert back["none"] is None
    f = back["floats"]
    assert math.isnan(f[0]) and f[1] == math.inf and f[2] == -math.inf
    assert f[3] == 0.0 and math.copysign(1, f[3]) == -1 and f[4] == 1e-300 and f[5] == 0.1
    assert all(type(x) is float for x in f)
    assert back["bools"] == [True, False] and all(type(x) is bool for x in back["bools"])
    assert back["big"] == 2**70
    assert back["text"] == state["text"]
    assert back["looks_like_tag"] == {"__tensor__": "t0"}
    for k in ("bf16", "fp16", "int64", "bool_t", "scalar", "empty_t", "base"):
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
    assert back["bf16"].dtype == torch.bfloat16
    assert back["scalar"].shape == ()
    assert torch.equal(back["view"], torch.tensor([1.0, 4.0]))
    assert back["same"][0] is back["same"][1] and torch.equal(back["same"][0], t)
    # state.json is strict JSON (NaN written as a tag) with the format tag
    body = json.loads((tmp_path / "c" / "state.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert body["format"] == "thinkfast-state/1"


def test_shared_storage_tensors_saved(tmp_path):
    base = torch.arange(10.0)
    state = {"a": base, "b": base.view(2, 5), "c": base[2:5], "d": base.detach()}
    save_state(tmp_path / "c", state)
    back = load_state(tmp_path / "c")
    for k in state:
        assert torch.equal(back[k], state[k]), k
    back["a"][0] = 100.0  # the copies are independent tensors
    assert back["b"][0, 0] == 0.0


def test_load_accepts_torch_device(tmp_path):
    save_state(tmp_path / "c", {"w": torch.ones(2)})
    assert load_state(tmp_path / "c", device=torch.device("cpu"))["w"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_tensors_round_trip(tmp_path):
    w = torch.randn(3, 3, device="cuda")
    save_state(tmp_path / "c", {"w": w, "rng": torch.cuda.get_rng_state()})
    back = load_state(tmp_path / "c", device="cuda")
    assert back["w"].is_cuda and torch.equal(back["w"], w)
    cpu = load_state(tmp_path / "c")
    assert cpu["w"].device.type == "cpu" and torch.equal(cpu["w"], w.cpu())


def test_unsupported_values_are_type_errors(tmp_path):
    with pytest.raises(TypeError, match=r"state\['x'\]\[0\] is a builtins.set"):
        save_state(tmp_path / "c", {"x": [{1, 2}]})
    with pytest.raises(TypeError, match=r"state\['x'\] has a key 1.5"):
        save_state(tmp_path / "c", {"x": {1.5: 0}})
    with pytest.raises(TypeError, match=r"state must be a dict"):
        save_state(tmp_path / "c", [1])
    assert not (tmp_path / "c").exists()


def test_failed_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    save_state(tmp_path / "c", {"step": 1, "w": torch.ones(3)})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state(tmp_path / "c", {"step": 2, "w": torch.zeros(3)})
    back = load_state(tmp_path / "c")
    assert back["step"] == 1 and torch.equal(back["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["c"]  # the temp folder is gone


class _Planted:
    """Unpickling this creates a marker file: a stand-in for code a planted checkpoint would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("name", ["state.pt", "model.pth", "x.pkl", "pytorch_model.bin", "s.pickle", "S.PT"])
def test_pickle_checkpoint_refused_without_unpickling(tmp_path, monkeypatch, name):
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    with open(folder / name, "wb") as f:
        pickle.dump({"model": _Planted(str(marker))}, f)
    # the planted payload is real: unpickling it would create the marker
    with open(folder / name, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    def no_torch_load(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    monkeypatch.setattr(pickle, "load", no_torch_load)
    monkeypatch.setattr(pickle, "loads", no_torch_load)
    assert has_state(folder)
    for target in (folder, folder / name):
        with pytest.raises(CheckpointError) as e:
            load_state(target)
        assert str(e.value) == (
            f"{folder / name} is a pickle checkpoint (from an older thinkfast or someone else); thinkfast does "
            f"not load pickles, which can run code. Rerun the stage with --force to start it over.")
        assert isinstance(e.value, ConfigError)
    assert not marker.exists()


def test_module_never_calls_torch_load():
    src = Path(ckpt.__file__).read_text()
    assert "torch.load" not in src.replace('"torch.load"', "").replace("``torch.load``", "")
    assert "import pickle" not in src


def test_missing_checkpoint(tmp_path):
    assert not has_state(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"nope/state\.json: missing"):
        load_state(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert not has_state(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"empty/state\.json: missing"):
        load_state(tmp_path / "empty")


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "c"
    save_state(folder, {"w": torch.arange(1000.0), "b": torch.ones(2), "step": 4})
    return folder


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '{"format": "other/9", "state": {}}',
                                  '{"state": {}}', '{"format": "thinkfast-state/1"}', "\xff\xfe"])
def test_damaged_state_json(saved, text):
    (saved / "state.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError) as e:
        load_state(saved)
    assert str(e.value).startswith(f"{saved / 'state.json'}: ")


def test_state_json_names_missing_tensor(saved):
    body = json.loads((saved / "state.json").read_text())
    body["state"]["extra"] = {"__tensor__": "t99"}
    (saved / "state.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError) as e:
        load_state(saved)
    msg = str(e.value)
    assert msg.startswith(f"{saved / 'tensors.safetensors'}: has no tensor 't99'") and "state['extra']" in msg


@pytest.mark.parametrize("bad", [{"__float__": "big"}, {"__dict__": [[1]]}, {"__tuple__": 3}, {"__tensor__": 0}])
def test_bad_tags_in_state_json(saved, bad):
    body = json.loads((saved / "state.json").read_text())
    body["state"]["x"] = bad
    (saved / "state.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"state\.json: damaged at state\['x'\]"):
        load_state(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "header"])
def test_damaged_tensors_file(saved, damage):
    f = saved / "tensors.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(b"\x00" * 7)
    elif damage == "header":
        f.write_bytes(data[:8] + b"{nope" + data[13:])
    else:
        f.unlink()
    with pytest.raises(CheckpointError) as e:
        load_state(saved)
    assert str(e.value).startswith(f"{f}: ")
