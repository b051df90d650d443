"""`memplan app`: the web app, `streamlit run app/memplan_app.py` under the hood.

The app ships beside the package in a checkout or an editable install (`app/`),
or inside a built wheel as `memplan/_app`. Streamlit is imported only by the
child process, so `memplan --help` stays fast.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from memplan.errors import MemplanError

__all__ = ["app_script", "streamlit_argv"]

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


@click.command("app")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port to serve on [default: Streamlit's, 8501].")
@click.option("--address", default="localhost", show_default=True, help="Address to listen on (0.0.0.0 to share it on your network).")
@click.option("--headless/--no-headless", default=False, show_default=True, help="Do not open a browser.")
@click.option("--profiles", "profiles_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Profile records for the calibration page: a .jsonl file or a folder of them [default: profiles/].")
def app_command(port: int | None, address: str, headless: bool, profiles_path: Path | None) -> None:
    """Open the web app: fit, fleet cost, calibration and reports, on the built-in catalogs."""
    import os
    from importlib.util import find_spec

    from memplan.planning.appdata import PROFILES_ENV

    if find_spec("streamlit") is None:
        raise MemplanError("the web app needs streamlit: pip install streamlit (or pip install -e .)")
    env = dict(os.environ)
    if profiles_path is not None:
        env[PROFILES_ENV] = str(profiles_path.resolve())
    status = subprocess.call(streamlit_argv(port=port, address=address, headless=headless), env=env)
    if status in (0, -2, 130):  # -2 / 130: stopped with Ctrl-C
        return
    raise click.exceptions.Exit(status if status > 0 else 128 - status)  # killed by signal N: the shell's 128 + N
