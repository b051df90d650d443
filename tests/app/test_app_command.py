"""`memplan app` as a process: stopped with SIGTERM or SIGINT, it takes the Streamlit server
down with it, so the port is free and no process of its tree is left (POSIX only)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil", reason="needs psutil to list the process tree (streamlit depends on it)")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups and SIGTERM are POSIX")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    """Nobody listens on it and a new server can bind it (with SO_REUSEADDR, as servers do: the
    health checks' closed connections linger in TIME_WAIT for a minute without holding the port)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_until(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 0)])
def test_a_signal_stops_the_server_and_frees_the_port(tmp_path: Path, signum: int, status: int) -> None:
    port = _free_port()
    log = tmp_path / "app.log"
    code = f"import sys; from memplan.cli import main; sys.exit(main(['app', '--headless', '--port', '{port}']))"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []
    try:
        def up() -> bool:
            try:
                return urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=1).read() == b"ok"
            except OSError:
                return proc.poll() is not None  # died: fail below with the log
        assert _wait_until(up, 90) and proc.poll() is None, log.read_text()[-2000:]
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) >= 2  # memplan app and the streamlit server it started

        proc.send_signal(signum)
        assert proc.wait(timeout=15) == status, log.read_text()[-2000:]
        assert _wait_until(lambda: _port_free(port), 5), f"port {port} still held after {signal.Signals(signum).name}"
        assert _wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 5), \
            [p for p in tree if p.is_running()]
    finally:
        for p in reversed(tree):  # only what this test started
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
