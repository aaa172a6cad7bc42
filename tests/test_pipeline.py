"""The smallest pipeline end to end, and the run-directory contract: exact stage dependencies (reuse what
is current, redo what changed, refuse what is stale), `run --from`, outside files, the upgrade rule,
nothing lost on --force or failure."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SMOKE_STAGES as STAGES
from helpers import ids, marker, smoke, snapshot, state
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinkfast.cli import main
from thinkfast.config import ConfigError
from thinkfast.pipeline import default_config_path, dependents, load_pipeline, run_all, run_stage, status, upstream
from thinkfast.rundir import RunDir, RunDirError, StageConfigMismatch

SMOKE = default_config_path("smoke")
REPO = Path(__file__).resolve().parents[1]


def test_repo_configs_are_the_embedded_ones():
    for name in ("nano", "smoke"):
        assert (REPO / "configs" / f"{name}.yaml").read_text() == default_config_path(name).read_text()
        load_pipeline(default_config_path(name))  # every section validates


def test_smoke_pipeline_end_to_end(base):
    run, results = base
    assert sorted(p.name for p in (run / "pretrain").iterdir()) == [
        "COMPLETE.json", "log.jsonl", "metrics.json", "model"]
    assert not list(run.glob("*.partial")) and (run / "thinkfast-run.json").is_file()
    model_files = {p.name for p in (run / "pretrain" / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "thinkfast.json"} <= model_files
    assert results["pretrain"]["train_steps"] == 6 and results["pretrain"]["tokens"] == 6 * 4 * 256
    events = [json.loads(line)["event"] for line in (run / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "done" and "train" in events
    model = AutoModelForCausalLM.from_pretrained(run / "pretrain" / "model")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(run / "pretrain" / "model").chat_template

    # Puzzle: library -> scores -> costs -> search, and the child is a nemotron-nas model with the tokenizer
    assert {p.name for p in (run / "library" / "library").iterdir()} == {"library.json", "weights.safetensors"}
    assert (run / "scores" / "scores.json").is_file() and (run / "costs" / "costs.json").is_file()
    assert {"architecture.txt", "search.json", "pareto.json", "pareto.md", "model"} <= {
        p.name for p in (run / "search").iterdir()}
    assert results["search"]["params"] <= 28000 and results["search"]["optimal"]
    child = AutoModelForCausalLM.from_pretrained(run / "search" / "model")
    assert type(child).__name__ == "DeciLMForCausalLM"
    assert json.loads((run / "search" / "model" / "thinkfast.json").read_text())["prompting"] == "text"

    # eval is a leaf that evaluated every model of the run: one folder each, one table with a row per model
    ev = results["eval"]["models"]
    assert set(ev) == {"pretrain", "search"}
    for name in ev:
        assert ev[name]["prompting"] == "text" and set(ev[name]["modes"]) == {"think", "direct"}
        assert ev[name]["modes"]["think"]["cells"]["add/1d"]["n"] == 4
        assert {"metrics.json", "samples.jsonl", "table.txt", "record.json"} <= {
            p.name for p in (run / "eval" / name).iterdir()}
    table = (run / "eval" / "table.txt").read_text().splitlines()
    assert sum(line.startswith("pretrain") for line in table) == 2 and sum(
        line.startswith("search") for line in table) == 2
    # the marker records what the stage read, by role
    m = marker(run, "search")
    assert m["format"] == 2 and set(m["inputs"]) == {"parent", "library", "scores", "costs"}
    assert m["inputs"]["library"] == {"stage": "library", "id": marker(run, "library")["output_id"]}
    assert set(marker(run, "eval")["inputs"]["models"]) == {"pretrain", "search"}


def test_a_second_run_reuses_everything(run):
    before = {s: (run / s / "COMPLETE.json").read_text() for s in STAGES}
    again = run_all(smoke(run))
    assert {s: (run / s / "COMPLETE.json").read_text() for s in STAGES} == before
    assert again["pretrain"]["train_steps"] == 6


def test_dependencies_are_declared_by_role():
    pipe = smoke("unused")
    assert upstream(pipe, "pretrain") == []
    assert upstream(pipe, "library") == ["pretrain"]
    assert upstream(pipe, "search") == ["pretrain", "library", "scores", "costs"]
    assert upstream(pipe, "eval") == ["pretrain", "search"]
    assert dependents(pipe, "library") == ["scores", "costs", "search", "eval"]
    assert dependents(pipe, "eval") == [] and dependents(pipe, "costs") == ["search", "eval"]
    # an outside file replaces the stage that would have made it
    assert upstream(smoke("unused", "search.costs=/x/costs.json"), "search") == ["pretrain", "library", "scores"]


def test_redone_parent_never_mixes_with_old_layers(run):
    """Issue reproduction 1: pretrain redone with another seed, library redone, then search alone."""
    run_stage(smoke(run, "pretrain.seed=7"), "pretrain", force=True)
    assert state(run, "library") == "stale"  # its parent was redone
    # library reads only the parent; running it redoes it (the parent changed) without asking for --force
    _, ran = run_stage(smoke(run, "pretrain.seed=7"), "library")
    assert ran
    # search reads scores and costs, still made from the old parent: refused, naming what to run
    with pytest.raises(StageConfigMismatch, match=r"stage 'scores'.*out of date.*input 'parent'.*redone"):
        run_stage(smoke(run, "pretrain.seed=7"), "search", force=True)
    run_all(smoke(run, "pretrain.seed=7"))
    parent = load_file(run / "pretrain" / "model" / "model.safetensors")
    child = load_file(run / "search" / "model" / "model.safetensors")
    assert torch.equal(parent["model.embed_tokens.weight"], child["model.embed_tokens.weight"])
    m = marker(run, "search")
    assert m["inputs"]["parent"]["id"] == marker(run, "pretrain")["output_id"]
    assert m["inputs"]["library"]["id"] == marker(run, "library")["output_id"]


def test_redone_library_makes_search_stale(run):
    """Issue reproduction 2: library forced with another bld_steps; the old search is not reported complete."""
    run_stage(smoke(run, "library.bld_steps=8"), "library", force=True)
    assert state(run, "search", "library.bld_steps=8") == "stale"
    with pytest.raises(StageConfigMismatch, match="stage 'scores'.*out of date"):
        run_stage(smoke(run, "library.bld_steps=8"), "search")
    # without the override the config says bld_steps=4: the library itself is out of date, and says why
    with pytest.raises(StageConfigMismatch, match=r"library.bld_steps changed: 8 -> 4"):
        run_stage(smoke(run), "scores")


def test_redoing_eval_leaves_every_other_stage_current(run):
    before = ids(run)
    run_stage(smoke(run), "eval", force=True)
    after = ids(run)
    assert {s: after[s] == before[s] for s in STAGES} == {s: s != "eval" for s in STAGES}
    for s in STAGES:
        assert state(run, s) == "complete"


def test_run_from_redoes_a_stage_and_exactly_its_dependents(run, capsys):
    before = ids(run)
    run_all(smoke(run), from_stage="costs")
    after = ids(run)
    assert [s for s in STAGES if after[s] != before[s]] == ["costs", "search", "eval"]
    # eval re-used its evaluation of the unchanged parent and evaluated only the new child
    out = capsys.readouterr().out
    assert "pretrain: reusing the evaluation" in out and "search: reusing" not in out
    with pytest.raises(ConfigError, match="--from nope"):
        run_all(smoke(run), from_stage="nope")


def test_a_changed_stage_is_redone_and_so_is_what_reads_it(run):
    before = ids(run)
    run_all(smoke(run, "search.max_params=30000"))
    after = ids(run)
    assert [s for s in STAGES if after[s] != before[s]] == ["search", "eval"]


def test_outside_costs_file_is_identified_by_content(run, tmp_path):
    own = tmp_path / "own-costs.json"
    shutil.copy(run / "costs" / "costs.json", own)
    run_stage(smoke(run, f"costs.file={own}"), "costs")
    assert marker(run, "costs")["inputs"]["file"]["path"] == str(own.resolve())
    assert state(run, "costs", f"costs.file={own}") == "complete"
    data = json.loads(own.read_text())
    data["device"] = "cuda: measured elsewhere"
    own.write_text(json.dumps(data))
    pipe = smoke(run, f"costs.file={own}")
    with RunDir(pipe.run_dir) as rd:
        st, reasons = status(pipe, rd, "costs")
    assert st == "stale" and any("changed since this stage ran" in r for r in reasons)
    metrics, ran = run_stage(pipe, "costs")
    assert ran and metrics["device"] == "cuda: measured elsewhere"


def test_eval_model_outside_the_run_is_identified_by_content(run, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(run / "pretrain" / "model", model)
    out = tmp_path / "ev"
    args = ["eval", "--config", str(SMOKE), "--model", str(model), "--out", str(out), "eval.per_cell=2"]
    assert main(args) == 0
    first = marker(out, "eval")["output_id"]
    assert main(args) == 0 and marker(out, "eval")["output_id"] == first  # unchanged model: reused
    # the model is re-made (here: another parent's weights): the old result is not reused
    shutil.copy(run / "search" / "model" / "config.json", model / "config.json")
    shutil.copy(run / "search" / "model" / "model.safetensors", model / "model.safetensors")
    assert main(args) == 0 and marker(out, "eval")["output_id"] != first


def test_upgrade_rule_keeps_finished_work(run):
    """A config key the marker lacks (a field added later) counts as unchanged while it holds its default."""
    path = run / "pretrain" / "COMPLETE.json"
    m = json.loads(path.read_text())
    assert m["config"]["data.fact_fraction"] == 0.0  # the default
    del m["config"]["data.fact_fraction"]
    m["config"]["a_field_removed_since"] = 3  # unknown to the code now: ignored
    path.write_text(json.dumps(m))
    assert state(run, "pretrain") == "complete"
    _, ran = run_stage(smoke(run), "pretrain")
    assert not ran
    # the same missing key holding a non-default value now is a change, and says so
    pipe = smoke(run, "data.fact_fraction=0.1")
    with RunDir(pipe.run_dir) as rd:
        st, reasons = status(pipe, rd, "pretrain")
    assert st == "stale" and reasons == [
        "data.fact_fraction changed: 0.0 (as before the field existed) -> 0.1"]


def test_a_parent_made_before_the_data_section_is_kept(run):
    """The nano mix moved from pretrain's section to data: a marker holding it under its old name still
    describes the parent, and a change of the mix is named by its new key."""
    path = run / "pretrain" / "COMPLETE.json"
    m = json.loads(path.read_text())
    m["config"] = {k.removeprefix("data."): v for k, v in m["config"].items()}  # as pretrain wrote it
    path.write_text(json.dumps(m))
    assert state(run, "pretrain") == "complete"
    pipe = smoke(run, "data.digits=[1,2]")
    with RunDir(pipe.run_dir) as rd:
        assert status(pipe, rd, "pretrain") == ("stale", ["data.digits changed: [1] -> [1, 2]"])
    with pytest.raises(ConfigError, match="line .*'pretrain.kinds' moved to 'data.kinds'"):
        bad = run.parent / "old.yaml"
        bad.write_text("pretrain:\n  kinds: [add]\n")
        load_pipeline(bad)


def _make_legacy(run, order=("pretrain", "eval", "library", "scores", "costs", "search")):
    """Rewrite the markers as the thinkfast before recorded inputs wrote them (hash of config + the
    marker of the stage listed just before), in that version's stage order."""
    from thinkfast.config import config_hash, to_dict
    from thinkfast.pipeline import _NOT_IN_HASH

    pipe, upstream_ = smoke(run), None
    for i, name in enumerate(order):
        cfg = {k: v for k, v in to_dict(pipe.configs[name]).items() if k not in _NOT_IN_HASH}
        if name == "pretrain":  # the nano mix was pretrain's own then
            cfg.update(pipe.data.mix())
        h = config_hash({"stage": name, "config": cfg, "upstream": upstream_})
        m = {"stage": name, "config_hash": h, "finished_at": f"2026-11-0{i + 1}T00:00:00",
             "metrics": marker(run, name)["metrics"]}
        (run / name / "COMPLETE.json").write_text(json.dumps(m))
        upstream_ = [h, m["finished_at"]]


def test_a_run_finished_by_an_older_thinkfast_is_kept(run):
    _make_legacy(run)
    weights = (run / "search" / "model" / "model.safetensors").read_bytes()
    run_all(smoke(run))
    for name in ("pretrain", "library", "scores", "costs", "search"):
        m = marker(run, name)
        assert m["format"] == 2 and m["output_id"].startswith("legacy-") and m["legacy_config_hash"], name
    assert (run / "search" / "model" / "model.safetensors").read_bytes() == weights
    assert not marker(run, "eval")["output_id"].startswith("legacy-")  # eval now evaluates every model
    assert set(marker(run, "eval")["inputs"]["models"]) == {"pretrain", "search"}


def test_an_older_stage_whose_config_changed_is_redone_with_what_follows(run):
    _make_legacy(run)
    run_all(smoke(run, "scores.rows=3"))
    kept = {s: marker(run, s)["output_id"].startswith("legacy-") for s in STAGES}
    assert kept == {"pretrain": True, "library": True, "scores": False, "costs": True, "search": False,
                    "eval": False}


def test_force_then_fail_keeps_the_old_output_whole(run, monkeypatch):
    before = snapshot(run / "search")
    # a bad value: refused when the config loads, nothing touched
    with pytest.raises(ConfigError, match="device='tpu'"):
        run_stage(smoke(run, "pretrain.device=tpu"), "pretrain", force=True)
    # a value that fails inside the stage: the old output stays whole, nothing mixed in
    with pytest.raises(ConfigError, match="batch_size=7"):
        run_stage(smoke(run, "search.batch_size=7"), "search", force=True)
    assert snapshot(run / "search") == before and (run / "pretrain" / "model" / "model.safetensors").is_file()

    from thinkfast.stages import search

    def boom(*a, **k):
        raise RuntimeError("disk trouble while writing the Pareto table")

    monkeypatch.setattr(search, "_pareto", boom)  # after model/ and architecture.txt of the new run
    with pytest.raises(RuntimeError):
        run_stage(smoke(run, "search.max_params=30000"), "search", force=True)
    assert snapshot(run / "search") == before
    assert state(run, "search") == "complete"  # the old output still matches the YAML
    monkeypatch.undo()
    # completing without a sweep replaces the whole folder: no pareto.* of the old run survives
    run_stage(smoke(run, "search.sweep=[]"), "search")
    assert not list((run / "search").glob("pareto*")) and not (run / "search.partial").exists()


def test_costs_measured_on_another_device_are_not_reused(run, monkeypatch):
    from thinkfast.stages import costs

    assert state(run, "costs") == "complete"
    monkeypatch.setattr(costs, "device_name", lambda device: "cuda: some GPU")
    pipe = smoke(run)
    with RunDir(pipe.run_dir) as rd:
        st, reasons = status(pipe, rd, "costs")
    assert st == "stale" and "measured on 'cpu" in reasons[0] and "'cuda: some GPU'" in reasons[0]


def test_forced_eval_evaluates_again(run, capsys):
    capsys.readouterr()
    run_all(smoke(run), from_stage="eval")
    out = capsys.readouterr().out
    assert "reusing" not in out and "eval: pretrain: " in out and "eval: search: " in out


def test_a_damaged_marker_is_replaced_by_force(run, capsys):
    (run / "library" / "COMPLETE.json").write_text(json.dumps({"stage": "library", "format": 2, "config": "x"}))
    with pytest.raises(RunDirError, match=r"library/COMPLETE.json: not a thinkfast marker.*--force"):
        run_stage(smoke(run), "scores")
    _, ran = run_stage(smoke(run), "library", force=True)
    assert ran and marker(run, "library")["format"] == 2


@pytest.mark.parametrize("stage, outcome", [
    ("library", "redone"),  # reads only the parent, which is current: redone without asking
    ("scores", "refused: library"),  # reads the library, made from the old parent
    ("costs", "refused: library"),
    ("search", "refused: library"),
    ("eval", "refused: library"),  # the child is not current; the root cause is named
])
def test_every_single_stage_command_sees_a_redone_parent(run, stage, outcome):
    run_stage(smoke(run, "pretrain.seed=7"), "pretrain", force=True)
    assert state(run, stage, "pretrain.seed=7") == "stale"
    if outcome == "redone":
        assert run_stage(smoke(run, "pretrain.seed=7"), stage)[1]
        assert marker(run, stage)["inputs"]["parent"]["id"] == marker(run, "pretrain")["output_id"]
    else:
        with pytest.raises(StageConfigMismatch, match=f"stage '{outcome.split(': ')[1]}', which is out of date"):
            run_stage(smoke(run, "pretrain.seed=7"), stage)


def test_a_new_field_whose_default_changes_behaviour_keeps_old_work(run):
    """library.engine defaults to vllm, but a library made before the field existed was unrestricted
    (as with hf): such a marker stays complete while the config says hf, and is redone for vllm."""
    path = run / "library" / "COMPLETE.json"
    m = json.loads(path.read_text())
    assert m["config"].pop("engine") == "hf"
    path.write_text(json.dumps(m))
    assert state(run, "library") == "complete"
    pipe = smoke(run, "library.engine=vllm")
    with RunDir(pipe.run_dir) as rd:
        st, reasons = status(pipe, rd, "library")
    assert st == "stale" and reasons == ["library.engine changed: 'hf' (as before the field existed) -> 'vllm'"]

