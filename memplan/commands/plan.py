"""`memplan plan`: N fine-tuned variants under full fine-tuning, LoRA and LoRAX, side by side."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import click

from memplan.units import format_gpus, format_seconds, format_usd
from memplan.commands.options import output_format
from memplan.errors import MemplanError, SetupError

__all__ = ["plan_command", "render_plan", "render_sweep"]


def _parse_variants_list(text: str) -> list[int]:
    out = []
    for item in text.split(","):
        item = item.strip().replace("_", "")
        if not item:
            continue
        try:
            n = int(item)
        except ValueError:
            raise SetupError(f"--sweep-variants '{text}' must be a comma list of positive integers, e.g. 1,10,100") from None
        if n < 1:
            raise SetupError(f"--sweep-variants must be positive integers, got {n}")
        out.append(n)
    if not out:
        raise SetupError("--sweep-variants is empty; give a comma list such as 1,10,100,1000")
    return out


def _parse_sets(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise SetupError(f"--set '{item}' must look like NAME=VALUE, e.g. decode_bandwidth_efficiency=0.7")
        out[name.strip()] = value.strip()
    return out


def _load_catalog(path: str | None, prices: tuple[str, ...], storage_price: float | None) -> Any:
    from dataclasses import replace

    from memplan.hardware.gpus import load_gpu_catalog, parse_price_overrides

    try:
        cat = load_gpu_catalog(path)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # fields of the wrong type in a user file
        raise MemplanError(f"GPU catalog {path} is malformed ({type(exc).__name__}: {exc}); see data/gpus.json for the format") from None
    if prices:
        cat = cat.with_prices(parse_price_overrides(prices))
    if storage_price is not None:
        if not storage_price >= 0 or storage_price == float("inf"):
            raise SetupError(f"--storage-price must be a non-negative USD per GB-month, got {storage_price!r}")
        cat = replace(cat, storage_usd_per_gb_month=storage_price)
    return cat


@click.command("plan")
@click.option("--model", "-m", required=True, help="Catalog name (see `memplan models`), a config.json path, or a folder with one.")
@click.option("--variants", "-n", type=int, default=None, help="Number of fine-tuned variants N.")
@click.option("--gpu", "-g", required=True, help="Serving GPU from the catalog (e.g. a10g, a100-80gb, h100).")
@click.option("--rps", type=float, required=True, help="Requests per second over all variants.")
@click.option("--popularity", type=click.Choice(["uniform", "zipf"]), default="uniform", show_default=True, help="How traffic spreads over variants.")
@click.option("--zipf-exponent", type=float, default=1.0, show_default=True, help="Zipf exponent s (share of variant i ~ i^-s).")
@click.option("--prompt-tokens", type=int, default=1024, show_default=True, help="Prompt tokens per request.")
@click.option("--output-tokens", type=int, default=128, show_default=True, help="Generated tokens per request.")
@click.option("--utilization", type=float, default=0.7, show_default=True, help="Target utilisation of each replica's capacity.")
@click.option("--quant", "-q", default="bf16", show_default=True, help="Serving format of the weights: bf16 | fp16 | fp32 | int8 | nf4 | fp4.")
@click.option("--lora-rank", "-r", type=int, default=8, show_default=True, help="LoRA rank r.")
@click.option("--lora-targets", default=None, help="Comma list (q_proj,v_proj) or all-linear; default: PEFT's per-family default.")
@click.option("--train-quant", default="bf16", show_default=True, help="Base format for LoRA training (nf4 = QLoRA).")
@click.option("--scale-to-zero/--no-scale-to-zero", default=False, show_default=True, help="Let idle deployments scale to zero.")
@click.option("--dataset-tokens", type=int, default=10_000_000, show_default=True, help="Fine-tuning dataset size in tokens.")
@click.option("--epochs", type=float, default=3.0, show_default=True, help="Passes over the dataset.")
@click.option("--train-gpu", default=None, help="Training GPU (default: the cheapest catalog GPU that fits the job).")
@click.option("--engine", type=click.Choice(["lorax", "vllm"]), default=None, help="Engine of the shared-base strategy (default: --emit's, else lorax).")
@click.option("--price", multiple=True, metavar="GPU=USD", help="Override a GPU's price per hour (repeatable).")
@click.option("--gpu-catalog", default=None, type=click.Path(dir_okay=False), help="Your own GPU catalog JSON (format of data/gpus.json).")
@click.option("--storage-price", type=float, default=None, help="Storage USD per GB-month (default: the catalog's).")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override an assumption of data/serving.json (repeatable).")
@click.option("--sweep-variants", default=None, help="Comma list of N to sweep, e.g. 1,10,100,1000,10000.")
@click.option("--emit", type=click.Choice(["lorax", "vllm"]), default=None, help="Print the launch settings of the shared-base plan.")
@output_format()
def plan_command(fmt: str, sweep_variants: str | None, emit: str | None, engine: str | None, price: tuple[str, ...],
                 gpu_catalog: str | None, storage_price: float | None, sets: tuple[str, ...], lora_targets: str | None,
                 **kwargs: Any) -> None:
    """GPUs, $/month, training $, storage and latency of N variants: full fine-tuning vs LoRA vs LoRAX."""
    from memplan.serving.fleet import PlanInputs, plan, sweep_variants as plan_over_variants
    from memplan.serving.memory import assumptions

    if engine is not None and emit is not None and engine != emit:
        raise SetupError(f"--engine {engine} and --emit {emit} disagree; drop --engine or make them the same")
    if sweep_variants is not None and emit is not None:
        raise SetupError("--emit needs one plan; use --variants N instead of --sweep-variants")
    ns = _parse_variants_list(sweep_variants) if sweep_variants is not None else None
    if kwargs["variants"] is None:
        if ns is None:
            raise SetupError("give --variants N (or --sweep-variants 1,10,100)")
        kwargs["variants"] = ns[0]
    targets = None
    if lora_targets is not None:
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        if not targets:
            raise SetupError("--lora-targets is empty; give module names (e.g. q_proj,v_proj) or all-linear")
    cat = _load_catalog(gpu_catalog, price, storage_price)
    a = assumptions().override(_parse_sets(sets)) if sets else assumptions()
    inp = PlanInputs(engine=engine or emit or "lorax", lora_targets=targets, **kwargs)
    if ns is not None:
        click.echo(render_sweep(plan_over_variants(inp, ns, catalog=cat, assumptions=a), fmt))
        return
    result = plan(inp, catalog=cat, assumptions=a)
    if emit is not None:
        from memplan.serving.launch import launch_settings

        launch = launch_settings(result, emit)
        if fmt == "json":
            click.echo(json.dumps(launch.to_dict(), indent=2))
        else:
            click.echo(f"# {launch.replicas} replica(s) of {launch.tp} x {result.gpu.key}, each:")
            click.echo(launch.command())
        return
    click.echo(render_plan(result, fmt))


# ---- rendering (no formulas: numbers come from memplan.serving.fleet) --------------------------------


_usd = format_usd
_secs = format_seconds
_gpus = format_gpus


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().rstrip("\n")


def render_plan(p: Any, fmt: str) -> str:
    from memplan.serving.fleet import frame_rows
    from memplan.units import format_bytes

    if fmt == "json":
        return json.dumps(p.to_dict(), indent=2)
    if fmt == "csv":
        return _csv(frame_rows(p))
    inp, g = p.inputs, p.gpu
    names = list(p.strategies)
    pop = "uniform" if inp.popularity == "uniform" else f"zipf s={inp.zipf_exponent:g}"
    lines = [
        f"{inp.model}: {inp.variants:,} variants, {inp.rps:g} req/s overall ({pop}), {inp.prompt_tokens}+{inp.output_tokens} "
        f"tokens per request, target utilisation {inp.utilization:.0%}",
        f"serving on {g.key} ({g.name}, {format_bytes(g.usable_bytes)} usable, ${g.usd_per_hour:g}/h "
        f"{g.price_provider} {g.price_date}".rstrip() + f"), weights in {inp.quant}",
        f"checkpoint {format_bytes(p.checkpoint_bytes, decimal=True)}; LoRA r={inp.lora_rank}: "
        f"{p.lora_trainable_parameters:,} parameters, adapter file {format_bytes(p.adapter_file_bytes, decimal=True)}",
        "",
    ]
    rows: list[tuple[str, list[str]]] = []
    S = [p.strategies[n] for n in names]

    def res(s: Any) -> str:
        r = s.adapters_resident
        return "-" if r is None else f"{r['gpu']:,} GPU / {r['cpu']:,} RAM / {r['disk']:,} disk"

    rows += [
        ("GPUs", [_gpus(s.gpus) for s in S]),
        ("replica", [f"{s.memory.tp} x {g.key}, {s.engine}" for s in S]),
        ("replica capacity", [f"{s.throughput.requests_per_s:.2f} req/s, batch {s.throughput.batch}" for s in S]),
        ("$/hour (GPUs)", [_usd(s.usd_per_hour) for s in S]),
        ("$/month (GPUs + storage)", [_usd(s.usd_per_month) for s in S]),
        ("training, one-time", [_usd(s.training_usd) for s in S]),
        ("storage", [format_bytes(s.storage_bytes, decimal=True) for s in S]),
        ("cold start (load)", [_secs(s.cold_start_s) for s in S]),
        ("adapter swap (disk)", [_secs(s.swap_latency_s) for s in S]),
        ("adapters resident", [res(s) for s in S]),
        ("GPU miss rate", ["-" if s.adapters is None else f"{s.adapters.gpu_miss_rate:.1%}" for s in S]),
        ("mean swap wait / request", ["-" if s.adapters is None else _secs(s.adapters.mean_added_latency_s) for s in S]),
    ]
    w0 = max(len(r[0]) for r in rows)
    widths = [max(len(names[i]), *(len(r[1][i]) for r in rows)) for i in range(len(names))]
    lines.append(" " * w0 + "  " + "  ".join(f"{n:>{widths[i]}}" for i, n in enumerate(names)))
    for label, cells in rows:
        lines.append(f"{label:<{w0}}  " + "  ".join(f"{c:>{widths[i]}}" for i, c in enumerate(cells)))
    lines.append("")
    for method, t in p.training.items():
        extra = "" if t.usd is None else f": {t.gpu_hours:.2f} GPU-hours, {_usd(t.usd)} per variant"
        lines.append(f"training ({method}): {t.note}{extra}")
    lines.append("every assumption, with its source: --format json (key 'assumptions'); override with --set NAME=VALUE")
    return "\n".join(lines)


def render_sweep(sw: Any, fmt: str) -> str:
    from memplan.serving.fleet import frame_rows
    from memplan.units import format_bytes

    if fmt == "json":
        return json.dumps(sw.to_dict(), indent=2)
    if fmt == "csv":
        return _csv(frame_rows(sw))
    names = list(sw.plans[0].strategies)
    header = ["variants"] + [f"{n} {col}" for n in names for col in ("GPUs", "$/month", "storage")]
    body = [
        [f"{p.inputs.variants:,}"] + [cell for s in p.strategies.values()
                                      for cell in (_gpus(s.gpus), _usd(s.usd_per_month), format_bytes(s.storage_bytes, decimal=True))]
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
