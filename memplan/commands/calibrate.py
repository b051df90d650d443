"""`memplan calibrate`: fit the CUDA device terms from profile records and show held-out error.

The fitted terms go to the user's terms file (`memplan.paths.user_terms_file`, or `--terms`),
which the estimator then reads instead of the shipped `data/device_terms.json`.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("calibrate")
@click.option("--profiles", "profiles_path", type=click.Path(path_type=Path), default=None,
              help="A .jsonl file or a folder of them [default: the shipped records plus ./profiles/].")
@click.option("--write/--no-write", default=True, show_default=True,
              help="Store the fitted terms in your terms file (--terms); the shipped defaults are never changed.")
@click.option("--terms", "terms_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The terms file to write [default: device_terms.json in your user config folder].")
@click.option("--format", "-f", "fmt", type=click.Choice(("table", "json")), default="table", show_default=True)
def calibrate(profiles_path: Path | None, write: bool, terms_path: Path | None, fmt: str) -> None:
    """Fit CUDA context and allocator slack from measured runs; report error on held-out runs."""
    from memplan.errors import ProfileError
    from memplan.measure.calibrate import calibrate as fit, write_device_terms
    from memplan.measure.records import records_note, require_records
    from memplan.files import check_writable
    from memplan.paths import user_terms_file
    from memplan.planning.render_validate import render_calibration

    target = terms_path or user_terms_file()
    if write:  # before the fit: a terms file that cannot be written is refused first
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProfileError(f"--terms {target}: cannot create folder {target.parent} ({exc.strerror or exc})") from None
        check_writable(target, flag="--terms")
    records = require_records(profiles_path)
    click.echo(records_note(profiles_path), err=True)
    cal = fit(records)
    if write:
        click.echo(f"wrote the fitted device terms to {write_device_terms(cal, target)}", err=True)
    click.echo(render_calibration(cal, fmt))
