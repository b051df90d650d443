"""`memplan fit`: how far a setup can grow on a GPU, and which GPU it needs."""

from __future__ import annotations

import click

from memplan.commands.options import note_terms, output_format, setup_from_kwargs, setup_options
from memplan.errors import SetupError


@click.command("fit")
@setup_options
@click.option("--gpu", default=None, help="GPU to find the limits on (default: report the smallest and cheapest that fit).")
@output_format(("table", "json"))
def fit(gpu: str | None, fmt: str, **kwargs: object) -> None:
    """Largest batch, longest sequence and highest rank that fit; smallest and cheapest GPU."""
    from memplan.hardware.gpus import gpu_catalog
    from memplan.training.search import cheapest_gpu, limits_on, smallest_gpu
    from memplan.planning.render_fit import render_fit

    setup = setup_from_kwargs(kwargs)
    if setup.device != "cuda":
        raise SetupError("memplan fit plans GPUs: use --device cuda")
    catalog = gpu_catalog()
    small, cheap = smallest_gpu(setup, catalog), cheapest_gpu(setup, catalog)
    g = catalog.get(gpu) if gpu is not None else None
    limits = limits_on(setup, g) if g is not None else None
    click.echo(render_fit(setup, small, cheap, fmt, gpu=g, limits=limits))
    if setup.device == "cuda":
        note_terms()
