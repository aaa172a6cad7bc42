"""Atomic writes, atomic folders, JSON-lines logs and stage folder paths (thinkfast.rundir)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from thinkfast import rundir
from thinkfast.rundir import JsonlLogger, StageDir, atomic_dir, atomic_write_json, atomic_write_text

from helpers import names


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
    assert sd.started_path == sd.path / "STARTED.json"
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            StageDir(tmp_path, bad)
