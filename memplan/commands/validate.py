"""`memplan validate`: predicted vs measured for the records in `profiles/`.

The tables it prints live in `memplan.planning.render_validate` (`memplan profile` prints
two of them too).
"""

from __future__ import annotations

import click

from memplan.commands.options import note_terms, output_format
from memplan.planning.labels import choices_text
from memplan.training.setup import DEVICES


@click.command("validate")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, dir_okay=True))
@click.option("--model", "-m", "model_filter", default=None, help="Only records of this model (setup.model).")
@click.option("--device", "device_filter", default=None, help=f"Only records measured on this device ({choices_text(DEVICES)}).")
@click.option("--measured", is_flag=True, help="Print the measured summary instead of the comparison.")
@click.option("--extrapolate", is_flag=True, help="Extrapolate runs truncated with --layers at two or more depths to full depth, per layer.")
@click.option("--random", "random_runs", type=click.IntRange(min=1), default=None,
              help="Draw N random small models and setups (every family and flag), profile them on the CPU and compare.")
@click.option("--seed", type=int, default=None, help="Seed of --random [default: a fresh one, printed].")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="--random: runs side by side.")
@click.option("--out", "random_out", type=click.Path(dir_okay=False), default=None,
              help="--random: keep the records in this JSONL file (configs beside it; the same command resumes) [default: a temp folder].")
@output_format()
def validate(paths: tuple[str, ...], model_filter: str | None, device_filter: str | None, measured: bool, extrapolate: bool,
             random_runs: int | None, seed: int | None, workers: int, random_out: str | None, fmt: str) -> None:
    """Predicted vs measured, per component and for the peak (records: PATHS, else the shipped ones plus ./profiles/)."""
    if random_runs is not None:
        _validate_random(random_runs, seed, workers, random_out, fmt)
        return
    from memplan.measure.compare import compare_records
    from memplan.errors import ProfileError
    from memplan.measure.records import records_note, require_records
    from memplan.planning.render_validate import render_comparison, render_extrapolation, render_records

    records = require_records(list(paths) if paths else None)
    if model_filter is not None:
        records = [r for r in records if r["setup"]["model"] == model_filter]
    if device_filter is not None:
        records = [r for r in records if r["setup"]["device"] == device_filter]
    if not records:
        only = " and ".join(f"{k} {v}" for k, v in (("--model", model_filter), ("--device", device_filter)) if v is not None)
        raise ProfileError(f"no profile record matches {only}; drop the filter or check its spelling")
    click.echo(records_note(list(paths) if paths else None), err=True)
    note_terms(always=True)
    if extrapolate:
        click.echo(render_extrapolation(records, fmt))
        return
    if measured:
        click.echo(render_records(records, fmt))
        return
    click.echo(render_comparison(compare_records(records), fmt))


def _validate_random(n: int, seed: int | None, workers: int, out: str | None, fmt: str) -> None:
    """`--random N`: the draw of `memplan.measure.random_setups` (the same one the test suite runs)."""
    import tempfile
    from pathlib import Path

    from memplan.measure.random_setups import fresh_seed, peak_frame, random_campaign
    from memplan.measure.profiler.device import check_device
    from memplan.planning.render_validate import outcome_line, render_random_validation

    check_device("cpu")
    seed = fresh_seed() if seed is None else seed
    click.echo(f"random validation: {n} runs, seed {seed} (memplan validate --random {n} --seed {seed})", err=True)

    def progress(i: int, total: int, job: object, record: dict) -> None:
        click.echo(f"[{i}/{total}] {outcome_line(record)}", err=True)

    with tempfile.TemporaryDirectory(prefix="memplan-random-") as tmp:
        out_path = Path(out) if out else Path(tmp) / "runs.jsonl"
        folder = out_path.parent / f"{out_path.stem}-configs" if out else Path(tmp) / "configs"
        _, records, interrupted = random_campaign(n, seed=seed, folder=folder, out=out_path, workers=workers, on_record=progress)
        frame = peak_frame(records)
    if fmt == "csv":
        click.echo(frame.to_csv(index=False).rstrip("\n"))
    elif fmt == "json":
        click.echo(frame.to_json(orient="records", indent=2))
    else:
        click.echo(render_random_validation(frame, seed=seed))
    if interrupted:
        raise KeyboardInterrupt  # the CLI reports it and exits with status 130
