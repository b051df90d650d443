"""`memplan estimate`: the memory of one fine-tuning setup."""

from __future__ import annotations

import click

from memplan.cli import app
from memplan.commands.options import output_format, setup_from_kwargs, setup_options
from memplan.errors import SetupError


@app.command()
@setup_options
@click.option("--gpu", default=None, help="GPU from the catalog to check the fit against (e.g. a100-80gb).")
@output_format()
def estimate(gpu: str | None, fmt: str, **kwargs: object) -> None:
    """Bytes of weights, gradients, optimizer states and activations, and the peak."""
    from memplan.estimate import estimate as run
    from memplan.render import render_estimate

    setup = setup_from_kwargs(kwargs)
    gpu_spec = None
    if gpu is not None:
        from memplan.gpus import gpu_catalog

        if setup.device != "cuda":
            raise SetupError("--gpu checks the fit on a CUDA GPU, which needs --device cuda; drop --gpu or --device cpu")
        gpu_spec = gpu_catalog().get(gpu)
    click.echo(render_estimate(run(setup), fmt, gpu=gpu_spec))
