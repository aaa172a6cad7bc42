"""The run report: written from the run directory's records, every section that has data, by the CLI too."""

from __future__ import annotations

import json

import pytest

from thinkfast.artifacts import CURVE_FORMAT, Curve, read_curve, write_curve
from thinkfast.cli import main
from thinkfast.pipeline import default_config_path, load_pipeline, run_stage
from thinkfast.report import _curves, write_report


def test_report_of_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        f"run_dir={run}", "stages=[pretrain,sft,grpo,eval]", "pretrain.train_steps=3", "sft.nano_prompts=4",
        "sft.batch_size=2", "sft.seq_len=256", "sft.eval_problems=2", "sft.eval_every=1", "sft.digits=[1]",
        "sft.steps=[1]", "grpo.prompts=4", "grpo.digits=[1]", "grpo.steps=[1]", "grpo.group_size=2",
        "grpo.prompts_per_step=2", "grpo.train_steps=2", "grpo.max_new_tokens=6", "grpo.pass_rate_samples=2",
        "grpo.eval_problems=2", "grpo.eval_every=1", "grpo.eval_max_new_tokens=4", "grpo.easy_threshold=1.0",
        "eval.max_new_tokens=4", "eval.per_cell=1", "eval.digits=[1]", "eval.throughput_batches=[1,2]",
        "eval.throughput_prefill=8", "eval.throughput_context=8", "eval.throughput_rounds=2",
        "eval.budgets=[0,2,null]", "eval.budget_grace=1"]
    pipe = load_pipeline(default_config_path("smoke"), overrides)
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
    # eval.budget_models=last: the sweep on the last model only; the last's evaluation is reused, the others' redone
    models = json.loads((run / "eval" / "metrics.json").read_text())["models"]
    assert models["sft"]["budget"] and models["grpo"]["budget"]
    pipe = load_pipeline(default_config_path("smoke"), [*overrides, "eval.budget_models=last"])
    run_stage(pipe, "eval")
    models = json.loads((run / "eval" / "metrics.json").read_text())["models"]
    assert "budget" not in models["sft"] and [p["budget"] for p in models["grpo"]["budget"]] == [0, 2, None]
    assert "reusing the evaluation of this very model" in capsys.readouterr().out


def test_report_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no completed stage" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_curves_of_either_old_shape_and_of_the_one_schema_are_plotted_without_naming_stages(tmp_path):
    """Runs made before artifacts' one curve.json schema: distill and sft wrote a list of evaluation points, grpo
    {"eval": points, "steps": records}. The report reads those and the schema alike, for any stage name."""
    run = tmp_path / "run"
    _write(run / "distill" / "curve.json", [{"step": 0, "tokens": 0, "kl": 0.5, "lm_loss": 2.0, "accuracy": 0.1},
                                            {"step": 6, "tokens": 9, "kl": 0.2, "lm_loss": 1.5, "accuracy": 0.3}])
    _write(run / "sft" / "curve.json", [{"step": 0, "tokens": 0, "loss": 1.0},
                                        {"step": 4, "tokens": 8, "loss": 0.5, "on": {"accuracy": 0.25},
                                         "off": {"accuracy": 0.75}}])
    _write(run / "grpo" / "curve.json", {"eval": [{"step": 0, "on": {"accuracy": 0.5}, "off": {"accuracy": 0.4}}],
                                         "steps": [{"step": 0, "reward": 0.1, "kl": 0.0},
                                                   {"step": 1, "reward": 0.3, "kl": 0.1}]})
    rloo = Curve(points=[{"step": 0, "held_out": {"pass": 0.5}}, {"step": 2, "held_out": {"pass": None}}],
                 steps=[{"step": 0, "reward": 1.0}],
                 plot=[{"label": "reward", "y": "reward", "of": "steps"},
                       {"label": "held-out pass", "y": "held_out.pass"}])
    write_curve(run / "rloo", rloo)
    _write(run / "eval" / "curve.json", {"something": "else"})  # not a curve: left out
    assert json.loads((run / "rloo" / "curve.json").read_text())["format"] == CURVE_FORMAT

    curves = _curves(run)
    assert list(curves) == ["distill", "grpo", "rloo", "sft"]  # none finished: by name
    assert curves["distill"] == ([("KL to the parent", [0, 6], [0.5, 0.2]), ("accuracy", [0, 6], [0.1, 0.3])], True)
    assert curves["sft"] == ([("loss", [0, 4], [1.0, 0.5]), ("accuracy on", [4], [0.25]),
                              ("accuracy off", [4], [0.75])], False)
    assert curves["grpo"] == ([("reward", [0, 1], [0.1, 0.3]), ("accuracy on", [0], [0.5]),
                               ("accuracy off", [0], [0.4])], False)
    assert curves["rloo"] == ([("reward", [0], [1.0]), ("held-out pass", [0, 2], [0.5, None])], False)
    assert read_curve(run / "rloo").points == rloo.points and read_curve(run / "eval") is None
    assert read_curve(run / "missing" / "curve.json") is None


def test_a_stage_writes_the_one_curve_schema(tmp_path):
    """Written then read == in memory."""
    curve = Curve(points=[{"step": 0, "loss": 1.0}], plot=[{"label": "loss", "y": "loss"}], log_y=True)
    path = write_curve(tmp_path, curve)
    assert path == tmp_path / "curve.json"
    assert json.loads(path.read_text()) == {"format": CURVE_FORMAT, "points": [{"step": 0, "loss": 1.0}],
                                            "plot": [{"label": "loss", "y": "loss"}], "log_y": True}
    assert read_curve(path) == curve
