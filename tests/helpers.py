"""Helpers shared by the tests of run directories."""

from pathlib import Path


def names(d: Path) -> list[str]:
    """The names in folder ``d``, sorted."""
    return sorted(p.name for p in d.iterdir())


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative name -> bytes)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
