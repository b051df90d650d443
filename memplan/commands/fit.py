"""`memplan fit`: how far a setup can grow on a GPU, and which GPU it needs."""

from __future__ import annotations

import json

import click

from memplan.commands.options import output_format, setup_from_kwargs, setup_options
from memplan.errors import SetupError


@click.command("fit")
@setup_options
@click.option("--gpu", default=None, help="GPU to find the limits on (default: report the smallest and cheapest that fit).")
@output_format(("table", "json"))
def fit(gpu: str | None, fmt: str, **kwargs: object) -> None:
    """Largest batch, longest sequence and highest rank that fit; smallest and cheapest GPU."""
    from memplan.hardware.gpus import gpu_catalog
    from memplan.training.search import cheapest_gpu, limits_on, smallest_gpu
    from memplan.units import format_bytes

    setup = setup_from_kwargs(kwargs)
    if setup.device != "cuda":
        raise SetupError("memplan fit plans GPUs: use --device cuda")
    catalog = gpu_catalog()
    small, cheap = smallest_gpu(setup, catalog), cheapest_gpu(setup, catalog)
    payload: dict = {
        "smallest_gpu": small.key if small else None,
        "cheapest_gpu": cheap.key if cheap else None,
        "cheapest_usd_per_hour": cheap.usd_per_hour if cheap else None,
    }
    if gpu is not None:
        g = catalog.get(gpu)
        lim = limits_on(setup, g)
        payload["limits"] = {
            "gpu": g.key,
            "usable_bytes": g.usable_bytes,
            "fits_as_given": lim.fits_as_given,
            "max_batch_size": lim.max_batch_size,
            "max_seq_len": lim.max_seq_len,
            "max_lora_rank": lim.max_lora_rank,
        }
    if fmt == "json":
        click.echo(json.dumps(payload, indent=2))
        return
    if small is None:
        click.echo("no single catalog GPU fits this setup (multi-GPU sharding is not modelled)")
    else:
        click.echo(f"smallest GPU that fits: {small.key} ({format_bytes(small.usable_bytes)} usable)")
        click.echo(f"cheapest GPU that fits: {cheap.key} (${cheap.usd_per_hour:.3f}/h, {cheap.price_provider})")
    if "limits" in payload:
        lim_d = payload["limits"]
        click.echo(f"on {lim_d['gpu']}: {'fits' if lim_d['fits_as_given'] else 'does not fit'} as given")
        click.echo(f"  largest batch size (seq {setup.seq_len}): {lim_d['max_batch_size']}")
        click.echo(f"  longest sequence (batch {setup.batch_size}): {lim_d['max_seq_len']}")
        if lim_d["max_lora_rank"] is not None:
            click.echo(f"  highest LoRA rank: {lim_d['max_lora_rank']}")
