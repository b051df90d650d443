"""`memplan sweep`: a grid of setups (flags and/or a YAML/JSON grid file) as CSV,
Parquet or Excel, or a table.

Every grid flag takes a comma list and may be repeated (`--quant bf16,nf4`), except
`--lora-targets`, where each occurrence is ONE target set (`--lora-targets q_proj,v_proj
--lora-targets all-linear`). Booleans take true/false (`--grad-checkpointing true,false`).
Flags replace the same keys of the grid file; the other fleet inputs (popularity,
prompt_tokens, scale_to_zero, ...) are grid-file keys (see `memplan.planning.grid`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from memplan.commands.options import grid_from_options, grid_options, note_terms


@click.command("sweep")
@grid_options
@click.option("--out", "-o", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write .csv, .parquet or .xlsx (by extension); default: print a table.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when stderr is a terminal].")
def sweep_command(grid_file: Path | None, out: Path | None, progress: bool | None, **kwargs: Any) -> None:
    """Estimate a grid of setups: one row per setup, fits on every GPU, fleet $/month."""
    from memplan.planning.progress import progress_reporter
    from memplan.errors import MemplanError
    from memplan.files import atomic_write, check_writable
    from memplan.planning.render_sweep import no_rows_message, plural, refused_lines, render_sweep_table
    from memplan.planning.sweep import check_output, sweep_grid, write_sweep

    if out is not None:  # every refusal of the path comes before any work
        check_output(out)
        check_writable(out)
    grid = grid_from_options(grid_file, kwargs)
    update, close = progress_reporter(progress)
    try:
        frame = sweep_grid(grid, progress=update)
    finally:
        close()
    if frame.empty:
        raise MemplanError(no_rows_message(frame))
    note_terms()
    for line in refused_lines(frame):
        click.echo(line, err=True)
    if out is None:
        click.echo(render_sweep_table(frame))
        return
    atomic_write(out, lambda tmp: write_sweep(frame, tmp))
    click.echo(f"wrote {plural(len(frame), 'row')} x {plural(len(grid.gpus), 'GPU')} to {out}")
