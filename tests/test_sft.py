"""Toggle SFT: data schemas and their errors, the assistant-only mask, packing that changes no logits, the stage."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from thinkfast.modeling.convert import convert_llama_model
from thinkfast.data import DataError
from thinkfast.nano.tokenizer import build_tokenizer
from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.stages import sft as sft_stage
from thinkfast.toggle import EOT, SYSTEM_OFF, SYSTEM_ON
from thinkfast.data import document_ids
from thinkfast.train.sft import (Example, block_causal_mask, mix_modes, nano_examples, pack, packed_batch,
                                 read_examples, row_to_example, sft_loss, sft_model_loss,
                                 tokenize_example)

ON = "<think>\n2 plus 2 is 4.\n</think>\n\n4"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_nemotron_schema_rows():
    ex = row_to_example({"input": [{"role": "user", "content": "What is 2+2?"}], "output": ON, "reasoning": "on",
                         "system_prompt": SYSTEM_ON, "category": "math", "license": "cc-by-4.0"})
    assert ex.thinking is True
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant"]
    assert ex.messages[0]["content"] == SYSTEM_ON and ex.messages[-1]["content"] == ON
    # the mode from reasoning alone, or from the system prompt alone; a plain system prompt gets the toggle line
    assert row_to_example({"input": "q", "output": "4", "reasoning": "off"}).messages[0]["content"] == SYSTEM_OFF
    assert row_to_example({"input": "q", "output": ON, "system_prompt": SYSTEM_ON}).thinking is True
    ex = row_to_example({"input": "q", "output": "4", "reasoning": "off", "system_prompt": "Be brief."})
    assert ex.messages[0]["content"] == SYSTEM_OFF + "\n\nBe brief."
    assert row_to_example({"input": "q", "output": "4"}).thinking is None


def test_chat_schema_rows():
    ex = row_to_example({"messages": [{"role": "system", "content": SYSTEM_OFF}, {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "4"}]})
    assert ex.thinking is False
    assert row_to_example({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": ON}]}).thinking is None


@pytest.mark.parametrize("row, message", [
    ({"input": "q", "output": "4", "reasoning": "on"}, "no single well-formed think block"),
    ({"input": "q", "output": ON, "reasoning": "off"}, "reasoning is off but the response has think tags"),
    ({"input": "q", "output": "<think>a", "reasoning": "on"}, "unclosed"),
    ({"input": "q", "output": "4", "reasoning": "maybe"}, "reasoning must be 'on' or 'off'"),
    ({"input": "q", "output": "4", "reasoning": "on", "system_prompt": SYSTEM_OFF}, "system_prompt says"),
    ({"input": "q", "output": 4}, "output must be a string"),
    ({"input": [{"role": "user"}], "output": "4"}, "string 'role' and 'content'"),
    ({"input": [{"role": "assistant", "content": "x"}], "output": "4"}, "must end with a user message"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system message may only come first"),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "unknown role"),
    ({"prompt": "q", "completion": "a"}, "needs 'messages', or 'input' and 'output'"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_rows_say_what_is_wrong(row, message):
    with pytest.raises(ValueError, match=message):
        row_to_example(row)


def test_bad_lines_name_file_and_line_or_are_skipped_and_counted(tmp_path):
    good = json.dumps({"input": "q", "output": "4", "reasoning": "off"})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([good, "", '{"input": "q", "output": "4", "reasoning": "on"}', "not json", good]) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl line 3: reasoning is on.*skip_bad_rows"):
        read_examples([str(path)])
    examples, skipped = read_examples([str(path)], skip_bad=True)
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["1", "5"]
    assert len(skipped) == 2 and "line 3" in skipped[0] and "line 4: not JSON" in skipped[1]
    gz = tmp_path / "more.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(good + "\n")
    assert len(read_examples([str(gz)])[0]) == 1
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="must be JSON lines"):
        read_examples([str(tmp_path / "x.txt")])


def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    for ex in nano_examples(3, 0, ["add", "word"], [2], [2]):
        ids, mask = tokenize_example(tok, ex)
        learned = [i for i, m in zip(ids, mask) if m]
        assert tok.decode(learned) == ex.messages[-1]["content"] + EOT
        assert mask == sorted(mask)  # one contiguous span at the end
    # earlier assistant turns are context, not targets
    ex = Example(({"role": "system", "content": SYSTEM_ON}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "first"}, {"role": "user", "content": "b"},
                  {"role": "assistant", "content": ON}), True, "t")
    ids, mask = tokenize_example(tok, ex)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == ON + EOT


def test_pack_places_every_item_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    rows = pack(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 128 + 1  # best fit wastes little
    with pytest.raises(ValueError, match="does not fit"):
        pack([5, 200], 128)


def test_packed_logits_equal_unpacked(tok):
    samples = [tokenize_example(tok, e) for e in nano_examples(5, 1, ["add", "mul", "word"], [1, 2], [2])]
    rows = pack([len(s[0]) for s in samples], 512)
    assert any(len(r) > 1 for r in rows)
    batch = packed_batch(samples, rows, 512)
    torch.manual_seed(0)
    model = convert_llama_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], attention_mask=block_causal_mask(batch["seq_ids"]),
                       position_ids=batch["position_ids"]).logits
        for r, members in enumerate(rows):
            at = 0
            for k in members:
                n = len(samples[k][0])
                alone = model(torch.tensor([samples[k][0]])).logits[0]
                assert (alone - packed[r, at:at + n]).abs().max() <= 1e-5
                at += n
    # the loss counts the assistant tokens only, each sample's first token never
    loss, n = sft_loss(packed, batch["labels"])
    assert n == sum(sum(m) for _, m in samples)


@pytest.mark.parametrize("kind", ["nemotron-nas", "llama", "no split head"])
def test_head_on_labelled_positions_only_equals_the_full_logits_loss(tok, kind):
    """sft_model_loss applies the LM head where a label is: its loss and gradients equal those of the full logits'."""
    from thinkfast.data import packed_attention
    from thinkfast.modeling.head import has_split_head

    samples = [tokenize_example(tok, e) for e in nano_examples(6, 2, ["add", "word"], [1, 2], [2])]
    rows = pack([len(s[0]) for s in samples], 512)
    batch = packed_batch(samples, rows, 512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    if kind == "nemotron-nas":
        model = convert_llama_model(model)
    if kind == "no split head":
        model.config.logit_scale = 2.0  # taken as a scaled head: the full logits path (the loss is the same)
    assert has_split_head(model) == (kind != "no split head")
    attention = packed_attention(batch["seq_ids"]) if kind == "nemotron-nas" else {
        "attention_mask": block_causal_mask(batch["seq_ids"])}
    full_loss, full_n = sft_loss(model(batch["input_ids"], position_ids=batch["position_ids"], **attention).logits,
                                 batch["labels"])
    full_grads = torch.autograd.grad(full_loss, list(model.parameters()))
    loss, n = sft_model_loss(model, batch, **attention)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert n == full_n == sum(sum(m) for _, m in samples) and n < (batch["seq_ids"] >= 0).sum()
    assert abs(loss.item() - full_loss.item()) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads, full_grads)) <= 1e-5


def test_block_causal_mask():
    seq = torch.tensor([[0, 0, 1, 1, 1, -1]])
    m = block_causal_mask(seq)[0, 0]
    assert m[1, 0] and not m[0, 1]  # causal within a sample
    assert not m[2, 1] and m[4, 2]  # never across samples
    assert m[5].tolist() == [False] * 5 + [True]  # padding sees itself only


def test_pretraining_rows_split_at_end_of_text_and_each_document_gets_its_own_logits(tok):
    import random

    from thinkfast.nano.corpus import packed_rows

    eos = tok.eos_token_id
    seq, pos = document_ids(torch.tensor([[5, 6, eos, 7, 8, eos, eos, 9]]), eos)
    assert seq.tolist() == [[0, 0, 0, 1, 1, 1, 2, 3]] and pos.tolist() == [[0, 1, 2, 0, 1, 2, 0, 0]]
    rows = packed_rows(tok, random.Random(0), 2, 400)
    seq, pos = document_ids(rows, eos)
    assert int(seq.max()) >= 1
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        packed = model(rows, attention_mask=block_causal_mask(seq), position_ids=pos).logits
        for r in range(rows.shape[0]):
            for d in range(int(seq[r].max()) + 1):
                at = (seq[r] == d).nonzero().flatten()
                alone = model(rows[r:r + 1, at]).logits[0]
                assert (alone - packed[r, at]).abs().max() <= 1e-5


def test_mix_modes():
    ex = nano_examples(10, 0, ["add"], [1], [2])
    assert len(mix_modes(ex, 0.5, 0)) == 20
    quarter = mix_modes(ex, 0.25, 0)
    on = sum(e.thinking for e in quarter)
    assert on / len(quarter) == pytest.approx(0.25, abs=0.05) and len(quarter) >= 12
    assert all(not e.thinking for e in mix_modes(ex, 0.0, 0))
    assert mix_modes(ex, None, 0) == ex


def test_schedule_orders_reasoning_first_and_takes_fractional_epochs(tok):
    samples = [([1] * n, [1] * n) for n in (100, 200, 50, 300, 120, 80)]
    modes = [True, False, True, False, True, False]
    cfg = sft_stage.SFTConfig(order="reasoning_first", seq_len=300, epochs=2)
    rows = sft_stage.schedule(samples, modes, cfg)
    per_epoch = len(rows) // 2
    for epoch in (rows[:per_epoch], rows[per_epoch:]):
        kinds = [modes[r[0]] for r in epoch]
        assert kinds == sorted(kinds, reverse=True)  # on rows first
    half = sft_stage.schedule(samples, modes, sft_stage.SFTConfig(seq_len=300, epochs=1.5))
    one = sft_stage.schedule(samples, modes, sft_stage.SFTConfig(seq_len=300))
    assert half[:len(one)] == one and len(half) == len(one) + round(0.5 * len(one))


def _pipe(tmp_path, run, *extra):
    return load_pipeline(default_config_path("smoke"), [
        f"run_dir={run}", "stages=[pretrain,sft]", "pretrain.train_steps=2", "sft.nano_prompts=24",
        "sft.batch_size=2", "sft.seq_len=256", "sft.lr=0.01", "sft.warmup_steps=1", "sft.eval_every=4",
        "sft.eval_problems=2", "sft.eval_max_new_tokens=8", "sft.checkpoint_every=3", "sft.digits=[1]",
        "sft.steps=[1]", "sft.epochs=1", *extra])


def test_sft_stage_trains_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    pipe = _pipe(tmp_path, ref)
    run_stage(pipe, "pretrain")
    m, _ = run_stage(pipe, "sft")
    assert m["loss_after"] < m["loss_before"] and m["examples"] == 48 and m["on_examples"] == 24
    assert {"accuracy_on", "format_ok_off", "mean_tokens_on", "collapsed"} <= set(m)
    meta = json.loads((ref / "sft" / "model" / "thinkfast.json").read_text())
    assert meta["prompting"] == "chat" and meta["made_by"] == "sft"
    assert (ref / "sft" / "curve.png").stat().st_size > 1000
    want = load_file(ref / "sft" / "model" / "model.safetensors")

    run = tmp_path / "run"
    pipe = _pipe(tmp_path, run)
    run_stage(pipe, "pretrain")
    real, calls = sft_stage.optimizer_step, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # after the checkpoint at step 3 and the eval at 4
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sft_stage, "optimizer_step", failing)
    with pytest.raises(KeyboardInterrupt):
        run_stage(pipe, "sft")
    monkeypatch.setattr(sft_stage, "optimizer_step", real)
    run_stage(pipe, "sft")
    got = load_file(run / "sft" / "model" / "model.safetensors")
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k


def test_sft_reads_files_and_a_changed_file_makes_it_stale(tmp_path):
    from thinkfast.pipeline import status
    from thinkfast.rundir import RunDir

    data = tmp_path / "sft.jsonl"
    rows = [{"input": f"What is {i}+1?", "output": str(i + 1), "reasoning": "off"} for i in range(6)]
    rows += [{"input": f"What is {i}+2?", "output": f"<think>\n{i} and 2\n</think>\n\n{i + 2}", "reasoning": "on"}
             for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    pipe = _pipe(tmp_path, run, f"sft.files=[{data}]", "sft.eval_problems=0")
    run_stage(pipe, "pretrain")
    m, _ = run_stage(pipe, "sft")
    # one prompt (a tenth, at least one) held out; on_share 0.5 then keeps 5 of each mode
    assert m["examples"] == 10 and m["on_examples"] == 5
    with RunDir(run) as rd:
        assert status(pipe, rd, "sft")[0] == "complete"
    data.write_text("\n".join(json.dumps(r) for r in rows[:-1]) + "\n")
    with RunDir(run) as rd:
        assert status(pipe, rd, "sft")[0] == "stale"


def test_a_model_that_collapses_to_one_mode_is_flagged(tok):
    from thinkfast.evaluation import harness as evaluation
    from thinkfast.generation import Completion
    from thinkfast.nano import tasks

    always_thinks = tok("<think>\n2+2\n</think>\n\nAnswer: 4<|eot_id|>", add_special_tokens=False)["input_ids"]
    class AlwaysThinks:  # a generation backend whose every answer thinks
        def generate(self, prompts, params, *, hook=None, progress=False):
            return [Completion(always_thinks, "stop")] * len(prompts)

        def sync(self, model):
            raise AssertionError("evaluation never syncs")

    problems = tasks.make_problems(4, seed=0, kinds=("add",), digits=(1,))
    out = evaluation.toggle_check(AlwaysThinks(), tok, problems, group=lambda p: "even" if p.answer % 2 == 0 else "odd")
    assert out["on"]["format_ok"] == 1.0 and out["off"]["format_ok"] == 0.0
    assert out["collapsed"] == ["off"]
    groups = out["on"]["groups"]  # per group: accuracy (only 4 is right), format, count
    assert sum(g["n"] for g in groups.values()) == 4 and all(g["format_ok"] == 1.0 for g in groups.values())
    assert groups["even"]["accuracy"] == sum(p.answer == 4 for p in problems) / groups["even"]["n"]


def test_varied_phrasings_and_off_examples_beyond_the_traces():
    """phrasing=varied words each example with a training template (never a held-out one); off_prompts adds "off"
    examples of harder problems (3 digits, 3 steps) whose response is the answer alone, never a think block."""
    from thinkfast.nano import tasks
    from thinkfast.toggle import parse_response

    canonical = nano_examples(40, 0, ["add", "sub", "mul", "word"], [1, 2], [1, 2])
    varied = nano_examples(40, 0, ["add", "sub", "mul", "word"], [1, 2], [1, 2], phrasing="varied", off_prompts=60)
    user = [next(m["content"] for m in e.messages if m["role"] == "user") for e in varied]
    assert [e.messages[-1] for e in varied[:80]] == [e.messages[-1] for e in canonical]  # same problems and answers
    held = {t.split("{q}")[0] for k in ("arith", "word") for t in tasks.PHRASINGS["held_out"][k] if t.split("{q}")[0]}
    assert not any(u.startswith(tuple(held)) for u in user)
    assert len({u.split(" ")[0] for u in user[:80]}) >= 8  # many wordings, not one
    assert sum(u.startswith("What is ") for u in user[:80]) < 40
    extra = varied[80:]
    assert len(extra) == 60 and all(e.thinking is False for e in extra)
    for e in extra:
        r = parse_response(e.messages[-1]["content"])
        assert r.form == "plain" and r.reasoning is None and r.answer.startswith("Answer: ")
    problems = tasks.make_problems(60, seed=7919, digits=(1, 2, 3), steps=(1, 2, 3))
    assert any(p.digits == 3 for p in problems) and any(p.kind == "word" and p.steps == 3 for p in problems)
    with pytest.raises(ValueError, match="phrasing"):
        nano_examples(2, 0, ["add"], [1], [1], phrasing="random")
