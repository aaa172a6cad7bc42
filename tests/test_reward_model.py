"""The reward model (issue 25): Bradley-Terry loss against hand values, the score read at the last real token
whatever the padding (pad = eos, the trap), the saved folder loading as a sequence classifier with and without
thinkfast, pairs from files and from the nano ranking rule, ``reward_model:PATH`` as a reward, and the stage
(runs, resumes to the same weights)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from test_eval_endpoint import tiny_chat_model
from test_modeling import V, hetero_config
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from thinkfast.artifacts import load_sequence_classifier
from thinkfast.data import DataError
from thinkfast.modeling import DeciLMForSequenceClassification
from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.rl import reward_model as rm
from thinkfast.rl.rewards import RewardRunner, load_reward
from thinkfast.stages import reward_model as reward_model_stage
from thinkfast.train import loop as train_loop

EOS = 0  # hetero_config's eos; the tests set pad = eos


def tiny_classifier(seed=0) -> DeciLMForSequenceClassification:
    cfg = hetero_config()
    cfg.pad_token_id, cfg.num_labels = EOS, 1
    torch.manual_seed(seed)
    return DeciLMForSequenceClassification(cfg).eval()


def tiny_llama_classifier(seed=0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=EOS,
                      eos_token_id=EOS)
    return LlamaForSequenceClassification(cfg).eval()


# ------------------------------------------------------------------------------------------ the loss


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.0, -1.0])
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, -0.5, 0
    plain = (math.log1p(math.exp(-1)) + math.log1p(math.exp(0.5)) + math.log(2)) / 3
    assert float(rm.bradley_terry_loss(chosen, rejected)) == pytest.approx(plain, abs=1e-6)
    margin = torch.tensor([1.0, 0.0, -2.0])  # d = 0, -0.5, 2
    with_margin = (math.log(2) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(-2))) / 3
    assert float(rm.bradley_terry_loss(chosen, rejected, margin)) == pytest.approx(with_margin, abs=1e-6)
    centre = ((3.0 ** 2) + (1.5 ** 2) + (-2.0) ** 2) / 3  # mean (r_c + r_l)^2
    assert float(rm.bradley_terry_loss(chosen, rejected, margin, center_coef=0.01)) == pytest.approx(
        with_margin + 0.01 * centre, abs=1e-6)
    # the gradient raises the chosen score and lowers the rejected one
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    rm.bradley_terry_loss(c, r).backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()


# ------------------------------------------------------------------------------------------ last token


def _sequences():
    # the second ends in eos = pad: a pad-token rule reads the wrong position there
    return [[1, 7, 8, 9, 10, 11, 5], [1, 12, 13, EOS], [1, 20, 21, 22, 23]]


@pytest.mark.parametrize("make", [tiny_classifier, tiny_llama_classifier], ids=["nemotron-nas", "llama"])
def test_last_token_scores_ignore_padding_on_either_side(make):
    model = make()
    seqs = _sequences()
    with torch.no_grad():
        alone = torch.cat([rm.last_token_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                           for s in seqs])
        for side in ("left", "right"):
            ids, mask = rm.pad_batch(seqs, EOS, side)
            got = rm.last_token_scores(model, ids, mask)
            assert torch.allclose(got, alone, atol=1e-5), (side, got, alone)
        # packed without padding (each sequence attending to itself only): the same scores
        packed = rm.collate_pairs(seqs[:2], [seqs[2], seqs[0]], EOS, packed=True)
        got = rm.packed_scores(model, packed)
        assert torch.allclose(got, torch.cat([alone[:2], alone[2:], alone[:1]]), atol=1e-5)
    assert len(set(alone.tolist())) == 3  # the scores differ: the check can fail


def test_the_classifier_forward_reads_the_last_attended_token_and_shows_the_pad_trap():
    model = tiny_classifier()
    seqs = _sequences()
    with torch.no_grad():
        want = rm.last_token_scores(model, *rm.pad_batch(seqs, EOS, "right"))
        for side in ("left", "right"):
            ids, mask = rm.pad_batch(seqs, EOS, side)
            assert torch.allclose(model(ids, attention_mask=mask).logits[:, 0], want, atol=1e-5)
        # without a mask, transformers' rule (rightmost non-pad token) skips the final eos of the second sequence
        ids, _ = rm.pad_batch(seqs, EOS, "right")
        no_mask = model(ids).logits[:, 0]
    assert torch.allclose(no_mask[[0, 2]], want[[0, 2]], atol=1e-5)
    assert not torch.allclose(no_mask[1], want[1], atol=1e-3)


# ------------------------------------------------------------------------------------------ the folder


def test_the_reward_model_folder_loads_as_a_sequence_classifier_with_and_without_thinkfast(tmp_path):
    from test_modeling import hetero_model

    hetero_model().save_pretrained(tmp_path / "policy")
    torch.manual_seed(0)
    model = rm.reward_model_from_policy(tmp_path / "policy", pad_token_id=EOS)
    assert type(model) is DeciLMForSequenceClassification and model.score.weight.shape == (1, 64)
    model.save_pretrained(tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                               "AutoModelForSequenceClassification": "modeling_decilm.DeciLMForSequenceClassification"}
    assert cfg["architectures"] == ["DeciLMForSequenceClassification"] and cfg["pad_token_id"] == EOS
    ids, mask = rm.pad_batch(_sequences(), EOS, "left")
    with torch.no_grad():
        want = rm.last_token_scores(model, ids, mask)
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        assert type(loaded) is DeciLMForSequenceClassification
        assert torch.equal(rm.last_token_scores(loaded, ids, mask), want)
    torch.save({"ids": ids, "mask": mask, "want": want}, tmp_path / "io.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForSequenceClassification
m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'rm')!r}, trust_remote_code=True).eval()
assert not any(k == 'thinkfast' or k.startswith('thinkfast.') for k in sys.modules), 'thinkfast was imported'
io = torch.load({str(tmp_path / 'io.pt')!r})
with torch.no_grad():
    got = m(input_ids=io['ids'], attention_mask=io['mask']).logits[:, 0]
assert torch.allclose(got, io['want'], atol=1e-5), (got, io['want'])
print(type(m).__name__, type(m).__module__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    name, module = res.stdout.strip().splitlines()[-1].split()
    assert name == "DeciLMForSequenceClassification" and module.startswith("transformers_modules")


def test_a_llama_policy_gets_transformers_llama_classifier(tmp_path):
    from test_modeling import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    torch.manual_seed(0)
    model = rm.reward_model_from_policy(tmp_path / "llama", pad_token_id=EOS)
    assert type(model) is LlamaForSequenceClassification and model.config.num_labels == 1
    model.save_pretrained(tmp_path / "rm")
    loaded = load_sequence_classifier(tmp_path / "rm").eval()
    ids, mask = rm.pad_batch(_sequences(), EOS, "left")
    with torch.no_grad():
        assert torch.allclose(rm.last_token_scores(loaded, ids, mask), rm.last_token_scores(model.eval(), ids, mask),
                              atol=1e-6)


# ------------------------------------------------------------------------------------------ pairs


def test_read_pairs_both_schemas_and_errors_name_file_and_line(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 0.5},
            {"prompt": [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "1+1?"}],
             "chosen": [{"role": "assistant", "content": "2"}], "rejected": "3"},
            {"prompt": "3+3?", "responses": ["6", "7", "six", "8"], "scores": [1.0, 0.0, 1.0, -1.0]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = rm.read_pairs([str(f)])
    assert [(p.chosen, p.rejected, p.margin, p.thinking) for p in pairs[:2]] == [("4", "5", 0.5, None),
                                                                                 ("2", "3", None, False)]
    assert pairs[0].prompt == [{"role": "user", "content": "2+2?"}] and pairs[0].source == f"{f}:1"
    scored = {(p.chosen, p.rejected, p.margin) for p in pairs[2:]}  # equal scores ("6", "six") make no pair
    assert scored == {("6", "7", 1.0), ("6", "8", 2.0), ("7", "8", 1.0), ("six", "7", 1.0), ("six", "8", 2.0)}
    # round trip through the stage's pairs.jsonl schema
    back = tmp_path / "back.jsonl"
    back.write_text("".join(json.dumps(rm.pair_row(p)) + "\n" for p in pairs))
    again = rm.read_pairs([str(back)])
    assert [(p.prompt, p.chosen, p.rejected, p.margin, p.thinking) for p in again] == [
        (p.prompt, p.chosen, p.rejected, p.margin, p.thinking) for p in pairs]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad} line 3: a row needs 'chosen' and 'rejected'"):
        rm.read_pairs([str(bad)])
    bad.write_text(json.dumps({"prompt": "x", "responses": ["a", "b"], "scores": [1, "high"]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad} line 1: scores\[1\] must be a finite number"):
        rm.read_pairs([str(bad)])


def test_the_nano_ranking_rule():
    key = rm.nano_rank_key
    assert key(True, False, 500) > key(False, True, 1)  # correct beats wrong, whatever else
    assert key(True, True, 500) > key(True, False, 1)  # among correct: obeying beats not
    assert key(False, True, 500) > key(False, False, 1)  # among wrong too
    assert key(True, True, 10) > key(True, True, 11)  # then shorter beats longer
    prompt = [{"role": "user", "content": "q"}]
    texts = ["right long", "right short", "wrong", "right short", "wrong again"]
    keys = [key(True, True, 9), key(True, True, 3), key(False, False, 2), key(True, True, 3), key(False, False, 2)]
    pairs = rm.nano_pairs(prompt, texts, keys, thinking=True)
    assert {(p.chosen, p.rejected, p.rule) for p in pairs} == {
        ("right short", "right long", "shorter"), ("right long", "wrong", "correct"),
        ("right long", "wrong again", "correct"), ("right short", "wrong", "correct"),
        ("right short", "wrong again", "correct")}  # equal keys and repeated texts: no pair
    obey = rm.nano_pairs(prompt, ["a", "b"], [key(False, True, 5), key(False, False, 1)], thinking=False)
    assert [(p.chosen, p.rule) for p in obey] == [("a", "obeyed")]
    assert all(p.thinking is True and p.margin is None for p in pairs)


# ------------------------------------------------------------------------------------------ training, scoring


def test_reward_model_step_learns_the_pairs():
    model = tiny_classifier()
    model.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = [[1, 7, 8, 5], [1, 9, 10, 11, 5], [1, 12, 5]]
    rejected = [[1, 7, 9, 5], [1, 9, 10, 5], [1, 13, 14, 15, 5]]
    batch = rm.collate_pairs(chosen, rejected, EOS, [1.0, None, 0.5])
    assert batch["input_ids"].shape == (6, 5) and batch["margin"].tolist() == [1.0, 0.0, 0.5]
    opt = train_loop.adamw(model, lr=3e-3)
    first = rm.pair_accuracy(model, batch)
    records = [rm.reward_model_step(model, opt, batch, center_coef=0.01) for _ in range(30)]
    last = rm.pair_accuracy(model, batch)
    assert records[0]["loss"] == pytest.approx(first["loss"] + 0.01 * 0, abs=0.05)
    assert last["loss"] < first["loss"] - 0.3 and last["accuracy"] == 1.0 and last["gap"] > first["gap"]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == set(before)  # every trained parameter moved


def _tiny_reward_model(tmp_path):
    from thinkfast.artifacts import copy_tokenizer_files, write_model_sidecar

    policy = tiny_chat_model(tmp_path / "policy")
    torch.manual_seed(1)
    model = rm.reward_model_from_policy(policy, pad_token_id=0)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    folder = tmp_path / "rmstage" / "reward_model"
    model.save_pretrained(folder)
    copy_tokenizer_files(policy, folder)
    write_model_sidecar(folder, prompting="chat", made_by="reward_model")
    return folder


def test_a_reward_model_as_a_reward_scores_in_batches(tmp_path):
    folder = _tiny_reward_model(tmp_path)
    scorer = rm.load_reward_model(folder.parent)  # the stage's folder works too
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "What is 7 * 8?"}],
               [{"role": "user", "content": "What is 2 + 3?"}]]
    texts = ["<think>\n2 + 3 = 5\n</think>\n\nAnswer: 5", "Answer: 56", "Answer: 6"]
    modes = [True, False, False]
    alone = [scorer.score([p], [t], [m])[0] for p, t, m in zip(prompts, texts, modes)]
    assert scorer.score(prompts, texts, modes, batch_size=2) == pytest.approx(alone, abs=1e-5)
    assert len({round(a, 5) for a in alone}) == 3
    seqs = [rm.response_ids(scorer.tokenizer, p, t, m) for p, t, m in zip(prompts, texts, modes)]
    assert seqs[0][-1] == rm.end_token_id(scorer.tokenizer) != scorer.tokenizer.pad_token_id
    reward = load_reward(f"reward_model:{folder}")
    assert load_reward(f"reward_model:{folder}").__name__ == reward.__name__ == f"reward_model:{folder}"
    runner = RewardRunner([("rm", reward, 2.0)])
    total, parts, errors = runner([[{"role": "assistant", "content": t}] for t in texts], [False, False, True],
                                  {"prompts": prompts, "thinking": modes, "completion_ids": [[1], [2], [3]]})
    assert not errors and parts["rm"] == pytest.approx(alone, abs=1e-5)
    assert total[:2] == pytest.approx([2 * a for a in alone[:2]], abs=1e-5) and total[2] == 0.0  # truncated: 0
    with pytest.raises(ValueError, match="names no folder"):
        load_reward("reward_model:")


# ------------------------------------------------------------------------------------------ the stage


@dataclass
class _FakeItem:
    problem: object
    prompt: str
    instruction_id_list: tuple
    kwargs: tuple
    thinking: bool


def _fake_instructions():
    """Stands in for thinkfast.tasks.instructions while that module is being written: nano problems with one
    instruction (end with "Done.") and the teacher's compliant response."""
    from thinkfast.nano import tasks

    def nano_if_items(n, *, seed, kinds, digits, steps, split="train", instructions=(1, 3), thinking="both"):
        problems = tasks.make_problems(n, seed=seed, kinds=tuple(kinds), digits=tuple(digits), steps=tuple(steps),
                                       split=split)
        return [_FakeItem(p, tasks.chat_prompt(p) + "\nEnd your response with the phrase \"Done.\"",
                          ("startend:end_checker",), ({"end_phrase": "Done."},), thinking != "off" and i % 2 == 0)
                for i, p in enumerate(problems)]

    def if_response(item):
        return tasks.chat_response(item.problem, item.thinking) + "\nDone."

    mod = types.ModuleType("thinkfast.tasks.instructions")
    mod.nano_if_items, mod.if_response = nano_if_items, if_response
    return mod


@pytest.fixture
def instructions(monkeypatch):
    try:
        import thinkfast.tasks.instructions  # noqa: F401  (the real one, once it exists)
    except ImportError:
        monkeypatch.setitem(sys.modules, "thinkfast.tasks.instructions", _fake_instructions())


def _pipe(run, policy, *extra):
    return load_pipeline(default_config_path("smoke"), [
        f"run_dir={run}", "stages=[parent,reward_model]", f"parent.path={policy}", "reward_model.prompts=6",
        "reward_model.samples=2", "reward_model.digits=[1]", "reward_model.steps=[1]", "reward_model.max_new_tokens=12",
        "reward_model.batch_size=4", "reward_model.train_steps=4", "reward_model.checkpoint_every=2",
        "reward_model.eval_every=2", "reward_model.held_out=0.25", "reward_model.lr=0.003",
        "reward_model.device=cpu", *extra])


def test_the_stage_makes_a_reward_model_and_resumes_to_the_same_weights(tmp_path, monkeypatch, instructions):
    policy = tiny_chat_model(tmp_path / "policy")
    ref = tmp_path / "ref"
    pipe = _pipe(ref, policy)
    run_stage(pipe, "parent")
    m, _ = run_stage(pipe, "reward_model")
    out = ref / "reward_model"
    assert (out / "reward_model" / "config.json").is_file() and (out / "reward_model" / "tokenizer.json").is_file()
    assert json.loads((out / "reward_model" / "thinkfast.json").read_text())["made_by"] == "reward_model"
    assert not (out / "model").exists()  # a new output kind: never "the latest model"
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == m["pairs"] and m["train_pairs"] + m["held_out_pairs"] == m["pairs"]
    assert m["steps"] == 4 and m["model_class"] == "DeciLMForSequenceClassification"
    assert 0 <= m["held_out_accuracy_before"] <= 1 and 0 <= m["held_out_accuracy_after"] <= 1
    # every teacher response is correct and compliant, the tiny random policy's samples are not: the teacher's
    # response is chosen in every pair it is in
    assert m["nano"]["teacher_ranked_first"] == 1.0
    rules = {p.get("rule") for p in pairs}
    assert rules <= {"correct", "obeyed", "shorter"} and "correct" in rules
    by_rule = m["held_out_by_rule"]
    assert sum(r["pairs"] for r in by_rule.values()) == m["held_out_pairs"]
    assert sum(r["pairs"] * r["accuracy_after"] for r in by_rule.values()) == pytest.approx(
        m["held_out_accuracy_after"] * m["held_out_pairs"])
    curve = json.loads((out / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4] and len(curve["steps"]) == 4
    want = load_file(out / "reward_model" / "model.safetensors")
    policy_w = load_file(policy / "model.safetensors")
    assert not torch.equal(want["model.embed_tokens.weight"], policy_w["model.embed_tokens.weight"])  # trained

    run = tmp_path / "run"
    pipe = _pipe(run, policy)
    run_stage(pipe, "parent")
    real, calls = train_loop.optimizer_step, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # step 3: after the checkpoint at step 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_loop, "optimizer_step", failing)
    with pytest.raises(KeyboardInterrupt):
        run_stage(pipe, "reward_model")
    monkeypatch.setattr(train_loop, "optimizer_step", real)
    assert (run / "reward_model.partial" / "pairs.jsonl").is_file()

    def no_sampling(*a, **k):
        raise AssertionError("the pairs were sampled again")

    monkeypatch.setattr(reward_model_stage, "nano_world_pairs", no_sampling)
    run_stage(pipe, "reward_model")
    events = [json.loads(line) for line in (run / "reward_model" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    got = load_file(run / "reward_model" / "reward_model" / "model.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k


def test_the_stage_trains_on_pair_files(tmp_path):
    policy = tiny_chat_model(tmp_path / "policy")
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"Answer: {i + 1}", "rejected": f"Answer: {i + 2}",
             "margin": 0.5} for i in range(12)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = _pipe(tmp_path / "run", policy, f"reward_model.pairs=[{f}]", "reward_model.margin=true",
                 "reward_model.held_out=3", "reward_model.train_steps=3")
    run_stage(pipe, "parent")
    m, _ = run_stage(pipe, "reward_model")
    assert (m["pairs"], m["held_out_pairs"], m["steps"]) == (12, 3, 3) and "nano" not in m
    assert not (tmp_path / "run" / "reward_model" / "pairs.jsonl").exists()
    with pytest.raises(ValueError, match="held_out=0.0 must be"):
        _pipe(tmp_path / "x", policy, "reward_model.held_out=0")
