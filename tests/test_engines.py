"""The target-engine rules (thinkfast.modeling.engine_rules): each refusal names the block and why."""

import pytest

from thinkfast.modeling.engine_rules import EngineError, check_engine, problems
from thinkfast.modeling import DeciLMConfig, attention_block, block_config, ffn_block

H = 256


def config(blocks, tied=False):
    return DeciLMConfig(vocab_size=64, hidden_size=H, num_hidden_layers=len(blocks), num_attention_heads=4,
                        block_configs=blocks, tie_word_embeddings=tied)


SERVABLE = [block_config(attention_block(1), ffn_block(512, H)),
            block_config(attention_block(no_op=True), ffn_block(None, H, no_op=True))]
MIXED_KV = SERVABLE + [block_config(attention_block(2), ffn_block(256, H))]
ODD = [block_config(attention_block(linear=True), ffn_block(344, H)),
       block_config(attention_block(2), ffn_block(None, H, linear=True))]


def test_every_engine_loads_a_plain_child():
    for engine in ("vllm", "sglang", "trtllm", "hf"):
        assert problems(config(SERVABLE), engine) == []


def test_vllm_refuses_linear_blocks_and_odd_widths_naming_each_block():
    found = problems(config(ODD), "vllm")
    assert found == ["block 0: linear attention (vllm has none; it would build GQA and fail)",
                     "block 0: FFN width 344 is not a multiple of 256 (vllm reads widths only through ffn_mult, "
                     "which rounds to 256)",
                     "block 1: linear FFN (vllm has none)"]
    with pytest.raises(EngineError, match=r"the child cannot be served by vllm: block 0: linear attention.*block 1"):
        check_engine(config(ODD), "vllm", "the child")
    assert problems(config(ODD), "hf") == []


def test_sglang_needs_one_kv_head_count_and_trtllm_untied_embeddings():
    assert problems(config(MIXED_KV), "vllm") == []
    assert problems(config(MIXED_KV), "sglang") == [
        "KV heads differ between layers ([2, 4]); sglang needs one count for every GQA layer"]
    assert problems(config(ODD), "trtllm") == [
        "block 0: FFN width 344 is not a multiple of 256 (trtllm reads widths only through ffn_mult, which "
        "rounds to 256)"]
    assert "tied embeddings" in problems(config(SERVABLE, tied=True), "trtllm")[0]
    with pytest.raises(ValueError, match="engine='tgi'"):
        problems(config(SERVABLE), "tgi")


def test_a_tied_child_is_untied_for_trtllm(tmp_path):
    import torch
    from safetensors.torch import load_file

    from thinkfast.modeling.engine_rules import untie_for
    from thinkfast.modeling import DeciLMForCausalLM

    torch.manual_seed(0)
    model = DeciLMForCausalLM(config(SERVABLE, tied=True)).eval()
    x = torch.randint(0, 64, (1, 5))
    before = model(x).logits
    assert not untie_for(model, "vllm") and untie_for(model, "trtllm")
    assert problems(model.config, "trtllm") == []
    assert problems(config(SERVABLE, tied=True), "trtllm", untied_on_export=True) == []
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    torch.testing.assert_close(DeciLMForCausalLM.from_pretrained(tmp_path)(x).logits, before, rtol=0, atol=0)


def test_an_ffn_before_the_first_attention_is_refused_for_vllm_and_sglang():
    # real vLLM 0.32 fails to load [no-op attention + FFN, GQA + FFN] ("too many values to unpack") and
    # loads [no-op attention + no-op FFN, GQA + FFN]
    bad = [block_config(attention_block(no_op=True), ffn_block(512, H)), block_config(attention_block(2), ffn_block(512, H))]
    fine = [block_config(attention_block(no_op=True), ffn_block(None, H, no_op=True))] + bad[1:] + bad[:1]
    for engine in ("vllm", "sglang"):
        assert problems(config(bad), engine)[0].startswith("block 0: an FFN with no attention before it")
        assert problems(config(fine), engine) == []
    assert problems(config(bad), "trtllm") == [] and problems(config(bad), "hf") == []
