"""FFN Fusion: the fused layer equals its members' parallel form, the dependency matrix's shape and
properties, the run-selection rules, and a fused checkpoint that reloads in both loading modes."""

import os
import subprocess
import sys

import pytest
import torch

from thinkfast.puzzle.fusion import dependency_matrix, find_groups, fusable, fuse, fused_layer_map, parallel_form
from thinkfast.modeling import DeciLMConfig, DeciLMForCausalLM
from thinkfast.modeling.configuration_decilm import attention_block, block_config, ffn_block

H, V = 32, 50


def _blocks():
    gqa, none = attention_block(2), attention_block(no_op=True)
    return [
        block_config(gqa, ffn_block(64, H)),            # 0
        block_config(none, ffn_block(48, H)),           # 1  run 1..4 (widths differ)
        block_config(none, ffn_block(64, H)),           # 2
        block_config(none, ffn_block(24, H)),           # 3
        block_config(none, ffn_block(40, H)),           # 4  (last of the run)
        block_config(gqa, ffn_block(None, H, no_op=True)),  # 5
        block_config(none, ffn_block(None, H, no_op=True)),  # 6  identity
        block_config(none, ffn_block(32, H)),           # 7  run 7..8
        block_config(none, ffn_block(32, H)),           # 8
        block_config(attention_block(1), ffn_block(64, H)),  # 9
    ]


def model(seed=0, tied=True):
    torch.manual_seed(seed)
    config = DeciLMConfig(vocab_size=V, hidden_size=H, num_hidden_layers=10, num_attention_heads=4,
                          block_configs=_blocks(), max_position_embeddings=128, tie_word_embeddings=tied,
                          eos_token_id=0, bos_token_id=1)
    m = DeciLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # norms away from one, so that folding them matters
                p.copy_(0.5 + torch.rand_like(p))
            elif "mlp" in name:  # FFN updates large enough that later members see earlier ones
                p.copy_(0.3 * torch.randn_like(p))
    return m


def _rope(m, x):
    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return m.model.rotary_emb(x, pos)


def _manual(m, ids, groups):
    """The unfused model run with each group computed in parallel form (what the fused model must equal)."""
    inner = m.model
    x = inner.embed_tokens(ids)
    cos, sin = _rope(m, x)
    starts = {g[0]: g for g in groups}
    skip = {j for g in groups for j in g[1:]}
    for i, layer in enumerate(inner.layers):
        if i in starts:
            x = parallel_form(m, starts[i], x)
        elif i not in skip:
            x = layer(x, cos, sin, None, None)
    return m.lm_head(inner.norm(x))


@torch.no_grad()
def test_layer_map_names_the_hidden_states_each_layer_reproduces():
    """A Puzzle child keeps its removed layers as identities; fusing drops them. Every input layer the map
    gives a fused layer must have the same output (hidden state) in the input as that layer in the result:
    what distillation's cosine loss compares."""
    gqa, none = attention_block(2), attention_block(no_op=True)
    ident = block_config(none, ffn_block(None, H, no_op=True))
    blocks = [ident, block_config(gqa, ffn_block(64, H)), ident, ident, block_config(none, ffn_block(48, H)),
              block_config(none, ffn_block(32, H)), ident, block_config(attention_block(1), ffn_block(40, H)), ident]
    torch.manual_seed(0)
    config = DeciLMConfig(vocab_size=V, hidden_size=H, num_hidden_layers=len(blocks), num_attention_heads=4,
                          block_configs=blocks, max_position_embeddings=64, eos_token_id=0, bos_token_id=1)
    m = DeciLMForCausalLM(config).eval()
    # a fused group reproduces its last member's output (approximately: the parallel form), then the identities
    assert fused_layer_map(m.config, [[4, 5]]) == [[1, 2, 3], [5, 6], [7, 8]]
    spans = fused_layer_map(m.config, [])
    assert spans == [[1, 2, 3], [4], [5, 6], [7, 8]]  # layer 0 reproduces the embeddings: not listed
    fused = fuse(m, [])
    assert fused.config.num_hidden_layers == 4
    ids = torch.randint(0, V, (2, 9))
    before = m(ids, output_hidden_states=True).hidden_states
    after = fused(ids, output_hidden_states=True).hidden_states
    for i, span in enumerate(spans):
        for t in span:
            assert (after[i + 1] - before[t + 1]).abs().max() <= 1e-5, (i, t)
    # not vacuous: a span one layer off (fused layer 1 to input layer 3) fails the same check
    assert (after[2] - before[4]).abs().max() > 1e-3


@torch.no_grad()
def test_fused_layer_equals_parallel_form():
    m = model()
    fused = fuse(m, [[1, 2, 3]])
    assert fused.config.num_hidden_layers == 10 - 2 - 1  # two members merged away, identity layer 6 dropped
    layer = fused.model.layers[1]
    assert layer.attention_spec.kind == "no_op" and layer.ffn_spec.intermediate_size == 48 + 64 + 24
    x = torch.randn(2, 7, H)
    cos, sin = _rope(m, x)
    diff = (layer(x, cos, sin, None, None) - parallel_form(m, [1, 2, 3], x)).abs().max().item()
    assert diff <= 1e-5, diff
    # and it is not the sequential form (the test would be vacuous otherwise)
    seq = x
    for j in (1, 2, 3):
        seq = m.model.layers[j](seq, cos, sin, None, None)
    assert (seq - parallel_form(m, [1, 2, 3], x)).abs().max() > 1e-3


@torch.no_grad()
def test_fused_model_equals_manual_parallel_run_and_keeps_the_rest():
    m = model(tied=False)
    ids = torch.randint(0, V, (2, 11))
    groups = [[1, 2, 3], [7, 8]]
    fused = fuse(m, groups)
    assert (fused(ids).logits - _manual(m, ids, groups)).abs().max() <= 1e-5
    # layers outside the groups are the same weights at their new index; identity layer 6 is gone
    assert [a.kind for a, _ in fused.config.block_specs()] == ["gqa", "no_op", "no_op", "gqa", "no_op", "gqa"]
    assert torch.equal(fused.model.layers[5].mlp.up_proj.weight, m.model.layers[9].mlp.up_proj.weight)
    assert torch.equal(fused.lm_head.weight, m.lm_head.weight)
    assert fused_layer_map(m.config, groups) == [[0], [3], [4], [5, 6], [8], [9]]
    # no groups, no identity dropping: the same model
    same = fuse(m, [], drop_identity=False)
    assert torch.equal(same(ids).logits, m(ids).logits)


@torch.no_grad()
def test_dependency_matrix_shape_and_properties():
    m = model()
    batches = [torch.randint(0, V, (2, 9)) for _ in range(2)]
    M = dependency_matrix(m, batches)
    assert M.shape == (10, 10) and M.dtype == torch.float64
    assert torch.all(torch.tril(M) == 0)
    assert torch.all(M >= 0) and torch.all(M <= 2)
    assert torch.all(M[6] <= 1e-12)  # removing the identity layer changes nothing downstream
    assert M[5, 9] > 0  # removing attention changes what follows
    sub = dependency_matrix(m, batches, layers=[1, 2])
    assert torch.allclose(sub[1:3], M[1:3]) and torch.all(sub[0] == 0) and torch.all(sub[3:] == 0)


def test_group_selection_rules():
    config = model().config
    assert fusable(config) == [False, True, True, True, True, False, False, True, True, False]
    plan = find_groups(config)
    assert plan.runs == [[1, 2, 3, 4], [7, 8]]
    assert plan.left_out == [4, 8] and plan.groups == [[1, 2, 3]]  # run 7..8 minus its last: one layer, unfused
    assert find_groups(config, leave_last=False).groups == [[1, 2, 3, 4], [7, 8]]
    assert find_groups(config, max_group=2, leave_last=False).groups == [[1, 2], [3, 4], [7, 8]]
    dep = torch.zeros(10, 10)
    dep[1, 3] = 0.5  # layer 3 depends on layer 1: a new group starts at 3
    assert find_groups(config, dep, threshold=0.2, leave_last=False).groups == [[1, 2], [3, 4], [7, 8]]
    assert find_groups(config, dep, threshold=0.6, leave_last=False).groups == [[1, 2, 3, 4], [7, 8]]
    assert find_groups(config, groups=[[2, 3]]).groups == [[2, 3]]
    for bad, match in (([[0, 1]], "keep attention"), ([[1, 3]], "consecutive"), ([[1]], "at least two"),
                       ([[1, 2], [2, 3]], "overlaps"), ([[5, 6]], "no SwiGLU")):
        with pytest.raises(ValueError, match=match):
            find_groups(config, groups=bad)
    with pytest.raises(ValueError, match="max_group"):
        find_groups(config, max_group=1)


def test_fused_checkpoint_reloads_in_both_loading_modes(tmp_path):
    from thinkfast.artifacts import load_model

    m = model()
    fused = fuse(m, [[1, 2, 3], [7, 8]])
    fused.save_pretrained(tmp_path / "m")
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        expected = fused(ids).logits
        assert torch.equal(load_model(tmp_path / "m")(ids).logits, expected)
    torch.save({"x": ids, "logits": expected}, tmp_path / "io.pt")
    script = f"""
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
io = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    assert torch.equal(m(io['x']).logits, io['logits'])
print(m.config.num_hidden_layers)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "6"


def test_fuse_stage_in_the_pipeline(tmp_path):
    """`parent` (a nemotron-nas folder with attention-free runs) -> `fuse`: fewer layers, the files the
    stage documents, KL to the unfused model, and the engine check before anything is written."""
    import json

    from thinkfast.config import ConfigError
    from thinkfast.nano.tokenizer import build_tokenizer
    from thinkfast.pipeline import default_config_path, load_pipeline, run_stage

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = DeciLMConfig(vocab_size=len(tok), hidden_size=H, num_hidden_layers=10, num_attention_heads=4,
                          block_configs=_blocks(), max_position_embeddings=512, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    DeciLMForCausalLM(config).save_pretrained(tmp_path / "nas")
    tok.save_pretrained(tmp_path / "nas")
    run = tmp_path / "run"

    def pipe(*extra):
        return load_pipeline(default_config_path("smoke"), [
            f"run_dir={run}", "stages=[parent,fuse]", f"parent.path={tmp_path / 'nas'}", "fuse.dependency_rows=2",
            "fuse.kl_rows=2", "fuse.seq_len=32", "fuse.batch_size=2", "fuse.timing_batches=[1]",
            "fuse.decode_context=8", *extra])

    run_stage(pipe(), "parent")
    with pytest.raises(ConfigError, match=r"fused model"):  # widths 48+64+24 are not vLLM's
        run_stage(pipe("fuse.engine=vllm"), "fuse")
    assert not (run / "fuse").exists()
    metrics, ran = run_stage(pipe("fuse.engine=hf"), "fuse")
    assert ran and metrics["layers_before"] == 10 and metrics["layers_after"] == 7
    assert metrics["groups"] == [[1, 2, 3]] and metrics["left_out"] == [4, 8]
    assert metrics["kl_to_unfused"] > 0 and set(metrics["decode_speedup"]) == {"1"}
    dep = json.loads((run / "fuse" / "dependency.json").read_text())
    assert len(dep["matrix"]) == 10 and dep["fusable"][1] and not dep["fusable"][0]
    assert (run / "fuse" / "dependency.png").stat().st_size > 1000
    sidecar = json.loads((run / "fuse" / "model" / "thinkfast.json").read_text())
    assert sidecar["made_by"] == "fuse" and sidecar["engine"] == "hf"
    # group 1..3 ends at 3; identity layer 6 dropped, so layer 5's output is the stream after 6 too
    assert sidecar["layer_map"] == [[0], [3], [4], [5, 6], [7], [8], [9]]
    assert (run / "fuse" / "model" / "tokenizer.json").is_file()

    # the main job's order: fuse -> distill (student: the fused model, teacher: the run's first model, hidden
    # states compared through the recorded layer map) -> eval (a row per model)
    extra = ["stages=[parent,fuse,distill,eval]", "fuse.engine=hf", "distill.train_steps=4", "distill.batch_size=2",
             "distill.seq_len=32", "distill.eval_every=2", "distill.eval_rows=2", "distill.eval_problems=1",
             "distill.eval_max_new_tokens=4", "eval.per_cell=1", "eval.max_new_tokens=4"]
    metrics, ran = run_stage(pipe(*extra), "distill")
    assert ran and metrics["layer_pairs"] == 7 and metrics["kl_before"] > 0
    assert json.loads((run / "distill" / "model" / "thinkfast.json").read_text())["layer_map"] == sidecar["layer_map"]
    metrics, _ = run_stage(pipe(*extra), "eval")
    assert set(metrics["models"]) == {"parent", "fuse", "distill"}, metrics["models"]
