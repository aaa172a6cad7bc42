"""Helpers shared by the tests of run directories."""

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
