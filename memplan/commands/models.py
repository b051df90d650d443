"""`memplan models`: the catalog."""

from __future__ import annotations

import click

from memplan.commands.options import output_format


@click.command("models")
@output_format(("table", "json"))
def models(fmt: str) -> None:
    """List the catalog models with architecture and parameter counts."""
    from memplan.model.catalog import catalog, load_model
    from memplan.planning.render_fit import render_models

    click.echo(render_models([(entry, load_model(entry.name)) for entry in catalog()], fmt))
