"""Helpers shared by the tests of run directories and of the smoke pipeline."""

from pathlib import Path


def names(d: Path) -> list[str]:
    """The names in folder ``d``, sorted."""
    return sorted(p.name for p in d.iterdir())


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative name -> bytes)."""
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def serve_in_thread(state):
    """Run thinkfast's server app for ``state`` on uvicorn in a daemon thread; returns (base URL, stop())."""
    import socket
    import threading
    import time

    import uvicorn

    from thinkfast.serving.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    t0 = time.time()
    while not srv.started:
        assert time.time() - t0 < 30 and thread.is_alive(), "server did not start"
        time.sleep(0.02)

    def stop():
        srv.should_exit = True
        thread.join(10)
        state.engine.stop()

    return f"http://127.0.0.1:{port}", stop


# the smoke pipeline (configs/smoke.yaml), shared by the pipeline, CLI and pretrain tests (fixtures in conftest.py)
SMOKE_STAGES = ["pretrain", "library", "scores", "costs", "search", "eval"]


def smoke(run, *overrides):
    """The smoke pipeline with its run directory at ``run``."""
    from thinkfast.pipeline import default_config_path, load_pipeline

    return load_pipeline(default_config_path("smoke"), [f"run_dir={run}", *overrides])


def marker(run, name) -> dict:
    """Stage ``name``'s completion marker in run directory ``run``."""
    import json

    return json.loads((Path(run) / name / "COMPLETE.json").read_text())


def ids(run) -> dict:
    """Each smoke stage's output id."""
    return {s: marker(run, s)["output_id"] for s in SMOKE_STAGES}


def state(run, name, *overrides) -> str:
    """Stage ``name``'s status in the smoke pipeline at ``run`` (current, stale, ...)."""
    from thinkfast.pipeline import status
    from thinkfast.rundir import RunDir

    pipe = smoke(run, *overrides)
    with RunDir(pipe.run_dir) as rd:
        return status(pipe, rd, name)[0]
