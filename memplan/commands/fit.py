"""`memplan fit`: how far a setup can grow on a GPU, which GPU it needs, and past one GPU how many."""

from __future__ import annotations

import click

from memplan.commands.options import note_terms, output_format, setup_from_kwargs, setup_options
from memplan.errors import SetupError


@click.command("fit")
@setup_options
@click.option("--gpu", default=None, help="GPU to find the limits and the fewest GPUs on (default: the smallest and cheapest "
                                          "single GPU, or the cheapest cluster when none holds the setup).")
@output_format(("table", "json"))
def fit(gpu: str | None, fmt: str, **kwargs: object) -> None:
    """Largest batch, longest sequence and highest rank that fit; smallest and cheapest GPU; past one GPU,
    the fewest GPUs of --gpu or the cheapest cluster, per layout (--parallel, or DDP/FSDP1/FSDP2/ZeRO-1/2/3)."""
    from memplan.hardware.gpus import gpu_catalog
    from memplan.training.search import fit_answer
    from memplan.planning.render_fit import render_fit

    node = kwargs.get("gpus_per_node")  # as typed: Setup resolves it against --gpus
    setup = setup_from_kwargs(kwargs)
    if setup.device != "cuda":
        raise SetupError("memplan fit plans GPUs: use --device cuda")
    catalog = gpu_catalog()
    g = catalog.get(gpu) if gpu is not None else None
    answer = fit_answer(setup, catalog, gpu=g, gpus_per_node=node if isinstance(node, int) else None)
    click.echo(render_fit(answer, fmt))
    note_terms()
