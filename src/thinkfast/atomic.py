"""Writing files and folders atomically (temp file or folder + rename), so a crash never leaves a half-written
file for a later stage or a resumed run to read. :mod:`thinkfast.rundir` and :mod:`thinkfast.artifacts` write
through these."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import _plain

__all__ = ["atomic_write_text", "atomic_write_json", "atomic_dir"]


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
