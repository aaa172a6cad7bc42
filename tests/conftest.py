"""Fixtures shared across test files: the smoke pipeline, run once per session, and a copy of it per test."""

import shutil

import pytest
from helpers import smoke


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """The smoke pipeline, run once; tests work on copies of it (``run``)."""
    from thinkfast.pipeline import run_all

    run = tmp_path_factory.mktemp("smoke") / "run"
    results = run_all(smoke(run))
    return run, results


@pytest.fixture
def run(base, tmp_path):
    """A fresh copy of the smoke run directory."""
    dst = tmp_path / "run"
    shutil.copytree(base[0], dst, symlinks=True)
    (dst / ".lock").unlink(missing_ok=True)
    return dst
