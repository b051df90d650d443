"""`memplan plan`: N fine-tuned variants under full fine-tuning, LoRA, LoRAX and vLLM multi-LoRA, side by side."""

from __future__ import annotations

from typing import Any

import click

from memplan.commands.options import MODEL_HELP, output_format
from memplan.model.storage import QUANTS
from memplan.planning.labels import PLAN_DEFAULTS, choices_text
from memplan.serving.launch import ENGINES
from memplan.errors import MemplanError, SetupError

__all__ = ["plan_command"]


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


def _override(a: Any, sets: tuple[str, ...]) -> Any:
    """The assumptions with --set applied; a refused value names the flag it came from."""
    values = _parse_sets(sets)
    try:
        return a.override(values)
    except MemplanError as exc:
        given = " ".join(f"--set {k}={v}" for k, v in values.items())
        raise SetupError(f"{given}: {exc}") from None


def _load_catalog(path: str | None, prices: tuple[str, ...], storage_price: float | None) -> Any:
    from memplan.hardware.gpus import load_gpu_catalog, parse_price_overrides

    cat = load_gpu_catalog(path)  # every field checked once, in GPU.__post_init__ and the catalog's parser
    if prices:
        cat = cat.with_prices(parse_price_overrides(prices))
    if storage_price is not None:
        cat = cat.with_storage_price(storage_price)
    return cat


@click.command("plan")
@click.option("--model", "-m", required=True, help=MODEL_HELP)
@click.option("--variants", "-n", type=int, default=None, help="Number of fine-tuned variants N.")
@click.option("--gpu", "-g", "gpu", multiple=True, help="Serving GPU to choose from (repeatable, e.g. -g a10g -g h100); default: every catalog GPU, the cheapest per strategy.")
@click.option("--rps", type=float, required=True, help="Requests per second over all variants.")
@click.option("--popularity", type=click.Choice(["uniform", "zipf"]), default=PLAN_DEFAULTS["popularity"], show_default=True, help="How traffic spreads over variants.")
@click.option("--zipf-exponent", type=float, default=PLAN_DEFAULTS["zipf_exponent"], show_default=True, help="Zipf exponent s (share of variant i ~ i^-s).")
@click.option("--prompt-tokens", type=int, default=PLAN_DEFAULTS["prompt_tokens"], show_default=True, help="Prompt tokens per request.")
@click.option("--output-tokens", type=int, default=PLAN_DEFAULTS["output_tokens"], show_default=True, help="Generated tokens per request.")
@click.option("--utilization", type=float, default=PLAN_DEFAULTS["utilization"], show_default=True, help="Target utilisation of each replica's capacity.")
@click.option("--quant", "-q", default=PLAN_DEFAULTS["quant"], show_default=True, help="Serving format of the weights: " + choices_text(QUANTS) + ".")
@click.option("--lora-rank", "-r", type=int, default=PLAN_DEFAULTS["lora_rank"], show_default=True, help="LoRA rank r.")
@click.option("--lora-targets", default=None, help="Comma list (q_proj,v_proj) or all-linear; default: PEFT's per-family default.")
@click.option("--train-quant", default=PLAN_DEFAULTS["train_quant"], show_default=True, help="Base format for LoRA training (nf4 = QLoRA).")
@click.option("--scale-to-zero/--no-scale-to-zero", default=PLAN_DEFAULTS["scale_to_zero"], show_default=True, help="Let idle deployments scale to zero.")
@click.option("--dataset-tokens", type=int, default=PLAN_DEFAULTS["dataset_tokens"], show_default=True, help="Fine-tuning dataset size in tokens.")
@click.option("--epochs", type=float, default=PLAN_DEFAULTS["epochs"], show_default=True, help="Passes over the dataset.")
@click.option("--train-gpu", default=None, help="Training GPU (default: the cheapest catalog GPU that fits the job).")
@click.option("--engine", type=click.Choice(ENGINES), default=None, hidden=True, help="Deprecated: LoRAX and vLLM are the strategies lorax and vllm_multi_lora.")
@click.option("--max-loras", type=int, default=None, help="vllm_multi_lora: LoRA slots on the GPU (default: sized by the plan).")
@click.option("--max-lora-rank", type=int, default=None, help="vllm_multi_lora: slot rank, rounded up to vLLM's allowed ranks (default: --lora-rank's).")
@click.option("--max-cpu-loras", type=int, default=None, help="vllm_multi_lora: adapters in the host-RAM LRU cache (default: host_adapter_cache_bytes' worth).")
@click.option("--price", multiple=True, metavar="GPU=USD", help="Override a GPU's price per hour (repeatable).")
@click.option("--gpu-catalog", default=None, type=click.Path(dir_okay=False), help="Your own GPU catalog JSON (format of data/gpus.json).")
@click.option("--storage-price", type=float, default=None, help="Storage USD per GB-month (default: the catalog's).")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="Override an assumption of data/serving.json (repeatable).")
@click.option("--sweep-variants", default=None, help="Comma list of N to sweep, e.g. 1,10,100,1000,10000.")
@click.option("--emit", type=click.Choice(ENGINES), default=None, help="Print the launch settings of the lorax or the vllm_multi_lora strategy.")
@output_format()
def plan_command(fmt: str, sweep_variants: str | None, emit: str | None, engine: str | None, price: tuple[str, ...],
                 gpu_catalog: str | None, storage_price: float | None, sets: tuple[str, ...], lora_targets: str | None,
                 gpu: tuple[str, ...], **kwargs: Any) -> None:
    """GPUs, $/month, training $, storage and latency of N variants: full fine-tuning vs LoRA vs LoRAX vs vLLM
    multi-LoRA, each on its cheapest GPU (of --gpu, else of the catalog)."""
    from memplan.planning.render_plan import render_plan, render_sweep
    from memplan.serving.fleet import PlanInputs, plan, sweep_variants as plan_over_variants
    from memplan.serving.memory import assumptions

    if engine is not None:
        click.echo(f"memplan: warning: --engine is deprecated and ignored: the plan shows LoRAX as 'lorax' and vLLM as "
                   f"'vllm_multi_lora'; --emit {engine} prints its launch settings", err=True)
    if sweep_variants is not None and emit is not None:
        raise SetupError("--emit needs one plan; use --variants N instead of --sweep-variants")
    ns = _parse_variants_list(sweep_variants) if sweep_variants is not None else None
    if kwargs["variants"] is None:
        if ns is None:
            raise SetupError("give --variants N (or --sweep-variants 1,10,100)")
        kwargs["variants"] = ns[0]
    from memplan.model.lora import parse_lora_targets

    targets = parse_lora_targets(lora_targets)
    cat = _load_catalog(gpu_catalog, price, storage_price)
    a = _override(assumptions(), sets) if sets else assumptions()
    inp = PlanInputs(gpu=(gpu[0] if len(gpu) == 1 else gpu) or None, lora_targets=targets, **kwargs)
    if ns is not None:
        click.echo(render_sweep(plan_over_variants(inp, ns, catalog=cat, assumptions=a), fmt))
        return
    result = plan(inp, catalog=cat, assumptions=a)
    if emit is not None:
        from memplan.planning.render_plan import render_launch
        from memplan.serving.launch import launch_settings

        launch = launch_settings(result, emit)
        click.echo(render_launch(launch, launch.gpu, fmt))
        return
    click.echo(render_plan(result, fmt))
