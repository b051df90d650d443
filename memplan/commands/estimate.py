"""`memplan estimate`: the memory of one fine-tuning setup."""

from __future__ import annotations

import click

from memplan.commands.options import note_terms, output_format, setup_from_kwargs, setup_options
from memplan.errors import SetupError


@click.command("estimate")
@setup_options
@click.option("--gpu", default=None, help="GPU from the catalog to check the fit against (e.g. a100-80gb).")
@output_format()
def estimate(gpu: str | None, fmt: str, **kwargs: object) -> None:
    """Bytes of weights, gradients, optimizer states and activations, and the peak."""
    from memplan.training.estimate import estimate as run
    from memplan.planning.render import render_estimate

    setup = setup_from_kwargs(kwargs)
    gpu_spec = None
    if gpu is not None:
        from memplan.hardware.gpus import gpu_catalog

        if setup.device != "cuda":
            raise SetupError("--gpu checks the fit on a CUDA GPU, which needs --device cuda; drop --gpu or --device cpu")
        gpu_spec = gpu_catalog().get(gpu)
    click.echo(render_estimate(run(setup), fmt, gpu=gpu_spec))
    if setup.device == "cuda":
        note_terms()
