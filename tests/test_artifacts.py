"""thinkfast.artifacts: the stage files' readers accept valid files and reject each schema error with a
message naming the file and the field; model folders and weights fail with the file named."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast import artifacts as A
from thinkfast.artifacts import ArtifactError, MissingArtifact
from thinkfast.config import ConfigError
from thinkfast.puzzle import parent

GQA = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 2}
NO_ATT = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
FFN = {"no_op": False, "replace_with_linear": False, "ffn_mult": 1.5}
NO_FFN = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}


def _library(mode="decoupled") -> dict:
    variants = []
    for i in (0, 1):
        if mode == "decoupled":
            for part, name, spec in (("attention", "gqa_kv2", GQA), ("attention", "no_op", NO_ATT),
                                     ("ffn", "ffn_48", FFN), ("ffn", "no_op", NO_FFN)):
                variants.append({"layer": i, "part": part, "name": name, "spec": spec, "weights": f"{part}.{name}"})
        else:
            for (a, sa), (f, sf) in ((("gqa_kv2", GQA), ("ffn_48", FFN)), (("no_op", NO_ATT), ("ffn_48", FFN))):
                variants.append({"layer": i, "part": "block", "name": f"{a}+{f}", "attention": a, "ffn": f,
                                 "attention_spec": sa, "ffn_spec": sf, "weights": f"block.{a}+{f}"})
    return {"format": A.LIBRARY_FORMAT, "mode": mode, "layers": [0, 1], "parent_config": {"num_hidden_layers": 2},
            "variants": variants}


def _scores(lib: dict) -> dict:
    blocks = [{"layer": i, "attention": a, "ffn": f, "kl": 0.1 * k, "lm_loss": 1.0 + k}
              for i, pairs in A.library_pairs(lib).items() for k, (a, f) in enumerate(pairs)]
    return {"format": A.SCORES_FORMAT, "metric_names": ["kl", "lm_loss"], "parent_lm_loss": 1.0, "blocks": blocks}


def _times(t: float) -> dict:
    return {"prefill_s": {"1": 10 * t, "16": 40 * t}, "decode_s": {"1": t, "16": 2 * t}}


def _costs() -> dict:
    att = {"gqa_kv2": {"params": 100, "param_bytes": 400, "kv_bytes_per_token": 64, **_times(1e-4)},
           "no_op": {"params": 0, "param_bytes": 0, "kv_bytes_per_token": 0, **_times(0.0)}}
    ffn = {"ffn_48": {"params": 300, "param_bytes": 1200, "kv_bytes_per_token": 0, **_times(2e-4)},
           "no_op": {"params": 0, "param_bytes": 0, "kv_bytes_per_token": 0, **_times(1e-6)}}
    return {"format": A.COSTS_FORMAT, "device": "cpu: test", "dtype": "float32", "batch_sizes": [1, 16],
            "prefill_len": 16, "decode_context": 16, "attention": att, "ffn": ffn,
            "fixed": {"params": 50, "param_bytes": 200, **_times(5e-5)}, "parent_model": _times(1e-3)}


def _write_library(folder, lib: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "library.json").write_text(json.dumps(lib))
    save_file({"layers.0.attention.gqa_kv2.self_attn.k_proj.weight": torch.zeros(4, 8)},
              str(folder / "weights.safetensors"))
    return folder


def _raises(fn, *fragments):
    """Call ``fn``; it must raise an ArtifactError whose message holds every fragment."""
    with pytest.raises(ArtifactError) as info:
        fn()
    for frag in fragments:
        assert str(frag) in str(info.value), (frag, str(info.value))
    return str(info.value)


@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
def test_valid_library_scores_costs_round_trip(tmp_path, mode):
    lib = _library(mode)
    folder = _write_library(tmp_path / "library", lib)
    assert A.read_library(folder) == lib
    assert parent.read_library is A.read_library and parent.LIBRARY_FORMAT == A.LIBRARY_FORMAT
    pairs = A.library_pairs(lib)
    assert pairs[0][0] == ("gqa_kv2", "ffn_48") and len(pairs[1]) == (4 if mode == "decoupled" else 2)
    (tmp_path / "scores.json").write_text(json.dumps(_scores(lib)))
    assert A.read_scores(tmp_path / "scores.json", lib) == _scores(lib)
    (tmp_path / "costs.json").write_text(json.dumps(_costs()))
    assert A.read_costs(tmp_path / "costs.json", lib) == _costs()
    assert A.check_costs(_costs(), "memory") == _costs()


def test_error_is_a_config_error_and_missing_files_are_file_not_found(tmp_path):
    assert issubclass(ArtifactError, ConfigError) and issubclass(ArtifactError, ValueError)
    for read in (lambda: A.read_library(tmp_path), lambda: A.read_scores(tmp_path / "scores.json"),
                 lambda: A.read_costs(tmp_path / "costs.json")):
        with pytest.raises(FileNotFoundError, match="no such file"):
            read()
    folder = tmp_path / "lib"
    _write_library(folder, _library()).joinpath("weights.safetensors").unlink()
    with pytest.raises(MissingArtifact, match="weights.safetensors"):
        A.read_library(folder)


def _set(path: list, value):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        if value is KeyError:
            del d[path[-1]]
        else:
            d[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, fragments", [
    (_set(["attention", "gqa_kv2", "decode_s", "16"], -0.0008),
     ['attention.gqa_kv2.decode_s["16"] = -0.0008', "a time must be a finite number >= 0", "re-run the costs stage"]),
    (_set(["fixed", "prefill_s", "1"], 0.0), ['fixed.prefill_s["1"] = 0.0', "> 0"]),
    (_set(["ffn", "no_op", "params"], KeyError), ["ffn.no_op.params: missing"]),
    (_set(["attention", "no_op", "kv_bytes_per_token"], "0"), ['attention.no_op.kv_bytes_per_token = "0"']),
    (_set(["prefill_len"], "16"), ['prefill_len = "16": expected an int']),
    (_set(["ffn", "ffn_48", "decode_s", "16"], KeyError), ["ffn.ffn_48.decode_s", "no time for batch size 16"]),
    (_set(["batch_sizes"], []), ["batch_sizes = []"]),
    (_set(["batch_sizes", 1], True), ["batch_sizes[1] = true"]),
    (_set(["parent_model", "decode_s", "1"], float("inf")), ['parent_model.decode_s["1"] = Infinity']),
    (_set(["format"], "thinkfast-puzzle-costs/0"), ["format", "thinkfast-puzzle-costs/1"]),
])
def test_costs_schema_errors_name_file_and_field(tmp_path, edit, fragments):
    data = _costs()
    edit(data)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    _raises(lambda: A.read_costs(path), path, *fragments)
    _raises(lambda: A.check_costs(copy.deepcopy(data), "somewhere"), "somewhere: ", *fragments)


def test_costs_lack_a_variant_of_the_library(tmp_path):
    data = _costs()
    del data["attention"]["no_op"]
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    A.read_costs(path)  # fine without a library
    _raises(lambda: A.read_costs(path, _library()), path, "attention", "['no_op']", "re-run the costs stage")
    _raises(lambda: A.check_costs(data, "measured", _library()), "measured: attention", "['no_op']")


def test_scores_nan_kl_is_an_error(tmp_path):
    lib = _library()
    text = json.dumps(_scores(lib)).replace('"kl": 0.1,', '"kl": NaN,', 1)
    assert "NaN" in text
    path = tmp_path / "scores.json"
    path.write_text(text)
    _raises(lambda: A.read_scores(path), path, "blocks[1].kl = NaN", "finite number >= 0")


@pytest.mark.parametrize("edit, fragments", [
    (_set(["blocks", 2, "kl"], -0.5), ["blocks[2].kl = -0.5"]),
    (_set(["blocks", 2, "lm_loss"], "1.0"), ['blocks[2].lm_loss = "1.0"']),
    (_set(["blocks", 2, "lm_loss"], KeyError), ["blocks[2].lm_loss: missing"]),
    (_set(["blocks", 0, "layer"], "0"), ['blocks[0].layer = "0": expected an int']),
    (_set(["metric_names"], []), ["metric_names = []"]),
    (_set(["blocks", 3, "ffn"], "ffn_48"), ["blocks[3]", "already scored in blocks[2]"]),  # duplicate
])
def test_scores_schema_errors_name_file_and_field(tmp_path, edit, fragments):
    data = _scores(_library())
    edit(data)
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(data))
    _raises(lambda: A.read_scores(path), path, *fragments, "re-run the scores stage")
    _raises(lambda: A.check_scores(data, "measured"), "measured: ", *fragments)


def test_scores_against_the_library(tmp_path):
    lib, path = _library(), tmp_path / "scores.json"
    data = _scores(lib)
    data["blocks"][5]["layer"] = 7
    path.write_text(json.dumps(data))
    _raises(lambda: A.read_scores(path, lib), path, "blocks[5].layer = 7", "no layer 7")
    data = _scores(lib)
    data["blocks"][5]["attention"] = "gqa_kv9"
    path.write_text(json.dumps(data))
    _raises(lambda: A.read_scores(path, lib), path, "blocks[5]", "no block gqa_kv9+no_op in layer 1")
    data = _scores(lib)
    del data["blocks"][6:]
    path.write_text(json.dumps(data))
    _raises(lambda: A.read_scores(path, lib), path, "blocks: no score for 2 block(s)", "layer 1 no_op+ffn_48")
    tiny = _scores(lib)
    tiny["blocks"][0]["kl"] = -1e-9  # float rounding of a zero KL
    path.write_text(json.dumps(tiny))
    assert A.read_scores(path, lib)["blocks"][0]["kl"] == 0.0


@pytest.mark.parametrize("edit, fragments", [
    (_set(["variants", 3, "layer"], 5), ["variants[3].layer = 5", "not one of the library's layers"]),
    (_set(["variants", 3, "part"], "block"), ["variants[3].part = \"block\""]),
    (_set(["variants", 2, "spec"], KeyError), ["variants[2].spec: missing"]),
    (_set(["variants", 1, "name"], "gqa_kv2"), ["variants[1].name", "already has attention 'gqa_kv2'"]),
    (_set(["layers"], [0, 0]), ["layers[1] = 0", "distinct"]),
    (_set(["layers"], [0, 1, 2]), ["layers = [0, 1, 2]", "the parent (parent_config.num_hidden_layers) has 2"]),
    (lambda d: [d["variants"].remove(v) for v in list(d["variants"]) if v["layer"] == 1 and v["part"] == "ffn"],
     ["variants: layer 1 has no ffn variant"]),
    (_set(["mode"], "mixed"), ['mode = "mixed"']),
    (_set(["parent_config"], None), ["parent_config = null", "expected an object"]),
])
def test_library_schema_errors_name_file_and_field(tmp_path, edit, fragments):
    lib = _library()
    edit(lib)
    folder = _write_library(tmp_path / "lib", lib)
    _raises(lambda: A.read_library(folder), folder / "library.json", *fragments, "re-run the library stage")


def test_top_level_list_and_invalid_json(tmp_path):
    for name in ("library.json", "scores.json", "costs.json"):
        (tmp_path / name).write_text("[]")
    _write_library(tmp_path / "x", _library())
    (tmp_path / "x" / "library.json").write_text("[]")
    for read, path in ((A.read_library, tmp_path / "x"), (A.read_scores, tmp_path / "scores.json"),
                       (A.read_costs, tmp_path / "costs.json")):
        _raises(lambda: read(path), path, "(top level) = []: expected a JSON object")
    path = tmp_path / "costs.json"
    path.write_text('{\n  "format": "thinkfast-puzzle-costs/1",\n  "device": "cpu",,\n}\n')
    _raises(lambda: A.read_costs(path), path, "line 3", "invalid JSON")
    _raises(lambda: A.read_json(path), path, "line 3")


def test_model_sidecar_and_tokenizer_files(tmp_path):
    assert A.read_model_sidecar(tmp_path) == {}
    A.write_model_sidecar(tmp_path, "text", "pretrain", note=1)
    assert A.read_model_sidecar(tmp_path) == {"prompting": "text", "made_by": "pretrain", "note": 1}
    with pytest.raises(ValueError):
        A.write_model_sidecar(tmp_path, "shout", "x")
    (tmp_path / A.SIDECAR).write_text('{"prompting": "shout"}')
    _raises(lambda: A.read_model_sidecar(tmp_path), tmp_path / A.SIDECAR, 'prompting = "shout"')
    # fuse's layer map: spans of input layers; a map written before spans (one layer each) reads as spans
    A.write_model_sidecar(tmp_path, "text", "fuse", layer_map=[0, 3, 4])
    assert A.read_model_sidecar(tmp_path)["layer_map"] == [[0], [3], [4]]
    A.write_model_sidecar(tmp_path, "text", "fuse", layer_map=[[0], [1, 2, 3], [4]])
    assert A.read_model_sidecar(tmp_path)["layer_map"] == [[0], [1, 2, 3], [4]]
    for bad, said in ((3, "layer_map = 3: expected a list"), ([[0], []], "layer_map[1] = []: expected a non-empty"),
                      ([[0], ["1"]], "layer_map[1]"), ([0, -1], "layer_map[1] = -1")):
        A.write_model_sidecar(tmp_path, "text", "fuse", layer_map=bad)
        _raises(lambda: A.read_model_sidecar(tmp_path), tmp_path / A.SIDECAR, said, "re-run that stage with --force")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("x")
    dst = tmp_path / "dst"
    dst.mkdir()
    assert A.copy_tokenizer_files(tmp_path, dst) == ["tokenizer.json", "chat_template.jinja"]
    assert sorted(p.name for p in dst.iterdir()) == ["chat_template.jinja", "tokenizer.json"]


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    path = tmp_path / "model"
    model.save_pretrained(path)
    return path


def test_load_model_and_tensors(tiny_model):
    model = A.load_model(tiny_model)
    assert model.config.model_type == "llama"
    assert type(A.load_decilm(tiny_model)).__name__ == "DeciLMForCausalLM"
    tensors = A.load_tensors(tiny_model / "model.safetensors")
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight)


def test_truncated_weights_name_the_file_and_the_stage(tiny_model, tmp_path):
    weights = tiny_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _raises(lambda: A.load_model(tiny_model), weights, "interrupted", "re-run that stage with --force")
    _raises(lambda: A.load_tensors(weights), weights, "interrupted")
    A.write_model_sidecar(tiny_model, "text", "pretrain")
    _raises(lambda: A.load_model(tiny_model), weights, "re-run the pretrain stage with --force")
    folder = _write_library(tmp_path / "lib", _library())
    (folder / "weights.safetensors").write_bytes(b"\x05\x00")
    _raises(lambda: A.read_library(folder), folder / "weights.safetensors", "re-run the library stage")


def test_bad_model_folders(tiny_model, tmp_path):
    with pytest.raises(MissingArtifact, match="no such model folder"):
        A.load_model(tmp_path / "nowhere")
    config = tiny_model / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"model_type": "llama"', '"model_typo": "llama"'))
    _raises(lambda: A.load_model(tiny_model), config, "model_type: missing")
    config.write_text(text.replace('"model_type": "llama",', '"model_type": "llama"'))  # a missing comma
    _raises(lambda: A.load_model(tiny_model), config, "line", "invalid JSON")
    config.unlink()
    _raises(lambda: A.load_decilm(tiny_model), config, "no such file")
