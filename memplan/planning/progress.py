"""A progress bar on stderr for long sweeps (`memplan sweep`, `memplan report`), drawn with rich."""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["progress_reporter"]


def progress_reporter(enabled: bool | None) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A progress callback drawing a bar on stderr (when it is a terminal, or when asked), and its closer."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None, lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True, force_terminal=bool(enabled)), transient=False)
    task = bar.add_task("sweep", total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop
