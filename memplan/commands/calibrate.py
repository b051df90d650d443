"""`memplan calibrate`: fit the CUDA device terms from profiles/ and show held-out error."""

from __future__ import annotations

import json
from pathlib import Path

import click



@click.command("calibrate")
@click.option("--profiles", "profiles_path", type=click.Path(path_type=Path), default=None, help="A .jsonl file or a folder of them (default: profiles/).")
@click.option("--write/--no-write", default=True, show_default=True, help="Store the fitted terms in data/device_terms.json.")
@click.option("--format", "-f", "fmt", type=click.Choice(("table", "json")), default="table", show_default=True)
def calibrate(profiles_path: Path | None, write: bool, fmt: str) -> None:
    """Fit CUDA context and allocator slack from measured runs; report error on held-out runs."""
    from memplan.measure.calibrate import calibrate as fit, read_records, write_device_terms
    from memplan.errors import ProfileError
    from memplan.paths import profiles_dir
    from memplan.units import format_bytes

    root = profiles_path or profiles_dir()
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else [root]
    if not files or not all(f.is_file() for f in files):
        raise ProfileError(f"no profile records at {root}; run `memplan profile` first")
    cal = fit(read_records(files))
    if write:
        write_device_terms(cal)
    summary = cal.summary()
    if fmt == "json":
        click.echo(json.dumps({"summary": summary, "rows": [r.__dict__ | {"allocated_error": r.allocated_error, "nvml_error": r.nvml_error} for r in cal.rows]}, indent=2))
        return
    t = cal.terms
    click.echo(f"CUDA context: {format_bytes(t.cuda_context_bytes)}; allocator slack: {100 * t.allocator_fraction:.2f}% of the allocated peak")
    click.echo(f"fitted on {summary['fit_records']} records; errors below are on the {summary['held_out_records']} held-out records")
    click.echo(f"{'setup':<62} {'pred GiB':>9} {'meas GiB':>9} {'err':>7} {'NVML err':>9}")
    for r in sorted(cal.held_out(), key=lambda r: -abs(r.allocated_error)):
        nv = f"{100 * r.nvml_error:+.1f}%" if r.nvml_error is not None else "-"
        click.echo(f"{r.label[:62]:<62} {r.predicted_allocated / 2**30:>9.2f} {r.measured_allocated / 2**30:>9.2f} {100 * r.allocated_error:>+6.1f}% {nv:>9}")
    if summary["allocated_median_abs_error"] is not None:
        click.echo(
            f"allocated peak: median |error| {100 * summary['allocated_median_abs_error']:.2f}%, max {100 * summary['allocated_max_abs_error']:.2f}%"
            + (f"; NVML total: median {100 * summary['nvml_median_abs_error']:.2f}%, max {100 * summary['nvml_max_abs_error']:.2f}%" if summary["nvml_median_abs_error"] is not None else "")
        )
