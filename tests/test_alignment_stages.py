"""The alignment stages (issue 25) in the pipeline on the smoke config: rloo, reward_model and rpo run inside
`thinkfast run`, resume to the same weights, reject bad instruction rows before any work; offline DPO runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.train import loop as train_loop

STAGES = "stages=[pretrain,sft,rloo,reward_model,rpo]"
IF_SFT = "sft.if_prompts=8"


def _pipe(run, *extra):
    return load_pipeline(default_config_path("smoke"), [f"run_dir={run}", STAGES, IF_SFT, "pretrain.train_steps=2", *extra])


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """pretrain, sft, rloo, reward_model and rpo of the smoke config through `thinkfast run`."""
    from thinkfast.cli import main

    run = tmp_path_factory.mktemp("align") / "run"
    assert main(["run", "--config", str(default_config_path("smoke")), f"run_dir={run}", STAGES,
                 IF_SFT, "pretrain.train_steps=2"]) == 0
    return run


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def test_the_alignment_stages_run_in_the_pipeline(aligned):
    rloo = json.loads((aligned / "rloo" / "metrics.json").read_text())
    assert rloo["steps"] == 2 and "if_strict_on_after" in rloo and "format_ok_off_before" in rloo
    curve = json.loads((aligned / "rloo" / "curve.json").read_text())
    assert {"reward", "kl", "scorable", "instructions", "reward_ifeval_strict"} <= set(curve["steps"][0])
    assert [s["math_prompts"] for s in curve["steps"]] == [2, 2]  # plain math prompts beside the instruction ones
    assert (aligned / "reward_model" / "reward_model" / "config.json").is_file()
    assert not (aligned / "reward_model" / "model").exists()  # its own kind: never "the latest model"
    rpo = json.loads((aligned / "rpo" / "metrics.json").read_text())
    assert rpo["mode"] == "online" and rpo["loss"] == "rpo_bwd_kl" and len(rpo["rm_score_on"]) == 3
    marker = json.loads((aligned / "rpo" / "COMPLETE.json").read_text())
    assert marker["inputs"]["model"]["stage"] == "rloo" and marker["inputs"]["reward_model"]["stage"] == "reward_model"


@pytest.mark.parametrize("name", ["rloo", "rpo"])
def test_an_interrupted_stage_resumes_to_the_same_weights(aligned, tmp_path, monkeypatch, name):
    want = load_file(aligned / name / "model" / "model.safetensors")
    run = _copy(aligned, tmp_path / "run")
    shutil.rmtree(run / name)
    real, calls = train_loop.TrainLoop.end_step, []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # step 2 trained but not checkpointed (checkpoint_every: 1 wrote step 1's)
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(train_loop.TrainLoop, "end_step", failing)
    with pytest.raises(KeyboardInterrupt):
        run_stage(_pipe(run), name)
    monkeypatch.setattr(train_loop.TrainLoop, "end_step", real)
    run_stage(_pipe(run), name)
    got = load_file(run / name / "model" / "model.safetensors")
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k


def test_offline_dpo_runs_on_nano_pairs_without_a_reward_model(aligned, tmp_path):
    run = _copy(aligned, tmp_path / "run")
    m, _ = run_stage(_pipe(run, "stages=[pretrain,sft,rloo,rpo]", "rpo.mode=offline", "rpo.samples=3"), "rpo")
    assert m["mode"] == "offline" and m["loss"] == "dpo" and m["steps"] == 2


def test_bad_instruction_rows_are_an_error_naming_file_and_line_before_any_work(aligned, tmp_path):
    rows = tmp_path / "if.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 2+2?", "instruction_id_list": ["punctuation:no_comma"],
                                "kwargs": [{}]}) + "\n"
                    + json.dumps({"prompt": "Hi", "instruction_id_list": ["no:such_instruction"], "kwargs": [{}]})
                    + "\n")
    run = _copy(aligned, tmp_path / "run")
    with pytest.raises(ValueError, match=r"if\.jsonl:2: .*no:such_instruction"):
        run_stage(_pipe(run, f"rloo.files=[{rows}]", "rloo.eval_problems=1", "rloo.math_per_step=0"), "rloo")


def test_offline_dpo_on_a_pair_file(aligned, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is 2 + 3?", "chosen": "Answer: 5", "rejected": "Answer: 6"},
        {"prompt": [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "What is 4 + 4?"}],
         "responses": ["Answer: 8", "Answer: 9", "no idea"], "scores": [1.0, 0.0, -1.0]}]))
    run = _copy(aligned, tmp_path / "run")
    m, _ = run_stage(_pipe(run, "stages=[pretrain,sft,rloo,rpo]", "rpo.mode=offline", f"rpo.pairs=[{pairs}]"), "rpo")
    assert m["mode"] == "offline" and m["pairs_last_round"] == 4  # 1 + the 3 pairs of distinct scores


def test_a_reward_model_named_as_a_reward_is_an_input_by_content(aligned, tmp_path):
    from thinkfast.pipeline import status
    from thinkfast.rundir import RunDir

    run = _copy(aligned, tmp_path / "run")
    rm_dir = tmp_path / "rm"
    shutil.copytree(run / "reward_model", rm_dir)
    extra = ["rloo.rewards=[nano_accuracy,reward_model:" + str(rm_dir) + "]", "rloo.train_steps=1",
             "rloo.eval_problems=0"]
    m, _ = run_stage(_pipe(run, *extra), "rloo")
    assert m["reward_last"] is not None
    with RunDir(run) as rd:
        assert status(_pipe(run, *extra), rd, "rloo")[0] == "complete"
    cfg = rm_dir / "reward_model" / "config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"retrained": true, ', 1))
    with RunDir(run) as rd:
        state, reasons = status(_pipe(run, *extra), rd, "rloo")
    assert state == "stale" and any("reward_models" in r for r in reasons), reasons
    with pytest.raises(Exception, match="no reward-model folder"):
        run_stage(_pipe(run, "rloo.rewards=[reward_model:" + str(tmp_path / "nowhere") + "]"), "rloo")
