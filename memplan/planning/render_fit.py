"""Text renderings of `memplan fit` (how far a setup grows, which GPU it needs) and `memplan models` (the catalog).

No formulas: the GPUs, clusters and limits come from `memplan.training.search` (`FitAnswer`), the parameter counts
from `memplan.model`; bytes and counts become text only through `memplan.units`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from memplan.planning.labels import fit_verdict, layout_text
from memplan.units import format_bytes, format_count, format_usd, plural

if TYPE_CHECKING:
    from memplan.model.catalog import CatalogEntry
    from memplan.model.spec import ModelSpec
    from memplan.training.clusters import Cluster, LayoutFit
    from memplan.training.search import FitAnswer
    from memplan.training.setup import Setup

__all__ = ["fit_payload", "render_fit", "model_rows", "render_models"]


def _cluster_row(f: LayoutFit, c: Cluster | None) -> dict[str, Any]:
    """One layout of the cluster search: its settings and its cluster (None fields where nothing fits)."""
    row: dict[str, Any] = {
        "parallel": f.parallel,
        "fsdp_version": f.fsdp_version if f.parallel.startswith("fsdp") else None,
        "quant_storage": f.quant_storage,
        "quant_storage_set": f.quant_storage_set,
        "refused": f.refused,
        "gpu": c.gpu.key if c else None,
        "gpus": c.gpus if c else None,
        "nodes": c.nodes if c else None,
        "gpus_per_node": c.setup.gpus_per_node if c else None,
        "peak_bytes_per_gpu": c.peak_bytes if c else None,
        "usable_bytes": c.gpu.usable_bytes if c else None,
        "headroom_bytes": c.headroom_bytes if c else None,
        "usd_per_hour": c.usd_per_hour if c else None,
        "host_bytes_per_node": c.host_per_node_bytes if c else None,
    }
    return row


def _chosen(answer: FitAnswer, f: LayoutFit) -> Cluster | None:
    """The cluster a layout reports: the fewest of the GPU asked about, else its cheapest."""
    from memplan.training.clusters import best_cluster, cluster_price

    return f.fewest.get(answer.gpu.key) if answer.gpu is not None else best_cluster(f, cluster_price)


def fit_payload(answer: FitAnswer) -> dict[str, Any]:
    """`memplan fit --format json`: the smallest and cheapest single catalog GPU, the cluster search
    (`clusters`, where it ran: per layout best first) and the limits on `--gpu` when given."""
    small, cheap, gpu, limits = answer.smallest, answer.cheapest, answer.gpu, answer.limits
    payload: dict[str, Any] = {
        "smallest_gpu": small.key if small else None,
        "cheapest_gpu": cheap.key if cheap else None,
        "cheapest_usd_per_hour": cheap.usd_per_hour if cheap else None,
        "peak_bytes": answer.peak_bytes,  # per GPU, the setup as given
    }
    if answer.layouts is not None:
        payload["clusters"] = {
            "gpu": gpu.key if gpu is not None else None,
            "ranked_by": "fewest_gpus" if gpu is not None else "usd_per_hour",
            "max_gpus": max((f.max_gpus for f in answer.layouts), default=0),
            "layouts": [{**_cluster_row(f, _chosen(answer, f)),
                         "fewest_gpus_by_type": {k: c.gpus for k, c in sorted(f.fewest.items(), key=lambda kc: kc[1].usd_per_hour)}}
                        for f in answer.layouts],
        }
    if gpu is not None and limits is not None and answer.limits_setup is not None:
        ls = answer.limits_setup
        payload["limits"] = {
            "gpu": gpu.key,
            "usable_bytes": gpu.usable_bytes,
            "fits_as_given": limits.fits_as_given,
            "max_batch_size": limits.max_batch_size,
            "max_seq_len": limits.max_seq_len,
            "max_lora_rank": limits.max_lora_rank,
            # The setup the limits are for (per GPU): the one given, or the best cluster found.
            "gpus": ls.gpus,
            "parallel": ls.parallel,
        }
    return payload


def _where(setup: Setup) -> str:
    """`one GPU`, or `16 GPUs (ZeRO-3)`."""
    return "one GPU" if setup.gpus == 1 and setup.parallel == "none" else \
        f"{plural(setup.gpus, 'GPU')} ({layout_text(setup.parallel, setup.fsdp_version)})"


def _single_lines(answer: FitAnswer) -> list[str]:
    small, cheap, s = answer.smallest, answer.cheapest, answer.setup
    if small is None or cheap is None:
        if s.gpus == 1 and s.parallel == "none":
            return [f"no single catalog GPU fits this setup: {format_bytes(answer.peak_bytes)} at peak"]
        return [f"no catalog GPU fits this setup on {_where(s)}: {format_bytes(answer.peak_bytes)} per GPU at peak"]
    per = "" if s.gpus == 1 and s.parallel == "none" else \
        f" (per GPU, {plural(s.gpus, 'GPU')} under {layout_text(s.parallel, s.fsdp_version)})"
    return [f"smallest GPU that fits: {small.key} ({format_bytes(small.usable_bytes)} usable){per}",
            f"cheapest GPU that fits: {cheap.key} (${cheap.usd_per_hour:.3f}/h, {cheap.price_provider}){per}"]


def _cluster_lines(answer: FitAnswer) -> list[str]:
    gpu, layouts = answer.gpu, answer.layouts or ()
    head = (f"fewest {gpu.key} ({format_bytes(gpu.usable_bytes)} usable) per layout, best first:" if gpu is not None
            else "cheapest cluster per layout (catalog GPUs x counts, by $/hour), best first:")
    rows = [("layout", "cluster", "$/hour", "peak per GPU", "headroom")]
    notes: list[str] = []
    for f in layouts:
        name = layout_text(f.parallel, f.fsdp_version)
        c = _chosen(answer, f)
        if c is not None:
            nodes = f", {plural(c.nodes, 'node')}" if c.nodes > 1 else ""
            rows.append((name, f"{c.gpus} x {c.gpu.key}{nodes}", format_usd(c.usd_per_hour), format_bytes(c.peak_bytes),
                         format_bytes(c.headroom_bytes)))
            if c.host_per_node_bytes:
                notes.append(f"{name}: offloaded state takes {format_bytes(c.host_per_node_bytes)} of host RAM per node")
        elif f.refused is not None:
            rows.append((name, "not possible", "", "", ""))
            notes.append(f"{name}: {f.refused}")
        else:
            rows.append((name, f"none up to {f.max_gpus:,} GPUs", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head] + ["  " + "  ".join(f"{v:<{w}}" if i < 2 else f"{v:>{w}}" for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                      for r in rows]
    set_for = [layout_text(f.parallel, f.fsdp_version) for f in layouts if f.quant_storage_set and f.refused is None]
    if set_for:
        storage = next(f.quant_storage for f in layouts if f.quant_storage_set)
        lines.append(f"--quant-storage {storage} set for {', '.join(set_for)}: they flatten the 4-bit base, "
                     "so bnb_4bit_quant_storage must be the compute dtype")
    lines += notes
    lines.append("peaks are per GPU (--batch-size is per GPU); communication time is not modelled: memplan plan prices the job")
    return lines


def render_fit(answer: FitAnswer, fmt: str) -> str:
    """`memplan fit`: JSON (`fit_payload`) or a few lines of text."""
    payload = fit_payload(answer)
    if fmt == "json":
        return json.dumps(payload, indent=2)
    lines = _single_lines(answer)
    if answer.layouts is not None:
        lines += _cluster_lines(answer)
    if "limits" in payload and answer.limits_setup is not None:
        lim, ls = payload["limits"], answer.limits_setup
        layout = layout_text(ls.parallel, ls.fsdp_version)
        on = lim["gpu"] if ls.gpus == 1 and ls.parallel == "none" else f"{ls.gpus} x {lim['gpu']} ({layout}), per GPU"
        per = " per GPU" if ls.gpus > 1 or ls.parallel != "none" else ""
        lines.append(f"on {on}: {fit_verdict(lim['fits_as_given'])} as given")
        lines.append(f"  largest batch size{per} (seq {ls.seq_len}): {lim['max_batch_size']}")
        lines.append(f"  longest sequence (batch {ls.batch_size}{per}): {lim['max_seq_len']}")
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
