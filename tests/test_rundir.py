"""The stage protocol of thinkfast.rundir: work folder, markers, stale detection, the upgrade rule, and
crashes at every point of a commit."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from thinkfast import rundir
from thinkfast.config import ConfigError
from thinkfast.rundir import (MARKER_FORMAT, RunDirError, StageRun, atomic_dir, atomic_write_json, describe_changes,
                              read_marker)

from helpers import names, snapshot


# ------------------------------------------------------------------- StageRun

DEFAULTS = {"lr": 0.1, "steps": 10, "warmup": 0}
INPUTS = {
    "model": {"stage": "pretrain", "id": "m1"},
    "data": {"path": "/data/train.jsonl", "id": "d1"},
}


def record(config=None, inputs=None, **overrides):
    cfg = dict(DEFAULTS, **overrides) if config is None else config
    return {"config": cfg, "inputs": INPUTS if inputs is None else inputs}


def make_run(run_dir, rec=None, name="sft", defaults=DEFAULTS) -> StageRun:
    return StageRun(run_dir, name, rec if rec is not None else record(), defaults)


def complete_stage(run_dir, rec=None, files=None, name="sft") -> tuple[StageRun, dict]:
    run = make_run(run_dir, rec, name)
    assert run.begin() == "fresh"
    for rel, text in (files or {"model/w.bin": "weights-A"}).items():
        p = run.work.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    marker = run.commit({"loss": 1.0})
    return run, marker


def edit_marker(run: StageRun, fn) -> None:
    m = json.loads(run.final.marker_path.read_text())
    fn(m)
    run.final.marker_path.write_text(json.dumps(m))


def test_stagerun_lifecycle(tmp_path):
    run = make_run(tmp_path)
    assert run.final.path == tmp_path / "sft" and run.work.path == tmp_path / "sft.partial"
    assert run.state() == ("missing", [])
    assert run.begin() == "fresh"
    assert names(run.work.path) == ["STARTED.json"]
    started = read_marker(run.work.started_path)
    assert started["stage"] == "sft" and started["config"] == DEFAULTS and started["inputs"] == INPUTS
    assert not run.final.path.exists()
    assert run.state() == ("partial", [])

    with atomic_dir(run.work.model_dir) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "w.bin").write_text("weights")
    with atomic_dir(run.work.checkpoint_dir) as tmp:
        (tmp / "state.pt").write_text("step 5")
    with run.work.logger() as log:
        log.log("step", step=5)
    (run.work.path / ".metrics.json.x.tmp").write_text("leftover")

    marker = run.commit({"loss": 0.25, "curve": [1, 2], "step": 10, "name": "x"})
    assert run.state() == ("complete", [])
    assert make_run(tmp_path).state() == ("complete", [])  # a new process sees the same

    final = run.final.path
    assert names(tmp_path) == ["sft"]  # no sft.partial, no .sft.old
    assert names(final) == ["COMPLETE.json", "log.jsonl", "metrics.json", "model"]
    assert names(final / "model") == ["config.json", "w.bin"]
    assert (final / "model" / "w.bin").read_text() == "weights"
    assert run.final.read_metrics() == {"loss": 0.25, "curve": [1, 2], "step": 10, "name": "x"}
    assert [json.loads(x)["event"] for x in run.final.log_path.read_text().splitlines()] == ["step"]

    on_disk = read_marker(run.final.marker_path)
    assert on_disk == marker == run.final.marker()
    assert marker["format"] == MARKER_FORMAT == 2
    assert marker["stage"] == "sft"
    assert marker["config"] == DEFAULTS and marker["inputs"] == INPUTS
    assert isinstance(marker["output_id"], str) and len(marker["output_id"]) == 16
    int(marker["output_id"], 16)
    assert marker["metrics"] == {"loss": 0.25, "step": 10, "name": "x"}  # scalars only
    assert "finished_at" in marker and "config_hash" in marker


def test_commit_gives_a_new_output_id_each_time(tmp_path):
    _, m1 = complete_stage(tmp_path)
    run = make_run(tmp_path)
    run.begin(force=True)
    m2 = run.commit({"loss": 1.0})
    assert m1["output_id"] != m2["output_id"]
    assert read_marker(run.final.marker_path)["output_id"] == m2["output_id"]


def test_commit_with_unserializable_metrics_changes_nothing(tmp_path):
    run = make_run(tmp_path)
    run.begin()
    with pytest.raises(TypeError):
        run.commit({"x": object()})
    assert not run.final.path.exists()
    assert run.state() == ("partial", [])


def test_resume_after_crash(tmp_path):
    run = make_run(tmp_path)
    assert run.begin() == "fresh"
    with atomic_dir(run.work.checkpoint_dir) as tmp:
        (tmp / "state.pt").write_text("step 5")
    with run.work.logger() as log:
        log.log("start")
    run.work.metrics_path.write_text("{}")  # stale metrics from a crashed commit
    (run.work.path / ".model.tmp-1-abcd").mkdir()  # a crashed atomic_dir
    # the process dies here (no commit); a new one comes along with the same record
    again = make_run(tmp_path)
    assert again.state() == ("partial", [])
    assert again.begin() == "resume"
    assert (again.work.checkpoint_dir / "state.pt").read_text() == "step 5"
    assert names(again.work.path) == ["STARTED.json", "checkpoint", "log.jsonl"]
    assert not again.final.path.exists()
    again.commit({"loss": 1.0})
    assert again.state() == ("complete", [])
    assert "checkpoint" not in names(again.final.path) and "STARTED.json" not in names(again.final.path)


def test_partial_work_from_another_record_is_discarded(tmp_path):
    run = make_run(tmp_path)
    run.begin()
    with atomic_dir(run.work.checkpoint_dir) as tmp:
        (tmp / "state.pt").write_text("step 5")
    other = make_run(tmp_path, record(lr=0.2))
    state, reasons = other.state()
    assert state == "partial-stale"
    assert reasons == ["sft.lr changed: 0.1 -> 0.2"]
    assert other.begin() == "fresh"
    assert names(other.work.path) == ["STARTED.json"]
    assert read_marker(other.work.started_path)["config"]["lr"] == 0.2
    assert other.state() == ("partial", [])
    # and the first record can no longer resume it
    assert make_run(tmp_path).state()[0] == "partial-stale"


def test_force_discards_matching_work(tmp_path):
    run = make_run(tmp_path)
    run.begin()
    (run.work.path / "half.bin").write_text("x")
    assert make_run(tmp_path).begin(force=True) == "fresh"
    assert names(run.work.path) == ["STARTED.json"]


def test_force_then_failure_keeps_old_output_whole(tmp_path):
    old_files = {"model/w.bin": "weights-A", "model/config.json": "{A}", "pareto.md": "old table"}
    _, old_marker = complete_stage(tmp_path, files=old_files)
    final = tmp_path / "sft"
    before = snapshot(final)
    assert set(before) == {"COMPLETE.json", "metrics.json", "model/w.bin", "model/config.json", "pareto.md"}

    run = make_run(tmp_path, record(lr=0.5))
    assert run.state() == ("stale", ["sft.lr changed: 0.1 -> 0.5"])
    with pytest.raises(RuntimeError, match="crash"):
        assert run.begin(force=True) == "fresh"
        with atomic_dir(run.work.model_dir) as tmp:
            (tmp / "w.bin").write_text("weights-B")
        (run.work.path / "summary.md").write_text("new")
        raise RuntimeError("crash")
    assert snapshot(final) == before  # byte for byte, every file
    assert read_marker(run.final.marker_path)["output_id"] == old_marker["output_id"]
    # the completed output is stale for the new record (the forced work is resumable, so the
    # stage as a whole reports it as partial)
    assert run.changes(run.final.marker()) == ["sft.lr changed: 0.1 -> 0.5"]
    assert run.state() == ("partial", [])
    # for the old record the old output is still complete
    assert make_run(tmp_path).state()[0] == "complete"

    assert run.begin() == "resume"
    run.commit({"loss": 0.5})
    after = snapshot(final)
    assert set(after) == {"COMPLETE.json", "metrics.json", "model/w.bin", "summary.md"}  # no pareto.md
    assert after["model/w.bin"] == b"weights-B"
    assert run.state() == ("complete", [])
    assert names(tmp_path) == ["sft"]


def test_force_then_failure_before_any_write_keeps_old_stale_state(tmp_path):
    complete_stage(tmp_path)
    run = make_run(tmp_path, record(steps=20))
    run.begin(force=True)
    shutil.rmtree(run.work.path)  # the work folder is gone (user cleaned it): the old output speaks
    assert run.state() == ("stale", ["sft.steps changed: 10 -> 20"])


# ------------------------------------------------------------- stale detection


@pytest.mark.parametrize(
    "rec, reason",
    [
        (record(lr=0.2), "sft.lr changed: 0.1 -> 0.2"),
        (record(warmup=5), "sft.warmup changed: 0 -> 5"),
        (record(inputs={**INPUTS, "model": {"stage": "pretrain", "id": "m2"}}),
         "input 'model' (stage pretrain) was redone after this stage ran"),
        (record(inputs={**INPUTS, "data": {"path": "/data/train.jsonl", "id": "d2"}}),
         "input 'data' (/data/train.jsonl) changed since this stage ran"),
        (record(inputs={**INPUTS, "model": {"stage": "puzzle", "id": "m1"}}),
         "input 'model' now comes from stage puzzle (was stage pretrain)"),
        (record(inputs={**INPUTS, "extra": {"path": "/x", "id": "e"}}), "input 'extra' is new"),
        (record(inputs={"model": INPUTS["model"]}), "input 'data' is no longer read"),
        (record(config={**DEFAULTS, "brand_new": 1}), "sft.brand_new is new: 1"),
    ],
)
def test_stale_reasons(tmp_path, rec, reason):
    complete_stage(tmp_path)
    state, reasons = make_run(tmp_path, rec).state()
    assert state == "stale"
    assert reasons == [reason]


def test_stale_lists_every_change(tmp_path):
    complete_stage(tmp_path)
    rec = record(lr=0.3, steps=11, inputs={"model": {"stage": "pretrain", "id": "m9"}})
    state, reasons = make_run(tmp_path, rec).state()
    assert state == "stale"
    assert reasons == ["sft.lr changed: 0.1 -> 0.3", "sft.steps changed: 10 -> 11",
                       "input 'data' is no longer read",
                       "input 'model' (stage pretrain) was redone after this stage ran"]


def test_stale_nested_inputs(tmp_path):
    models = {"models": {"a": {"stage": "sft", "id": "1"}, "b": {"stage": "grpo", "id": "2"}}}
    complete_stage(tmp_path, record(inputs=models), name="eval")
    changed = {"models": {"a": {"stage": "sft", "id": "1"}, "b": {"stage": "grpo", "id": "3"},
                          "c": {"path": "/m", "id": "4"}}}
    run = make_run(tmp_path, record(inputs=changed), name="eval")
    assert run.state() == ("stale", ["input 'models.b' (stage grpo) was redone after this stage ran; "
                                     "input 'models.c' is new"])


def test_record_normalised_tuples_and_paths(tmp_path):
    complete_stage(tmp_path, record(config={"dims": [1, 2], "out": "a/b"}))
    run = make_run(tmp_path, record(config={"dims": (1, 2), "out": Path("a/b")}))
    assert run.state() == ("complete", [])


def test_upgrade_rule_missing_key_at_default(tmp_path):
    run, _ = complete_stage(tmp_path)
    edit_marker(run, lambda m: m["config"].pop("warmup"))  # written before 'warmup' existed
    assert make_run(tmp_path).state() == ("complete", [])
    state, reasons = make_run(tmp_path, record(warmup=5)).state()
    assert state == "stale"
    assert reasons == ["sft.warmup changed: 0 (as before the field existed) -> 5"]


def test_upgrade_rule_removed_key_ignored(tmp_path):
    run, _ = complete_stage(tmp_path)
    edit_marker(run, lambda m: m["config"].update(old_knob=3))  # a field thinkfast no longer has
    assert make_run(tmp_path).state() == ("complete", [])


def test_describe_changes_direct():
    stored = {"config": {"lr": 0.1}, "inputs": {}}
    assert describe_changes(stored, {"lr": 0.1, "new": 3}, {}, {"new": 3}, "x") == []
    assert describe_changes(stored, {"lr": 0.1}, {}, {}, "x") == []
    assert describe_changes({}, {}, {}, {}, "x") == []
    assert describe_changes(stored, {"lr": 0.1, "new": 4}, {}, {"new": 3}, "x") == [
        "x.new changed: 3 (as before the field existed) -> 4"]
    assert describe_changes({"config": None, "inputs": None}, {"a": 1}, {"r": {"path": "p", "id": "1"}}, {},
                            "x") == ["x.a is new: 1", "input 'r' is new"]


def test_legacy_marker_is_stale_with_reason(tmp_path):
    run, _ = complete_stage(tmp_path)
    edit_marker(run, lambda m: m.pop("format"))
    state, reasons = make_run(tmp_path).state()
    assert state == "stale"
    assert len(reasons) == 1 and "older thinkfast" in reasons[0]
    # an old-style marker as the previous StageDir wrote it
    run.final.marker_path.write_text(json.dumps({"stage": "sft", "config_hash": "abc", "metrics": {}}))
    assert make_run(tmp_path).state() == ("stale", reasons)


@pytest.mark.parametrize("content", ["[]", "{not json", '{"no_stage": 1}', "", '{"stage": 3}'])
def test_damaged_marker_is_an_error_naming_the_file(tmp_path, content):
    run, _ = complete_stage(tmp_path)
    run.final.marker_path.write_text(content)
    with pytest.raises(RunDirError) as e:
        make_run(tmp_path).state()
    assert str(run.final.marker_path) in str(e.value)
    assert "--force" in str(e.value)


def test_damaged_started_marker_is_an_error_naming_the_file(tmp_path):
    run = make_run(tmp_path)
    run.begin()
    run.work.started_path.write_text("[]")
    with pytest.raises(RunDirError, match="STARTED.json"):
        run.state()
    with pytest.raises(RunDirError, match="STARTED.json"):
        run.begin()


def test_read_marker(tmp_path):
    p = tmp_path / "COMPLETE.json"
    p.write_text('{"stage": "x", "a": 1}')
    assert read_marker(p) == {"stage": "x", "a": 1}
    p.write_text("nope")
    with pytest.raises(RunDirError, match="COMPLETE.json"):
        read_marker(p)
    assert issubclass(RunDirError, ConfigError)  # the CLI reports it as a config mistake, no traceback


# -------------------------------------------------------- crash inside the swap


def test_crash_between_swap_renames_finishes_the_swap(tmp_path, monkeypatch):
    complete_stage(tmp_path, files={"model/w.bin": "A", "pareto.md": "old"})
    run = make_run(tmp_path, record(lr=0.2))
    run.begin(force=True)
    (run.work.path / "new.bin").write_text("B")
    real_replace = os.replace

    def crash_on_second_rename(src, dst):
        if Path(src) == run.work.path:
            raise KeyboardInterrupt  # the process dies after final was moved aside
        return real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        run.commit({"loss": 0.5})
    monkeypatch.setattr(rundir.os, "replace", real_replace)
    assert sorted(names(tmp_path)) == [".sft.old", "sft.partial"]
    assert (run.work.marker_path).is_file()

    again = make_run(tmp_path, record(lr=0.2))
    assert again.state() == ("complete", [])
    assert names(tmp_path) == ["sft"]
    assert set(snapshot(again.final.path)) == {"COMPLETE.json", "metrics.json", "new.bin"}


def test_crash_between_swap_renames_simulated_on_disk(tmp_path):
    complete_stage(tmp_path, files={"old.bin": "A"})
    run = make_run(tmp_path, record(lr=0.2))
    run.begin(force=True)
    (run.work.path / "new.bin").write_text("B")
    # commit's steps by hand, up to the first rename of the swap
    marker = {"stage": "sft", "format": MARKER_FORMAT, **run.record, "output_id": "f" * 16}
    run.work.started_path.unlink()
    atomic_write_json(run.work.marker_path, marker)
    os.replace(run.final.path, tmp_path / ".sft.old")
    assert run.state() == ("complete", [])
    assert names(tmp_path) == ["sft"]
    assert names(run.final.path) == ["COMPLETE.json", "new.bin"]
    assert run.final.marker()["output_id"] == "f" * 16


def test_crash_with_final_aside_and_no_completed_work_restores_old(tmp_path):
    complete_stage(tmp_path, files={"old.bin": "A"})
    before = snapshot(tmp_path / "sft")
    run = make_run(tmp_path, record(lr=0.2))
    run.begin(force=True)
    (run.work.path / "new.bin").write_text("B")  # work not completed: no COMPLETE.json
    os.replace(run.final.path, tmp_path / ".sft.old")
    assert run.state() == ("partial", [])
    assert snapshot(tmp_path / "sft") == before
    assert sorted(names(tmp_path)) == ["sft", "sft.partial"]
    # and without any work folder at all
    shutil.rmtree(run.work.path)
    os.replace(run.final.path, tmp_path / ".sft.old")
    assert make_run(tmp_path).state() == ("complete", [])
    assert snapshot(tmp_path / "sft") == before
    assert names(tmp_path) == ["sft"]


def test_leftover_aside_after_complete_swap_is_removed(tmp_path):
    complete_stage(tmp_path)
    aside = tmp_path / ".sft.old"
    aside.mkdir()
    (aside / "old.bin").write_text("A")  # crash while deleting the old output
    assert make_run(tmp_path).state() == ("complete", [])
    assert names(tmp_path) == ["sft"]


# ------------------------------------------------------------------ _check_ours


def test_begin_refuses_a_file_in_place_of_the_stage(tmp_path):
    (tmp_path / "sft").write_text("mine")
    run = make_run(tmp_path)
    with pytest.raises(RunDirError, match="is a file"):
        run.begin()
    assert (tmp_path / "sft").read_text() == "mine"
    assert names(tmp_path) == ["sft"]


def test_begin_refuses_a_foreign_folder_and_leaves_it_untouched(tmp_path):
    own = tmp_path / "eval" / "model"
    own.mkdir(parents=True)
    (own / "w.bin").write_text("user's weights")
    before = snapshot(tmp_path)
    run = make_run(tmp_path, name="eval")
    assert run.state() == ("missing", [])
    with pytest.raises(RunDirError) as e:
        run.begin()
    assert str(tmp_path / "eval") in str(e.value) and "not written by thinkfast" in str(e.value)
    with pytest.raises(RunDirError):
        run.begin(force=True)
    assert snapshot(tmp_path) == before
    assert names(tmp_path) == ["eval"]


def test_begin_refuses_a_foreign_partial_folder(tmp_path):
    work = tmp_path / "sft.partial"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="sft.partial"):
        make_run(tmp_path).begin(force=True)
    assert (work / "notes.txt").read_text() == "mine"


def test_begin_accepts_an_empty_stage_folder(tmp_path):
    (tmp_path / "sft").mkdir()
    run = make_run(tmp_path)
    assert run.begin() == "fresh"
    run.commit({})
    assert run.state() == ("complete", [])



# ------------------------------------------------------------ crashes inside commit


def test_failure_writing_the_marker_leaves_a_usable_stage(tmp_path, monkeypatch):
    complete_stage(tmp_path, files={"old.bin": "A"})
    before = snapshot(tmp_path / "sft")
    run = make_run(tmp_path, record(lr=0.2))
    run.begin(force=True)
    with atomic_dir(run.work.checkpoint_dir) as tmp:
        (tmp / "state.pt").write_text("step 5")
    (run.work.path / "new.bin").write_text("B")
    real = rundir.atomic_write_json

    def disk_full_on_marker(path, obj, indent=2):
        if Path(path).name == "COMPLETE.json":
            raise OSError(28, "No space left on device")
        return real(path, obj, indent)

    monkeypatch.setattr(rundir, "atomic_write_json", disk_full_on_marker)
    with pytest.raises(OSError, match="No space"):
        run.commit({"loss": 0.5})
    monkeypatch.setattr(rundir, "atomic_write_json", real)
    assert snapshot(tmp_path / "sft") == before
    # the next attempt resumes the work (or at least may redo it): it is not refused as foreign
    again = make_run(tmp_path, record(lr=0.2))
    assert again.state() == ("partial", [])
    assert again.begin() == "resume"
    assert (again.work.checkpoint_dir / "state.pt").read_text() == "step 5"
    again.commit({"loss": 0.5})
    assert set(snapshot(again.final.path)) == {"COMPLETE.json", "metrics.json", "new.bin"}


def test_crash_after_the_marker_before_the_swap_finishes_the_commit(tmp_path, monkeypatch):
    complete_stage(tmp_path, files={"old.bin": "A"})
    run = make_run(tmp_path, record(lr=0.2))
    run.begin(force=True)
    with atomic_dir(run.work.checkpoint_dir) as tmp:
        (tmp / "state.pt").write_text("step 5")
    (run.work.path / "new.bin").write_text("B")

    def die(*a, **k):
        raise KeyboardInterrupt  # the process dies right after the marker is written

    monkeypatch.setattr(StageRun, "_swap", die)
    with pytest.raises(KeyboardInterrupt):
        marker = run.commit({"loss": 0.5})
    monkeypatch.undo()
    marker = read_marker(run.work.marker_path)
    for rec in (record(lr=0.2), record()):  # whoever looks next finishes the commit
        again = make_run(tmp_path, rec)
        assert again.state()[0] == ("complete" if rec == record(lr=0.2) else "stale")
        assert names(tmp_path) == ["sft"]
        assert set(snapshot(again.final.path)) == {"COMPLETE.json", "metrics.json", "new.bin"}
        assert again.final.marker()["output_id"] == marker["output_id"]


def test_begin_finishes_an_interrupted_swap_first(tmp_path, monkeypatch):
    complete_stage(tmp_path, files={"old.bin": "A"})
    run = make_run(tmp_path, record(lr=0.2))
    run.begin(force=True)
    (run.work.path / "new.bin").write_text("B")
    real_replace = os.replace

    def crash_on_second_rename(src, dst):
        if Path(src) == run.work.path:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        run.commit({"loss": 0.5})
    monkeypatch.undo()
    # a caller that goes straight to begin() (no state()) must not throw the committed output away
    again = make_run(tmp_path, record(lr=0.3))
    assert again.begin() == "fresh"
    assert set(snapshot(again.final.path)) == {"COMPLETE.json", "metrics.json", "new.bin"}
    assert not (tmp_path / ".sft.old").exists()


def test_recovery_never_replaces_a_foreign_folder(tmp_path):
    run = make_run(tmp_path)
    run.begin()
    atomic_write_json(run.work.marker_path, {"stage": "sft", "format": MARKER_FORMAT, **run.record})
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "mine.txt").write_text("user's")  # put there by hand after the crash
    with pytest.raises(RunDirError, match="not written by thinkfast"):
        run.state()
    assert (tmp_path / "sft" / "mine.txt").read_text() == "user's"
    assert run.work.marker_path.is_file()
