"""The run directory: the only interface between pipeline stages.

Each stage writes into ``RUN_DIR/STAGE/``::

    model/           save_pretrained folder (written with atomic_dir)
    checkpoint/      resumable training state, if the stage has any
    metrics.json     final metrics
    log.jsonl        one JSON event per line, appended across restarts
    STARTED.json     config hash of the run that owns checkpoint/
    COMPLETE.json    completion marker, written last

Everything a later stage reads is written atomically (temp file/dir + rename),
so a crash never leaves a half-written file behind; the marker is written after
everything else, so a stage without it is simply incomplete.

Typical stage body::

    sd = StageDir(run_dir, "pretrain")
    if sd.begin(config_hash(cfg), force=force) == "skip":
        return
    with sd.logger() as log:
        ...train, log.log("step", step=s, loss=loss)...
        with atomic_dir(sd.model_dir) as tmp:
            model.save_pretrained(tmp)
    sd.finish({"loss": loss}, config_hash(cfg))
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .artifacts import COMPLETE, OUTPUTS, STARTED
from .atomic import _fsync_dir, _json_default, atomic_dir, atomic_write_json, atomic_write_text
from .config import ConfigError, _plain, config_hash

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_dir", "JsonlLogger", "RunDir", "RunDirError",
           "StageDir", "StageRun", "StageConfigMismatch", "describe_changes", "read_marker"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JsonlLogger:
    """Append-only JSON-lines event log; each line is flushed as it is written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8", buffering=1)

    def log(self, event: str, **fields: Any) -> None:
        """Append ``{"time": ..., "event": event, **fields}`` as one line."""
        if "time" in fields:
            raise ValueError("'time' is set by JsonlLogger.log; use another field name")
        record = {"time": _now(), "event": event, **fields}
        line = json.dumps(record, default=_log_default, ensure_ascii=False)
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "JsonlLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _log_default(obj: Any) -> Any:
    """Like _json_default, but a log line never fails: unknown objects become str()."""
    try:
        return _json_default(obj)
    except TypeError:
        return str(obj)


# ------------------------------------------------------------------ the stage protocol

MARKER_FORMAT = 2
RUN_MARKER = "thinkfast-run.json"
_MISSING = object()


class StageConfigMismatch(ConfigError):
    """A stage's existing output (or its interrupted work) was made from other config or inputs."""


class RunDirError(ConfigError):
    """The run directory cannot be used: not ours, not a folder, locked by another process."""


class StageDir:
    """One stage's folder: the completed output ``RUN_DIR/STAGE/`` or its work folder
    ``RUN_DIR/STAGE.partial/`` (same layout; see the module docstring)."""

    def __init__(self, run_dir: str | Path, name: str):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid stage name {name!r}")
        self.run_dir = Path(run_dir)
        self.name = name

    @property
    def path(self) -> Path:
        return self.run_dir / self.name

    @property
    def model_dir(self) -> Path:
        return self.path / OUTPUTS["model"]

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def marker_path(self) -> Path:
        return self.path / COMPLETE

    @property
    def started_path(self) -> Path:
        return self.path / STARTED

    def marker(self) -> dict | None:
        """The completion marker (checked), or None when the stage has not completed."""
        return read_marker(self.marker_path, self.name.removesuffix(".partial")) if self.marker_path.is_file() else None

    def read_metrics(self) -> dict:
        """The stage's metrics.json (FileNotFoundError if it has none)."""
        return _read_json(self.metrics_path)

    def logger(self) -> JsonlLogger:
        """A JsonlLogger appending to log.jsonl."""
        return JsonlLogger(self.log_path)

    def remove_temp_leftovers(self) -> None:
        """Delete temp files/dirs that a crashed atomic write left in the folder (names only we use)."""
        if not self.path.is_dir():
            return
        for p in self.path.glob(".*"):
            if ".tmp" in p.name or ".old-" in p.name:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def read_marker(path: Path, stage: str | None = None) -> dict:
    """A COMPLETE.json / STARTED.json, checked: an object naming its stage. Anything else is an error
    that says which file and what to do (thinkfast never guesses about a damaged marker)."""
    try:
        data = _read_json(path)
    except ValueError as e:
        data = e
    folder = stage or path.parent.name.removesuffix(".partial")
    ok = (isinstance(data, dict) and isinstance(data.get("stage"), str) and data["stage"] == (stage or data["stage"])
          and all(isinstance(data.get(k, {}), dict) for k in ("config", "inputs", "metrics"))
          and isinstance(data.get("output_id", ""), str))
    if not ok:
        raise RunDirError(
            f"{path}: not a thinkfast marker of stage '{folder}' (damaged, or written by something else): "
            f"rerun the stage with --force to redo it, or move the folder {path.parent} away")
    return data


def _normal(obj: Any) -> Any:
    """What a value looks like after a JSON round trip (tuples -> lists, Paths -> str)."""
    return json.loads(json.dumps(obj, default=_json_default))


def describe_changes(stored: dict, config: dict, inputs: dict, defaults: dict, prefix: str) -> list[str]:
    """Why ``stored`` (a marker's ``config`` / ``inputs``) does not describe the current stage; [] if it does.

    The upgrade rule: a config key the marker lacks (a field added to thinkfast after the stage ran)
    counts as unchanged while it holds its default; a key the marker has but the code no longer knows
    is ignored (nothing can act on it any more).

    >>> describe_changes({"config": {"lr": 0.1}, "inputs": {}}, {"lr": 0.1, "new": 3}, {}, {"new": 3}, "x")
    []
    >>> describe_changes({"config": {"lr": 0.1}, "inputs": {}}, {"lr": 0.2, "new": 4}, {}, {"new": 3}, "x")
    ['x.lr changed: 0.1 -> 0.2', 'x.new changed: 3 (as before the field existed) -> 4']
    >>> describe_changes({"config": {"kinds": ["add"]}, "inputs": {}}, {"data.kinds": ["mul"]}, {}, {}, "x")
    ["data.kinds changed: ['add'] -> ['mul']"]
    """
    out = []
    old_cfg, new_cfg = _normal(stored.get("config") or {}), _normal(config)
    for key in sorted(new_cfg):
        # a dotted key belongs to another section (data.kinds); a marker from before it moved there may
        # hold it under its bare name (pretrain.kinds)
        name = key if "." in key else f"{prefix}.{key}"
        old = old_cfg.get(key, old_cfg.get(key.rpartition(".")[2], _MISSING) if "." in key else _MISSING)
        if old is _MISSING:
            default = _normal(defaults.get(key, _MISSING)) if key in defaults else _MISSING
            if default is not _MISSING and new_cfg[key] == default:
                continue
            out.append(f"{name} changed: {default!r} (as before the field existed) -> "
                       f"{new_cfg[key]!r}" if default is not _MISSING else f"{name} is new: {new_cfg[key]!r}")
        elif old != new_cfg[key]:
            out.append(f"{name} changed: {old!r} -> {new_cfg[key]!r}")
    old_in, new_in = _normal(stored.get("inputs") or {}), _normal(inputs)
    for role in sorted(set(old_in) | set(new_in)):
        a, b = old_in.get(role), new_in.get(role)
        if a == b:
            continue
        out.append(_describe_input_change(role, a, b))
    return out


def _describe_input_change(role: str, old: Any, new: Any) -> str:
    if old is None:
        return f"input '{role}' is new"
    if new is None:
        return f"input '{role}' is no longer read"
    if _is_ref(old) and _is_ref(new):
        if old.get("stage") and old.get("stage") == new.get("stage"):
            return f"input '{role}' (stage {new['stage']}) was redone after this stage ran"
        if old.get("path") and old.get("path") == new.get("path"):
            return f"input '{role}' ({new['path']}) changed since this stage ran"
        return f"input '{role}' now comes from {_ref_name(new)} (was {_ref_name(old)})"
    if isinstance(old, dict) and isinstance(new, dict):  # several inputs under one role (eval's models)
        parts = [_describe_input_change(f"{role}.{k}", old.get(k), new.get(k))
                 for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        return "; ".join(parts)
    return f"input '{role}' changed"


def _is_ref(x: Any) -> bool:
    return isinstance(x, dict) and ("stage" in x or "path" in x) and "id" in x


def _ref_name(ref: dict) -> str:
    return f"stage {ref['stage']}" if ref.get("stage") else str(ref.get("path"))


class StageRun:
    """Running one stage without ever losing its completed output.

    The stage works in ``RUN_DIR/STAGE.partial/`` (checkpoints, logs, outputs); only when it completes
    is that folder swapped in for ``RUN_DIR/STAGE/``. Until then an older completed output stays whole,
    and there is never a mix of old and new files. ``record`` is ``{"config": ..., "inputs": ...}``:
    what the stage's output depends on, compared field by field (:func:`describe_changes`).
    """

    def __init__(self, run_dir: str | Path, name: str, record: dict, defaults: dict):
        self.final = StageDir(run_dir, name)
        self.work = StageDir(run_dir, f"{name}.partial")
        self.name = name
        self.record = _normal(record)
        self.defaults = defaults

    def changes(self, stored: dict) -> list[str]:
        return describe_changes(stored, self.record["config"], self.record["inputs"], self.defaults, self.name)

    def state(self) -> tuple[str, list[str]]:
        """``("complete", [])``, ``("stale", reasons)``, ``("partial", [])`` (resumable work that matches),
        ``("partial-stale", reasons)`` or ``("missing", [])``."""
        self._recover_swap()
        marker, work = self.final.marker(), self.work.started_path
        stale = None
        if marker is not None:
            stale = (["it was completed by an older thinkfast that did not record its inputs"]
                     if marker.get("format") != MARKER_FORMAT else self.changes(marker))
            if not stale:
                return "complete", []  # a forced redo that was cut off does not hide a current output
        if work.is_file():
            reasons = self.changes(read_marker(work))
            if not reasons:
                return "partial", []
            if stale is None:
                return "partial-stale", reasons
        return ("stale", stale) if stale is not None else ("missing", [])

    def begin(self, force: bool = False) -> str:
        """Prepare the work folder: ``"resume"`` (matching interrupted work) or ``"fresh"``. With ``force``
        any earlier work is discarded; the completed output is untouched until :meth:`commit`."""
        self._recover_swap()
        self._check_ours(self.final.path)
        self._check_ours(self.work.path)
        started = self.work.started_path
        if not force and started.is_file() and not self.changes(read_marker(started)):
            self.work.remove_temp_leftovers()
            self.work.metrics_path.unlink(missing_ok=True)
            return "resume"
        if self.work.path.exists():
            shutil.rmtree(self.work.path)
        self.work.path.mkdir(parents=True)
        atomic_write_json(started, {"stage": self.name, **self.record, "started_at": _now()})
        return "fresh"

    def commit(self, metrics: dict) -> dict:
        """Write metrics and the marker into the work folder, then swap it in for the completed output."""
        w = self.work
        atomic_write_json(w.metrics_path, metrics)
        summary = {k: v for k, v in _plain(metrics).items() if isinstance(v, (int, float, str, bool)) or v is None}
        marker = {"stage": self.name, "format": MARKER_FORMAT, **self.record,
                  "config_hash": config_hash(self.record), "output_id": secrets.token_hex(8),
                  "finished_at": _now(), "metrics": summary}
        # The marker is the commit point: work holding it is a finished output, and _recover_swap finishes
        # a commit cut short after it. Cleanup comes after, so a failure before it leaves resumable work.
        atomic_write_json(w.marker_path, marker)
        self._swap()
        return marker

    # -- internals

    def _aside(self) -> Path:
        return self.final.run_dir / f".{self.name}.old"

    def _swap(self) -> None:
        w = self.work
        shutil.rmtree(w.checkpoint_dir, ignore_errors=True)  # the finished output supersedes it
        w.started_path.unlink(missing_ok=True)
        w.remove_temp_leftovers()
        final, aside = self.final.path, self._aside()
        if aside.exists():
            shutil.rmtree(aside)
        if final.exists():
            os.replace(final, aside)
        os.replace(self.work.path, final)
        _fsync_dir(final.parent)
        if aside.exists():
            shutil.rmtree(aside)

    def _recover_swap(self) -> None:
        """Finish a commit that a crash cut short after its marker was written (before or inside the swap)."""
        final, aside = self.final.path, self._aside()
        if self.work.marker_path.is_file():
            self._check_ours(final)
            self._swap()
        if final.exists() and aside.exists():
            shutil.rmtree(aside)
        elif aside.exists() and not final.exists():
            os.replace(aside, final)

    def _check_ours(self, path: Path) -> None:
        """Refuse to replace a folder thinkfast did not write."""
        if not path.exists():
            return
        if not path.is_dir():
            raise RunDirError(f"{path} is a file, not a stage folder thinkfast wrote; move it away")
        if (path / COMPLETE).is_file() or (path / STARTED).is_file() or not any(path.iterdir()):
            return
        raise RunDirError(f"{path} exists and was not written by thinkfast (no {COMPLETE} or {STARTED}); "
                          f"thinkfast never deletes what it did not write: move it away or choose another run_dir")


# ------------------------------------------------------------------ the run directory and its lock

def _looks_like_legacy_run(path: Path) -> bool:
    """A run directory written before thinkfast-run.json existed: stage folders with our markers."""
    for child in path.iterdir():
        for name in (COMPLETE, STARTED):
            p = child / name
            if p.is_file():
                try:
                    data = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(data, dict) and "config_hash" in data:
                    return True
    return False


class RunDir:
    """A run directory: checked to be ours, locked while this process writes it, with a content-hash
    cache for files read from outside it. Use as a context manager::

        with RunDir("runs/nano", command="thinkfast run") as rd:
            ...
    """

    settle_ns = 2_000_000_000  # a file changed this recently is hashed but not cached (it may still change)

    def __init__(self, path: str | Path, command: str = "thinkfast"):
        if str(path).strip() == "":
            raise RunDirError("run_dir is empty; name a folder for the run (e.g. run_dir=runs/nano)")
        self.path = Path(path)
        self.command = command
        self._lock_file = None

    def __enter__(self) -> "RunDir":
        self.prepare()
        self.lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unlock()

    def prepare(self) -> None:
        """Create the folder, or check that an existing one is a thinkfast run directory."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunDirError(f"run_dir {p} is a file, not a folder; choose another run_dir")
        if p.is_dir() and not (p / RUN_MARKER).is_file():
            if any(p.iterdir()) and not _looks_like_legacy_run(p):
                raise RunDirError(
                    f"run_dir {p} is a folder with other content and no {RUN_MARKER}: it is not a thinkfast run "
                    f"directory, and a run there could replace files you made; choose a new or empty folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
            if not (p / RUN_MARKER).is_file():
                atomic_write_json(p / RUN_MARKER, {"format": 1, "created_at": _now(),
                                                   "note": "a thinkfast run directory; see its README"})
        except OSError as e:  # read-only, permission, a file where a folder should be, ...
            raise RunDirError(f"run_dir {p}: cannot write there ({e.strerror or e}); choose a writable folder") from None

    def lock(self) -> None:
        """Hold ``RUN_DIR/.lock`` (an advisory flock the kernel drops when the holder dies, so a lock left
        by a killed process never blocks: its stale content is simply replaced)."""
        import fcntl

        path = self.path / ".lock"
        try:
            f = open(path, "a+", encoding="utf-8")
        except OSError as e:
            raise RunDirError(f"run_dir {self.path}: cannot write there ({e.strerror or e}); "
                              f"choose a writable folder") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            try:
                info = json.loads(holder)
                who = (f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')}, "
                       f"since {info.get('since')})")
            except ValueError:
                who = "another process"
            raise RunDirError(f"run_dir {self.path} is in use by {who}; wait for it to finish or stop it "
                              f"(a second writer could mix the two runs' files)") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                            "since": _now()}))
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    # -- content hashes of outside inputs

    def fingerprint(self, path: str | Path) -> str:
        """sha256 of a file, or of a folder's files (relative names and contents), for inputs read from
        outside the run directory. Cached in ``RUN_DIR/.fingerprints.json`` by (size, mtime_ns, inode)
        per file, as git does, so a large model is read once."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        cache_path = self.path / ".fingerprints.json"
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            key = str(f)
            # ctime cannot be set back by a tool (touch -r, cp -p, rsync -t can restore mtime)
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            hit = cache.get(key)
            if isinstance(hit, dict) and hit.get("stamp") == stamp:
                digest = hit["sha256"]
            else:
                digest = _sha256_file(f)
                if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > self.settle_ns:
                    cache[key] = {"stamp": stamp, "sha256": digest}  # not while it may still be changing
            rel = "" if f == path else f.relative_to(path).as_posix()
            h.update(f"{rel}\0{digest}\n".encode())
        try:
            atomic_write_json(cache_path, cache, indent=None)
        except OSError:
            pass  # a cache only
        return h.hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
