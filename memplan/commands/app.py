"""`memplan app`: the web app, `streamlit run app/memplan_app.py` under the hood.

The app ships beside the package in a checkout or an editable install (`app/`),
or inside a built wheel as `memplan/_app`. Streamlit is imported only by the
child process, so `memplan --help` stays fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from memplan.errors import MemplanError

__all__ = ["app_script", "streamlit_argv", "serve"]

_PKG = Path(__file__).resolve().parent.parent


def app_script() -> Path:
    """The app's entry script."""
    for candidate in (_PKG.parent / "app" / "memplan_app.py", _PKG / "_app" / "memplan_app.py"):
        if candidate.is_file():
            return candidate
    raise MemplanError("the web app is not installed beside memplan (no app/memplan_app.py); run from a checkout: pip install -e .")


def streamlit_argv(*, port: int | None = None, address: str = "localhost", headless: bool = False) -> list[str]:
    """The command that serves the app; tests and scripts use it too."""
    argv = [sys.executable, "-m", "streamlit", "run", str(app_script()),
            "--server.address", address, "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
            "--server.headless", "true" if headless else "false"]
    if port is not None:
        argv += ["--server.port", str(port)]
    return argv


# How long the server may take to shut down after SIGTERM/SIGINT before its process group is killed.
STOP_GRACE_S = 5.0
_FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the server's process group (the server and anything it started)."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signum)  # start_new_session: the group id is the server's pid
        elif signum == getattr(signal, "SIGKILL", None):
            proc.kill()
        else:
            proc.terminate()
    except (ProcessLookupError, PermissionError):
        pass


def serve(argv: list[str], *, env: dict[str, str] | None = None, grace_s: float = STOP_GRACE_S) -> tuple[int, int | None]:
    """Run the server in its own process group until it exits; returns (exit status, signal received or None).

    SIGINT, SIGTERM and SIGHUP sent to `memplan app` are forwarded to the server's whole group, which
    gets `grace_s` seconds to stop before it is killed; the group is reaped either way, so the port
    is free when this returns. (Killed outright with SIGKILL, `memplan app` cannot forward anything.)"""
    proc = subprocess.Popen(argv, env=env, start_new_session=os.name == "posix")
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        _signal_group(proc, signum)

    # Handlers can only be set from the main thread (a caller on another thread forwards nothing).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in _FORWARDED} if main_thread else {}
    stop_by: float | None = None  # when the grace after the first signal runs out
    try:
        while True:
            try:
                status = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and stop_by is None:
                stop_by = time.monotonic() + grace_s
            elif stop_by is not None and time.monotonic() > stop_by:
                _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an exception here: never leave the server behind
            _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
            proc.wait()
    return status, (received[0] if received else None)


@click.command("app")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port to serve on [default: Streamlit's, 8501].")
@click.option("--address", default="localhost", show_default=True, help="Address to listen on (0.0.0.0 to share it on your network).")
@click.option("--headless/--no-headless", default=False, show_default=True, help="Do not open a browser.")
@click.option("--profiles", "profiles_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Profile records for the calibration page: a .jsonl file or a folder of them "
                   "[default: the shipped records plus ./profiles/].")
def app_command(port: int | None, address: str, headless: bool, profiles_path: Path | None) -> None:
    """Open the web app: fit, fleet cost, calibration and reports, on the built-in catalogs."""
    from importlib.util import find_spec

    from memplan.planning.appdata import PROFILES_ENV

    if find_spec("streamlit") is None:
        raise MemplanError("the web app needs streamlit: pip install streamlit (or pip install -e .)")
    env = dict(os.environ)
    if profiles_path is not None:
        env[PROFILES_ENV] = str(profiles_path.resolve())
    status, received = serve(streamlit_argv(port=port, address=address, headless=headless), env=env)
    if received is not None:  # stopped from outside: Ctrl-C is a normal way out; other signals exit as the shell's 128 + N
        if received == signal.SIGINT:
            return
        raise click.exceptions.Exit(128 + received)
    if status in (0, -2, 130):  # -2 / 130: the server itself was stopped with Ctrl-C
        return
    raise click.exceptions.Exit(status if status > 0 else 128 - status)  # killed by signal N: the shell's 128 + N
