"""Text renderings of a fleet plan (`memplan plan`): a readable table, JSON and CSV, and launch settings.

No formulas: every number is a field of `memplan.serving.fleet`'s `Plan` or `VariantSweep`,
and bytes, dollars, seconds and GPU counts become text only through `memplan.units`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING, Any

from memplan.units import format_bytes, format_gpus, format_seconds, format_usd

if TYPE_CHECKING:
    from memplan.serving.fleet import Plan, VariantSweep
    from memplan.serving.launch import Launch

__all__ = ["render_plan", "render_sweep", "render_launch", "launch_script", "csv_text"]


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV: a header of the first row's keys, `\\n` line ends, no trailing newline."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().rstrip("\n")


def launch_script(launch: Launch, gpu_key: str) -> str:
    """The shared-base plan's launch command under a one-line comment (the CLI's `--emit` and the app print it)."""
    return f"# {launch.replicas} replica(s) of {launch.tp} x {gpu_key}, each:\n{launch.command()}"


def render_launch(launch: Launch, gpu_key: str, fmt: str) -> str:
    """`memplan plan --emit ENGINE`: the launch settings as JSON, or as a shell command."""
    if fmt == "json":
        return json.dumps(launch.to_dict(), indent=2)
    return launch_script(launch, gpu_key)


def render_plan(p: Plan, fmt: str) -> str:
    """One plan: JSON (`Plan.to_dict`), CSV (`frame_rows`, one row per strategy) or a side-by-side table."""
    from memplan.serving.fleet import frame_rows

    if fmt == "json":
        return json.dumps(p.to_dict(), indent=2)
    if fmt == "csv":
        return csv_text(frame_rows(p))
    inp, g = p.inputs, p.gpu
    names = list(p.strategies)
    pop = "uniform" if inp.popularity == "uniform" else f"zipf s={inp.zipf_exponent:g}"
    if g is not None:
        serving = (f"serving on {g.key} ({g.name}, {format_bytes(g.usable_bytes)} usable, ${g.usd_per_hour:g}/h "
                   f"{g.price_provider} {g.price_date}".rstrip() + ")")
    else:
        gpus = sorted({c.gpu for ch in p.choices.values() for c in ch.candidates})
        serving = (f"serving on the cheapest of {len(gpus)} GPUs and tensor-parallel degrees per strategy "
                   "(--gpu restricts the choice; every candidate: --format json, key 'choices')")
    lines = [
        f"{inp.model}: {inp.variants:,} variants, {inp.rps:g} req/s overall ({pop}), {inp.prompt_tokens}+{inp.output_tokens} "
        f"tokens per request, target utilisation {inp.utilization:.0%}",
        f"{serving}, weights in {inp.quant}",
        f"checkpoint {format_bytes(p.checkpoint_bytes, decimal=True)}; LoRA r={inp.lora_rank}: "
        f"{p.lora_trainable_parameters:,} parameters, adapter file {format_bytes(p.adapter_file_bytes, decimal=True)}",
        "",
    ]
    S = [p.strategies[n] for n in names]

    def res(s: Any) -> str:
        r = s.adapters_resident
        return "-" if r is None else f"{r['gpu']:,} GPU / {r['cpu']:,} RAM / {r['disk']:,} disk"

    rows: list[tuple[str, list[str]]] = [
        ("GPUs", [format_gpus(s.gpus) for s in S]),
        ("replica", [f"{s.memory.tp} x {s.gpu.key if s.gpu else ''}, {s.engine}" for s in S]),
        ("replica capacity", [f"{s.throughput.requests_per_s:.2f} req/s, batch {s.throughput.batch}" for s in S]),
        ("$/hour (GPUs)", [format_usd(s.usd_per_hour) for s in S]),
        ("$/month (GPUs + storage)", [format_usd(s.usd_per_month) for s in S]),
        *([("runner-up", [_runner_up(p, n) for n in names])] if g is None else []),
        ("training, one-time", [format_usd(s.training_usd) for s in S]),
        ("storage", [format_bytes(s.storage_bytes, decimal=True) for s in S]),
        ("cold start (load)", [format_seconds(s.cold_start_s) for s in S]),
        ("adapter swap (disk)", [format_seconds(s.swap_latency_s) for s in S]),
        ("adapters resident", [res(s) for s in S]),
        ("GPU miss rate", ["-" if s.adapters is None else f"{s.adapters.gpu_miss_rate:.1%}" for s in S]),
        ("mean swap wait / request", ["-" if s.adapters is None else format_seconds(s.adapters.mean_added_latency_s) for s in S]),
    ]
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(names[i]), *(len(r[1][i]) for r in rows)) for i in range(len(names))]
    lines.append(" " * w0 + "  " + "  ".join(f"{n:>{widths[i]}}" for i, n in enumerate(names)))
    for label, cells in rows:
        lines.append(f"{label:<{w0}}  " + "  ".join(f"{c:>{widths[i]}}" for i, c in enumerate(cells)))
    lines.append("")
    for method, t in p.training.items():
        extra = "" if t.usd is None else f": {t.gpu_hours:.2f} GPU-hours, {format_usd(t.usd)} per variant"
        if t.usd is not None and t.gpus and t.gpus > 1 and t.hours is not None:
            extra += f" ({t.hours:.2f} h on {t.gpus} x {t.gpu})"
        lines.append(f"training ({method}): {t.note}{extra}")
    lines.append("every assumption, with its source: --format json (key 'assumptions'); override with --set NAME=VALUE")
    return "\n".join(lines)


def _runner_up(p: Plan, name: str) -> str:
    """The second-cheapest candidate of a strategy: `tp x gpu: $/month`."""
    r = p.choices[name].runner_up if name in p.choices else None
    return "-" if r is None else f"{r.tp} x {r.gpu}: {format_usd(r.usd_per_month)}"


def render_sweep(sw: VariantSweep, fmt: str) -> str:
    """Plans over N (`memplan plan --sweep-variants`): GPUs, $/month and storage per strategy, and the crossovers."""
    from memplan.serving.fleet import frame_rows

    if fmt == "json":
        return json.dumps(sw.to_dict(), indent=2)
    if fmt == "csv":
        return csv_text(frame_rows(sw))
    names = list(sw.plans[0].strategies)
    several = sw.plans[0].gpu is None  # each strategy chose its GPU: say which

    def gpus(s: Any) -> str:
        return f"{format_gpus(s.gpus)} x {s.gpu.key}" if several and s.gpu is not None else format_gpus(s.gpus)

    header = ["variants"] + [f"{n} {col}" for n in names for col in ("GPUs", "$/month", "storage")]
    body = [
        [f"{p.inputs.variants:,}"] + [cell for s in p.strategies.values()
                                      for cell in (gpus(s), format_usd(s.usd_per_month),
                                                   format_bytes(s.storage_bytes, decimal=True))]
        for p in sw.plans
    ]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(f"{c:>{w}}" for c, w in zip(row, widths)) for row in [header] + body]
    lines.append("")
    if not sw.crossovers:
        lines.append("crossovers: none in this range ($/month)")
    for c in sw.crossovers:
        lines.append(
            f"crossover: {c['cheaper_from']} is cheaper than {c['cheaper_before']} per month from N = {c['variants']:,} "
            f"(between {c['between'][0]:,} and {c['between'][1]:,})"
        )
    return "\n".join(lines)
