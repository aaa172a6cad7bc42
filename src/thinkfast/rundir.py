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

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from thinkfast.config import ConfigError, _plain

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_dir", "JsonlLogger",
           "StageDir", "StageConfigMismatch", "previous_model_dir"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _json_default(obj: Any) -> Any:
    """JSON fallback: tensors/numpy scalars via .item(), arrays via .tolist(), Paths as str."""
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except (ValueError, RuntimeError, TypeError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    plain = _plain(obj)
    if plain is not obj:
        return plain
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort; not all platforms allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file in the same dir, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Serialize ``obj`` to JSON and write it atomically.

    Serialization happens before anything touches the disk, so an unserializable
    object leaves the old file (if any) intact. Scalars with ``.item()`` (numpy,
    torch) and Paths are converted; NaN/inf are written as ``NaN``/``Infinity``
    as Python's json module does.
    """
    text = json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` so a rename cannot outlive its contents on power loss."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


@contextmanager
def atomic_dir(dst: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``dst``; on success it becomes ``dst`` atomically.

    On an exception the temp dir is deleted and ``dst`` (old content, if any) is
    untouched. An existing ``dst`` is renamed aside, the new one renamed into place,
    and only then is the old one deleted: a reader never sees a half-written ``dst``,
    but there is a tiny window (between the two renames) in which ``dst`` does not
    exist. Directories cannot be swapped atomically with a portable call; stages do
    not read each other's folders concurrently, so this is acceptable. With
    ``fsync`` (the default) all files are flushed to disk before the rename.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    aside = dst.parent / f".{dst.name}.old-{tag}"
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        if dst.exists():
            os.replace(dst, aside)
            os.replace(tmp, dst)  # window: dst missing between these two renames
            old = aside
        else:
            os.replace(tmp, dst)
            old = None
    except BaseException:
        if aside.exists() and not dst.exists():
            os.replace(aside, dst)  # a failed second rename: put the old dst back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


class StageConfigMismatch(ConfigError):
    """A stage's existing output was produced by a different config."""


class StageDir:
    """One stage's folder in the run directory, and its begin/finish protocol."""

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
        return self.path / "model"

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
        return self.path / "COMPLETE.json"

    @property
    def started_path(self) -> Path:
        return self.path / "STARTED.json"

    def is_complete(self) -> bool:
        return self.marker_path.is_file()

    def completed_config_hash(self) -> str | None:
        """The config hash recorded in the completion marker, or None if not complete."""
        return _read_json(self.marker_path).get("config_hash") if self.is_complete() else None

    def read_metrics(self) -> dict:
        """The stage's metrics.json (FileNotFoundError if it has none)."""
        return _read_json(self.metrics_path)

    def begin(self, config_hash: str, force: bool = False) -> str:
        """Prepare to run the stage; returns ``"skip"``, ``"resume"`` or ``"fresh"``.

        * complete with the same hash, not forced: ``"skip"``;
        * complete with another hash, not forced: raises StageConfigMismatch;
        * forced: marker, metrics, model/ and checkpoint/ are removed -> ``"fresh"``;
        * otherwise ``"resume"`` if checkpoint/ exists (raising StageConfigMismatch
          when it was started with another config), else ``"fresh"`` (a stale
          model/ from an interrupted run is removed).

        Stale metrics.json and leftover temp dirs are always cleaned up; log.jsonl
        is kept so restarts append to it.
        """
        if self.is_complete() and not force:
            done = self.completed_config_hash()
            if done == config_hash:
                return "skip"
            raise StageConfigMismatch(
                f"stage '{self.name}' already completed with a different config "
                f"(config hash {done}, now {config_hash}; marker {self.marker_path}); "
                f"rerun with --force to redo it"
            )
        if force:
            self.marker_path.unlink(missing_ok=True)
            self.started_path.unlink(missing_ok=True)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)  # model/ goes below
        self.metrics_path.unlink(missing_ok=True)
        self._remove_temp_leftovers()

        if self.checkpoint_dir.is_dir():
            started = self.started_path.is_file() and _read_json(self.started_path).get("config_hash")
            if started and started != config_hash:
                raise StageConfigMismatch(
                    f"stage '{self.name}' has a checkpoint from a different config "
                    f"(config hash {started}, now {config_hash}; {self.checkpoint_dir}); "
                    f"rerun with --force to start it over"
                )
            mode = "resume"
        else:
            shutil.rmtree(self.model_dir, ignore_errors=True)
            mode = "fresh"
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.started_path, {"config_hash": config_hash, "started_at": _now()})
        return mode

    def finish(self, metrics: dict, config_hash: str) -> None:
        """Write metrics.json, then the completion marker (last, so it implies the rest)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.metrics_path, metrics)
        summary = {
            k: v for k, v in _plain(metrics).items()
            if isinstance(v, (int, float, str, bool)) or v is None
        }
        atomic_write_json(
            self.marker_path,
            {"stage": self.name, "config_hash": config_hash, "finished_at": _now(), "metrics": summary},
        )

    def logger(self) -> JsonlLogger:
        """A JsonlLogger appending to log.jsonl."""
        return JsonlLogger(self.log_path)

    def _remove_temp_leftovers(self) -> None:
        """Delete temp files/dirs that a crashed atomic write left in the stage folder."""
        for p in self.path.glob(".*"):
            if ".tmp" in p.name or ".old-" in p.name:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def previous_model_dir(run_dir: str | Path, stage_names: list[str], before: str) -> Path:
    """The ``model/`` of the latest completed stage before ``before`` that has one.

    Stages without a model (e.g. eval) are passed over; an earlier stage that has
    not completed is an error rather than silently falling back to an older model.
    """
    if before not in stage_names:
        raise ValueError(f"stage '{before}' is not in the pipeline ({', '.join(stage_names)})")
    earlier = stage_names[: stage_names.index(before)]
    for name in reversed(earlier):
        sd = StageDir(run_dir, name)
        if not sd.is_complete():
            raise FileNotFoundError(
                f"stage '{name}' (before '{before}') has not completed in {run_dir}; run it first"
            )
        if sd.model_dir.is_dir():
            return sd.model_dir
    raise FileNotFoundError(
        f"no stage before '{before}' in {run_dir} has a model/ "
        f"(looked at: {', '.join(earlier) or 'none'})"
    )
