"""Tests for thinkfast.rundir: atomic writes, JSONL logs and the stage protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from thinkfast import rundir
from thinkfast.config import ConfigError
from thinkfast.rundir import (
    JsonlLogger,
    StageConfigMismatch,
    StageDir,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    previous_model_dir,
)


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# -------------------------------------------------------------- atomic writes


def test_atomic_write_text_creates_parents_and_replaces(tmp_path):
    p = tmp_path / "a" / "b" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert names(p.parent) == ["f.txt"]


def test_atomic_write_json_roundtrip_and_conversions(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"loss": torch.tensor(1.5), "step": torch.tensor(3), "path": Path("x/y")})
    assert json.loads(p.read_text()) == {"loss": 1.5, "step": 3, "path": "x/y"}
    assert p.read_text().endswith("\n")


def test_atomic_write_json_failure_keeps_old_content(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert names(tmp_path) == ["m.json"]


def test_atomic_write_text_failure_during_write_cleans_temp(tmp_path, monkeypatch):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert names(tmp_path) == ["f.txt"]


# ----------------------------------------------------------------- atomic_dir


def test_atomic_dir_creates_dst(tmp_path):
    dst = tmp_path / "stage" / "model"
    with atomic_dir(dst) as tmp:
        assert tmp.parent == dst.parent and tmp.name.startswith(".model.tmp-")
        assert not dst.exists()
        (tmp / "w.bin").write_text("new")
    assert (dst / "w.bin").read_text() == "new"
    assert names(dst.parent) == ["model"]


def test_atomic_dir_replaces_existing(tmp_path):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "old.bin").write_text("old")
    with atomic_dir(dst) as tmp:
        (tmp / "new.bin").write_text("new")
    assert names(dst) == ["new.bin"]
    assert names(tmp_path) == ["model"]


def test_atomic_dir_exception_keeps_old_and_cleans_up(tmp_path):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "old.bin").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_dir(dst) as tmp:
            (tmp / "half.bin").write_text("half")
            raise RuntimeError("crash")
    assert names(dst) == ["old.bin"] and (dst / "old.bin").read_text() == "old"
    assert names(tmp_path) == ["model"]


def test_atomic_dir_exception_without_existing_dst(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "x").write_text("x")
            raise KeyboardInterrupt
    assert names(tmp_path) == []


def test_atomic_dir_failed_second_rename_restores_old(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst_):
        calls.append((src, dst_))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(src, dst_)

    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "old.bin").write_text("old")
    monkeypatch.setattr(rundir.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_dir(dst) as tmp:
            (tmp / "new.bin").write_text("new")
    monkeypatch.setattr(rundir.os, "replace", real_replace)
    assert names(dst) == ["old.bin"]
    assert names(tmp_path) == ["model"]


# ---------------------------------------------------------------- JsonlLogger


def test_jsonl_logger_lines_and_append(tmp_path):
    p = tmp_path / "s" / "log.jsonl"
    with JsonlLogger(p) as log:
        log.log("start", lr=1e-3)
        log.log("step", step=torch.tensor(2), loss=torch.tensor(0.5), path=Path("a"), obj=object())
        # flushed line by line: visible before close
        assert len(p.read_text().splitlines()) == 2
    with JsonlLogger(p) as log:
        log.log("resume")
    recs = [json.loads(line) for line in p.read_text().splitlines()]
    assert [r["event"] for r in recs] == ["start", "step", "resume"]
    assert list(recs[0]) == ["time", "event", "lr"]
    assert recs[0]["time"].endswith("+00:00")
    assert recs[1]["step"] == 2 and recs[1]["loss"] == 0.5 and recs[1]["path"] == "a"
    assert recs[1]["obj"].startswith("<object object")


def test_jsonl_logger_rejects_time_field(tmp_path):
    with JsonlLogger(tmp_path / "l.jsonl") as log:
        with pytest.raises(ValueError, match="'time'"):
            log.log("x", time=3)


# ------------------------------------------------------------------- StageDir


def test_stage_dir_paths(tmp_path):
    sd = StageDir(tmp_path, "pretrain")
    assert sd.path == tmp_path / "pretrain"
    assert sd.model_dir == sd.path / "model"
    assert sd.checkpoint_dir == sd.path / "checkpoint"
    assert sd.metrics_path == sd.path / "metrics.json"
    assert sd.log_path == sd.path / "log.jsonl"
    assert sd.marker_path == sd.path / "COMPLETE.json"
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            StageDir(tmp_path, bad)


def run_stage(sd: StageDir, h: str, metrics=None):
    with atomic_dir(sd.model_dir) as tmp:
        (tmp / "config.json").write_text(h)
    sd.finish(metrics or {"loss": 1.0}, h)


def test_fresh_finish_skip(tmp_path):
    sd = StageDir(tmp_path, "pretrain")
    assert not sd.is_complete() and sd.completed_config_hash() is None
    assert sd.begin("h1") == "fresh"
    assert sd.path.is_dir()
    run_stage(sd, "h1", {"loss": 0.25, "curve": [1, 2], "step": 10})
    assert sd.is_complete()
    assert sd.completed_config_hash() == "h1"
    assert sd.read_metrics() == {"loss": 0.25, "curve": [1, 2], "step": 10}
    marker = json.loads(sd.marker_path.read_text())
    assert marker["stage"] == "pretrain" and marker["config_hash"] == "h1"
    assert marker["metrics"] == {"loss": 0.25, "step": 10}
    assert "finished_at" in marker
    assert sd.begin("h1") == "skip"
    assert (sd.model_dir / "config.json").read_text() == "h1"


def test_mismatch_raises_and_force_redoes(tmp_path):
    sd = StageDir(tmp_path, "sft")
    sd.begin("h1")
    sd.checkpoint_dir.mkdir()
    run_stage(sd, "h1")
    with pytest.raises(StageConfigMismatch) as e:
        sd.begin("h2")
    msg = str(e.value)
    assert "'sft'" in msg and str(sd.marker_path) in msg and "rerun with --force to redo it" in msg
    assert isinstance(e.value, ConfigError)
    assert sd.is_complete()  # nothing touched

    assert sd.begin("h2", force=True) == "fresh"
    assert not sd.is_complete()
    assert not sd.metrics_path.exists()
    assert not sd.model_dir.exists() and not sd.checkpoint_dir.exists()
    run_stage(sd, "h2")
    assert sd.completed_config_hash() == "h2"


def test_force_same_hash_redoes(tmp_path):
    sd = StageDir(tmp_path, "eval")
    sd.begin("h")
    run_stage(sd, "h")
    with sd.logger() as log:
        log.log("done")
    assert sd.begin("h", force=True) == "fresh"
    assert not sd.is_complete() and not sd.model_dir.exists()
    assert sd.log_path.read_text().count("\n") == 1  # log history kept


def test_resume_from_checkpoint(tmp_path):
    sd = StageDir(tmp_path, "pretrain")
    assert sd.begin("h") == "fresh"
    with atomic_dir(sd.checkpoint_dir) as tmp:
        (tmp / "state.pt").write_text("step 5")
    # process dies here; a new run comes along
    assert sd.begin("h") == "resume"
    assert (sd.checkpoint_dir / "state.pt").read_text() == "step 5"
    # a different config may not resume someone else's checkpoint
    with pytest.raises(StageConfigMismatch, match=r"checkpoint from a different config.*--force"):
        sd.begin("other")
    assert sd.begin("other", force=True) == "fresh"
    assert not sd.checkpoint_dir.exists()


def test_interrupted_without_checkpoint_restarts_clean(tmp_path):
    sd = StageDir(tmp_path, "pretrain")
    sd.begin("h")
    sd.model_dir.mkdir()  # half-finished stage: model written, crashed before finish
    sd.metrics_path.write_text("{}")
    (sd.path / ".model.tmp-1-abcd").mkdir()
    (sd.path / ".metrics.json.xyz.tmp").write_text("partial")
    assert sd.begin("h") == "fresh"
    assert names(sd.path) == ["STARTED.json"]


def test_marker_written_after_metrics(tmp_path, monkeypatch):
    sd = StageDir(tmp_path, "pretrain")
    sd.begin("h")
    order = []
    real = rundir.atomic_write_json

    def spy(path, obj, indent=2):
        order.append(Path(path).name)
        if Path(path).name == "COMPLETE.json":
            raise OSError("crash while writing marker")
        return real(path, obj, indent)

    monkeypatch.setattr(rundir, "atomic_write_json", spy)
    with pytest.raises(OSError):
        sd.finish({"loss": 1.0}, "h")
    assert order == ["metrics.json", "COMPLETE.json"]
    assert sd.metrics_path.exists() and not sd.marker_path.exists()
    assert not sd.is_complete()
    monkeypatch.setattr(rundir, "atomic_write_json", real)
    assert sd.begin("h") == "fresh"  # stale metrics cleaned, stage reruns
    assert not sd.metrics_path.exists()


def test_finish_with_unserializable_metrics_leaves_no_marker(tmp_path):
    sd = StageDir(tmp_path, "pretrain")
    sd.begin("h")
    with pytest.raises(TypeError):
        sd.finish({"x": object()}, "h")
    assert not sd.is_complete() and not sd.metrics_path.exists()


def test_logger_appends_across_restarts(tmp_path):
    sd = StageDir(tmp_path, "pretrain")
    sd.begin("h")
    with sd.logger() as log:
        log.log("start")
    sd.begin("h")
    with sd.logger() as log:
        log.log("start")
    assert [json.loads(x)["event"] for x in sd.log_path.read_text().splitlines()] == ["start", "start"]


# --------------------------------------------------------- previous_model_dir


def test_previous_model_dir(tmp_path):
    stages = ["pretrain", "eval", "puzzle", "sft"]
    for name, has_model in [("pretrain", True), ("eval", False)]:
        sd = StageDir(tmp_path, name)
        sd.begin("h")
        if has_model:
            run_stage(sd, "h")
        else:
            sd.finish({"acc": 0.1}, "h")
    assert previous_model_dir(tmp_path, stages, "puzzle") == tmp_path / "pretrain" / "model"
    assert previous_model_dir(tmp_path, stages, "eval") == tmp_path / "pretrain" / "model"
    with pytest.raises(FileNotFoundError, match=r"stage 'puzzle' \(before 'sft'\) has not completed"):
        previous_model_dir(tmp_path, stages, "sft")
    with pytest.raises(FileNotFoundError, match=r"no stage before 'pretrain'"):
        previous_model_dir(tmp_path, stages, "pretrain")
    with pytest.raises(ValueError, match=r"'grpo' is not in the pipeline"):
        previous_model_dir(tmp_path, stages, "grpo")
    sd = StageDir(tmp_path, "puzzle")
    sd.begin("h")
    run_stage(sd, "h")
    assert previous_model_dir(tmp_path, stages, "sft") == tmp_path / "puzzle" / "model"
