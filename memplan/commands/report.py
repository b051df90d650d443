"""`memplan report`: a grid as one self-contained HTML report (charts inlined, no network to view it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from memplan.commands.options import grid_from_options, grid_options, note_terms


@click.command("report")
@grid_options
@click.option("--out", "-o", "out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The HTML file to write.")
@click.option("--profiles", "profiles", type=click.Path(path_type=Path), default=None,
              help="Profile records (.jsonl file or folder) for the accuracy section [default: the shipped records plus ./profiles/].")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when stderr is a terminal].")
def report_command(grid_file: Path | None, out: Path, profiles: Path | None, progress: bool | None, **kwargs: Any) -> None:
    """Summary tables, memory and cost charts, GPU fits, accuracy and assumptions for a grid, in one HTML file."""
    from memplan.planning.progress import progress_reporter
    from memplan.measure.records import records_note
    from memplan.files import check_writable
    from memplan.planning.render_sweep import plural, refused_lines
    from memplan.planning.report import write_report
    from memplan.units import format_bytes

    check_writable(out)
    grid = grid_from_options(grid_file, kwargs)
    update, close = progress_reporter(progress)
    try:
        size, frame = write_report(grid, out, profiles=profiles, progress=update)
    finally:
        close()
    click.echo(records_note(profiles), err=True)
    note_terms(always=True)
    for line in refused_lines(frame):
        click.echo(line, err=True)
    click.echo(f"wrote {out} ({format_bytes(size, decimal=True)}): {plural(len(frame), 'row')} x {plural(len(grid.gpus), 'GPU')}")
