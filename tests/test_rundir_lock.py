"""The run directory itself (thinkfast.rundir.RunDir): ownership checks, the lock, content fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from thinkfast import rundir
from thinkfast.rundir import RunDir, RunDirError

from helpers import names, snapshot


# -------------------------------------------------------------------- RunDir


def test_rundir_refuses_empty_path():
    for bad in ("", "   "):
        with pytest.raises(RunDirError, match="empty"):
            RunDir(bad)


def test_rundir_refuses_a_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(RunDirError) as e:
        RunDir(f).prepare()
    assert str(f) in str(e.value) and "is a file" in str(e.value)
    assert f.read_text() == "x"


def test_rundir_refuses_a_foreign_folder(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_text("meow")
    (d / "sub").mkdir()
    (d / "sub" / "COMPLETE.json").write_text("[]")  # not one of ours
    before = snapshot(d)
    with pytest.raises(RunDirError, match="thinkfast-run.json"):
        RunDir(d).prepare()
    with pytest.raises(RunDirError):
        with RunDir(d):
            pass
    assert snapshot(d) == before
    assert sorted(names(d)) == ["cat.jpg", "sub"]


def test_rundir_creates_new_and_accepts_empty(tmp_path):
    new = tmp_path / "a" / "b"
    RunDir(new).prepare()
    assert names(new) == ["thinkfast-run.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    RunDir(empty).prepare()
    info = json.loads((empty / "thinkfast-run.json").read_text())
    assert info["format"] == 1 and "created_at" in info
    # a run dir that is ours is accepted whatever else it holds, and its marker kept
    (empty / "sft").mkdir()
    (empty / "notes.txt").write_text("x")
    RunDir(empty).prepare()
    assert json.loads((empty / "thinkfast-run.json").read_text()) == info


def test_rundir_accepts_legacy_run_dir(tmp_path):
    d = tmp_path / "old_run"
    (d / "pretrain").mkdir(parents=True)
    (d / "pretrain" / "COMPLETE.json").write_text(json.dumps({"stage": "pretrain", "config_hash": "abc"}))
    (d / "pretrain" / "metrics.json").write_text("{}")
    RunDir(d).prepare()
    assert (d / "thinkfast-run.json").is_file()


def test_rundir_accepts_run_dir_with_stage_work_in_progress(tmp_path):
    # a legacy run that only ever started a stage (STARTED.json, as the old StageDir wrote it)
    d = tmp_path / "r"
    (d / "pretrain").mkdir(parents=True)
    (d / "pretrain" / "STARTED.json").write_text(json.dumps({"config_hash": "abc"}))
    RunDir(d).prepare()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_rundir_read_only_folder(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(RunDirError, match="cannot write"):
            RunDir(d).prepare()
    finally:
        d.chmod(0o755)


def test_rundir_unwritable_reported(tmp_path, monkeypatch):
    # the same path as test_rundir_read_only_folder, for when tests run as root
    def denied(path, obj, indent=2):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rundir, "atomic_write_json", denied)
    with pytest.raises(RunDirError, match=r"cannot write there \(Permission denied\)"):
        RunDir(tmp_path / "x").prepare()


# ---------------------------------------------------------------------- lock


def test_lock_in_process_names_holder(tmp_path):
    first = RunDir(tmp_path / "run", command="thinkfast run")
    first.prepare()
    first.lock()
    holder = json.loads((tmp_path / "run" / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "thinkfast run"
    second = RunDir(tmp_path / "run")
    with pytest.raises(RunDirError) as e:
        second.lock()
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and "thinkfast run" in msg and "in use" in msg
    first.unlock()
    first.unlock()  # idempotent
    second.lock()
    second.unlock()


def test_lock_context_manager(tmp_path):
    with RunDir(tmp_path / "run") as rd:
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            RunDir(tmp_path / "run").lock()
        assert rd.path == tmp_path / "run"
    with RunDir(tmp_path / "run"):
        pass


def test_lock_with_unreadable_holder_info(tmp_path):
    import fcntl

    d = tmp_path / "run"
    RunDir(d).prepare()
    with open(d / ".lock", "w") as f:
        f.write("garbage")
        f.flush()
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RunDirError, match="in use by another process"):
            RunDir(d).lock()


# Imports thinkfast.rundir without the package __init__ (which loads torch: seconds).
_HOLDER = """
import sys, time, types
pkg = types.ModuleType("thinkfast"); pkg.__path__ = [sys.argv[1]]; sys.modules["thinkfast"] = pkg
from thinkfast.rundir import RunDir
rd = RunDir(sys.argv[2], command="holder")
rd.prepare()
rd.lock()
print("ready", flush=True)
time.sleep(60)
"""


def test_lock_held_by_other_process_then_stale_after_kill(tmp_path):
    d = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(Path(rundir.__file__).parent), str(d)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line == "ready\n", proc.stderr.read() if proc.poll() is not None else line
        with pytest.raises(RunDirError) as e:
            with RunDir(d):
                pass
        assert f"pid {proc.pid}" in str(e.value) and "holder" in str(e.value)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # the dead holder's info is still in the file, but its flock is gone
        assert json.loads((d / ".lock").read_text())["pid"] == proc.pid
        with RunDir(d, command="me"):
            info = json.loads((d / ".lock").read_text())
            assert info["pid"] == os.getpid() and info["command"] == "me"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# --------------------------------------------------------------- fingerprint


@pytest.fixture(autouse=True)
def _cache_fresh_files(monkeypatch):
    """The tests below write files and hash them at once; let the cache take them anyway."""
    monkeypatch.setattr(RunDir, "settle_ns", 0)


def test_a_file_changed_just_now_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(RunDir, "settle_ns", 2_000_000_000)
    rd = RunDir(tmp_path / "run")
    rd.prepare()
    (tmp_path / "a.txt").write_text("racy")
    rd.fingerprint(tmp_path / "a.txt")
    assert json.loads((tmp_path / "run" / ".fingerprints.json").read_text()) == {}


def test_fingerprint_sees_an_edit_whose_mtime_was_restored(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare()
    f = tmp_path / "costs.json"
    f.write_text('{"t": 1.5}')
    before = rd.fingerprint(f)
    st = f.stat()
    time.sleep(0.01)
    f.write_text('{"t": 9.5}')  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # as touch -r / cp -p / rsync -t would
    assert rd.fingerprint(f) != before


def test_fingerprint_file(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same")
    b.write_text("same")
    fa = rd.fingerprint(a)
    assert len(fa) == 16 and fa == rd.fingerprint(a) == rd.fingerprint(b)
    assert rd.fingerprint(str(a)) == fa
    a.write_text("diff")  # same size
    fa2 = rd.fingerprint(a)
    assert fa2 != fa
    assert RunDir(tmp_path / "run").fingerprint(a) == fa2  # through the cache, in a new RunDir
    cache = json.loads((tmp_path / "run" / ".fingerprints.json").read_text())
    assert set(cache) == {str(a.resolve()), str(b.resolve())}
    assert all(set(v) == {"stamp", "sha256"} for v in cache.values())
    with pytest.raises(FileNotFoundError):
        rd.fingerprint(tmp_path / "nope")


def test_fingerprint_folder(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare()
    m = tmp_path / "model"
    (m / "sub").mkdir(parents=True)
    (m / "config.json").write_text("{}")
    (m / "sub" / "w.bin").write_bytes(b"\0" * 100)
    f0 = rd.fingerprint(m)
    assert rd.fingerprint(m) == f0
    (m / "sub" / "w.bin").write_bytes(b"\1" * 100)
    f1 = rd.fingerprint(m)
    assert f1 != f0
    (m / "extra.txt").write_text("")
    f2 = rd.fingerprint(m)
    assert f2 not in (f0, f1)
    (m / "extra.txt").rename(m / "extra2.txt")  # same content, other name
    f3 = rd.fingerprint(m)
    assert f3 not in (f0, f1, f2)
    (m / "extra2.txt").unlink()
    assert rd.fingerprint(m) == f1
    # a copy elsewhere has the same fingerprint
    shutil.copytree(m, tmp_path / "copy")
    assert rd.fingerprint(tmp_path / "copy") == f1


def test_fingerprint_survives_damaged_cache(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.prepare()
    f = tmp_path / "x"
    f.write_text("x")
    want = rd.fingerprint(f)
    for bad in ("[]", "{broken", ""):
        (tmp_path / "run" / ".fingerprints.json").write_text(bad)
        assert rd.fingerprint(f) == want
        assert isinstance(json.loads((tmp_path / "run" / ".fingerprints.json").read_text()), dict)


def test_fingerprint_uses_cache(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "run")
    rd.prepare()
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 1000)
    want = rd.fingerprint(f)
    calls = []
    real = rundir._sha256_file
    monkeypatch.setattr(rundir, "_sha256_file", lambda p: calls.append(p) or real(p))
    assert rd.fingerprint(f) == want
    assert calls == []  # unchanged file: not read again
