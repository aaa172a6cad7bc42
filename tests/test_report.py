"""The run report: written from the run directory's records, every section that has data, by the CLI too."""

from __future__ import annotations

import pytest

from thinkfast.cli import main
from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.report import write_report


def test_report_of_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    pipe = load_pipeline(default_config_path("smoke"), [
        f"run_dir={run}", "stages=[pretrain,sft,grpo,eval]", "pretrain.train_steps=3", "sft.nano_prompts=4",
        "sft.batch_size=2", "sft.seq_len=256", "sft.eval_problems=2", "sft.eval_every=1", "sft.digits=[1]",
        "sft.steps=[1]", "grpo.prompts=4", "grpo.digits=[1]", "grpo.steps=[1]", "grpo.group_size=2",
        "grpo.prompts_per_step=2", "grpo.train_steps=2", "grpo.max_new_tokens=6", "grpo.pass_rate_samples=2",
        "grpo.eval_problems=2", "grpo.eval_every=1", "grpo.eval_max_new_tokens=4", "grpo.easy_threshold=1.0",
        "eval.max_new_tokens=4", "eval.per_cell=1", "eval.digits=[1]", "eval.throughput_batches=[1,2]",
        "eval.throughput_prefill=8", "eval.throughput_context=8", "eval.throughput_rounds=2",
        "eval.budgets=[0,2,null]", "eval.budget_grace=1"])
    for stage in ("pretrain", "sft", "grpo", "eval"):
        run_stage(pipe, stage)
    text = write_report(run).read_text()
    for section in ("## Stages", "| pretrain |", "| grpo |", "## Models", "decode_tok_s@2", "## Training curves"):
        assert section in text, section
    assert "| sft | on |" in text and "| pretrain | think |" in text
    assert "## Thinking budget" in text
    for png in ("accuracy_vs_throughput.png", "training_curves.png", "budget.png"):
        assert (run / "report" / png).stat().st_size > 1000
    assert main(["report", str(run)]) == 0 and "report.md" in capsys.readouterr().out


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no completed stage" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")
