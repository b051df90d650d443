"""Text renderings of `memplan fit` (how far a setup grows, which GPU it needs) and `memplan models` (the catalog).

No formulas: the GPUs and limits come from `memplan.training.search`, the parameter counts
from `memplan.model`; bytes and counts become text only through `memplan.units`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from memplan.planning.labels import fit_verdict
from memplan.units import format_bytes, format_count

if TYPE_CHECKING:
    from memplan.hardware.gpus import GPU
    from memplan.model.catalog import CatalogEntry
    from memplan.model.spec import ModelSpec
    from memplan.training.search import Limits
    from memplan.training.setup import Setup

__all__ = ["fit_payload", "render_fit", "model_rows", "render_models"]


def fit_payload(small: GPU | None, cheap: GPU | None, *, gpu: GPU | None = None, limits: Limits | None = None) -> dict[str, Any]:
    """`memplan fit --format json`: the smallest and cheapest catalog GPU, and the limits on `gpu` when given."""
    payload: dict[str, Any] = {
        "smallest_gpu": small.key if small else None,
        "cheapest_gpu": cheap.key if cheap else None,
        "cheapest_usd_per_hour": cheap.usd_per_hour if cheap else None,
    }
    if gpu is not None and limits is not None:
        payload["limits"] = {
            "gpu": gpu.key,
            "usable_bytes": gpu.usable_bytes,
            "fits_as_given": limits.fits_as_given,
            "max_batch_size": limits.max_batch_size,
            "max_seq_len": limits.max_seq_len,
            "max_lora_rank": limits.max_lora_rank,
        }
    return payload


def render_fit(setup: Setup, small: GPU | None, cheap: GPU | None, fmt: str, *, gpu: GPU | None = None,
               limits: Limits | None = None) -> str:
    """`memplan fit`: JSON (`fit_payload`) or a few lines of text."""
    payload = fit_payload(small, cheap, gpu=gpu, limits=limits)
    if fmt == "json":
        return json.dumps(payload, indent=2)
    if small is None or cheap is None:
        lines = ["no single catalog GPU fits this setup (multi-GPU sharding is not modelled)"]
    else:
        lines = [f"smallest GPU that fits: {small.key} ({format_bytes(small.usable_bytes)} usable)",
                 f"cheapest GPU that fits: {cheap.key} (${cheap.usd_per_hour:.3f}/h, {cheap.price_provider})"]
    if "limits" in payload:
        lim = payload["limits"]
        lines.append(f"on {lim['gpu']}: {fit_verdict(lim['fits_as_given'])} as given")
        lines.append(f"  largest batch size (seq {setup.seq_len}): {lim['max_batch_size']}")
        lines.append(f"  longest sequence (batch {setup.batch_size}): {lim['max_seq_len']}")
        if lim["max_lora_rank"] is not None:
            lines.append(f"  highest LoRA rank: {lim['max_lora_rank']}")
    return "\n".join(lines)


def model_rows(models: Iterable[tuple[CatalogEntry, ModelSpec]]) -> list[dict[str, Any]]:
    """One row per catalog model: name, architecture, total and active parameters, Hugging Face id."""
    return [
        {
            "name": entry.name,
            "architecture": spec.architecture,
            "parameters": spec.total_parameters,
            "active_parameters": spec.active_parameters,
            "hf_id": entry.hf_id,
        }
        for entry, spec in models
    ]


def render_models(models: Iterable[tuple[CatalogEntry, ModelSpec]], fmt: str) -> str:
    """`memplan models`: `model_rows` as JSON or as an aligned table (counts as 6.74B)."""
    rows = model_rows(models)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    w = max(len(r["name"]) for r in rows)
    lines = [f"{'name':<{w}}  {'architecture':<22} {'params':>9} {'active':>9}  hf_id"]
    for r in rows:
        lines.append(
            f"{r['name']:<{w}}  {r['architecture']:<22} {format_count(r['parameters']):>9} "
            f"{format_count(r['active_parameters']):>9}  {r['hf_id'] or '-'}"
        )
    return "\n".join(lines)
