"""`memplan models`: the catalog."""

from __future__ import annotations

import json

import click

from memplan.commands.options import output_format


@click.command("models")
@output_format(("table", "json"))
def models(fmt: str) -> None:
    """List the catalog models with architecture and parameter counts."""
    from memplan.model.catalog import catalog, load_model
    from memplan.units import format_count

    rows = []
    for entry in catalog():
        spec = load_model(entry.name)
        rows.append(
            {
                "name": entry.name,
                "architecture": spec.architecture,
                "parameters": spec.total_parameters,
                "active_parameters": spec.active_parameters,
                "hf_id": entry.hf_id,
            }
        )
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    w = max(len(r["name"]) for r in rows)
    click.echo(f"{'name':<{w}}  {'architecture':<22} {'params':>9} {'active':>9}  hf_id")
    for r in rows:
        click.echo(
            f"{r['name']:<{w}}  {r['architecture']:<22} {format_count(r['parameters']):>9} "
            f"{format_count(r['active_parameters']):>9}  {r['hf_id'] or '-'}"
        )
