"""`memplan sweep`: a grid of setups (flags and/or a YAML/JSON grid file) as CSV,
Parquet or Excel, or a table.

Every grid flag takes a comma list and may be repeated (`--quant bf16,nf4`), except
`--lora-targets`, where each occurrence is ONE target set (`--lora-targets q_proj,v_proj
--lora-targets all-linear`). Booleans take true/false (`--grad-checkpointing true,false`).
Flags replace the same keys of the grid file; the other fleet inputs (popularity,
prompt_tokens, scale_to_zero, ...) are grid-file keys (see `memplan.planning.grid`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click


__all__ = ["grid_options", "grid_from_options", "progress_reporter", "render_table"]

# key -> (flag declarations, help). Keys are memplan.planning.grid.KEYS; flag names are `memplan estimate`'s.
_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "model": (("--model", "-m"), "Catalog names or config.json paths."),
    "method": (("--method",), "full, lora."),
    "quant": (("--quant", "-q"), "bf16, fp16, fp32, int8, nf4, fp4."),
    "double_quant": (("--double-quant",), "true, false (nf4/fp4 only)."),
    "compute_dtype": (("--compute-dtype",), "Compute dtype of a quantized base."),
    "lora_rank": (("--lora-rank", "-r"), "LoRA ranks."),
    "lora_targets": (("--lora-targets",), "ONE target set per flag: q_proj,v_proj | all-linear | default."),
    "lora_dropout": (("--lora-dropout",), "LoRA dropout values."),
    "seq_len": (("--seq-len", "-s"), "Sequence lengths."),
    "batch_size": (("--batch-size", "-b"), "Batch sizes."),
    "grad_checkpointing": (("--grad-checkpointing",), "true, false."),
    "optimizer": (("--optimizer",), "adamw, adamw_8bit, paged_adamw_32bit, paged_adamw_8bit, sgd, sgd_momentum."),
    "attention": (("--attention",), "sdpa, eager, flash, default (transformers' choice per model)."),
    "device": (("--device",), "cuda, cpu."),
    "prepare_kbit_training": (("--prepare-kbit-training",), "true, false."),
    "autocast": (("--autocast",), "none, bf16, fp16 (fp32 bases only: mixed precision)."),
    "gpu": (("--gpu", "-g"), "GPUs to check every setup against [default: the whole catalog]."),
    "variants": (("--variants", "-n"), "Fleet: numbers of fine-tuned variants N."),
    "rps": (("--rps",), "Fleet: requests per second over all variants."),
    "serve_gpu": (("--serve-gpu",), "Fleet: serving GPU."),
    "serve_quant": (("--serve-quant",), "Fleet: serving format of the weights."),
    "engine": (("--engine",), "Fleet: lorax, vllm."),
}


def grid_options(fn: Callable) -> Callable:
    """Every grid flag, plus --grid FILE."""
    for key, (decls, help_text) in reversed(_FLAGS.items()):
        fn = click.option(*decls, key, multiple=True, default=(), metavar="LIST", help=help_text)(fn)
    return click.option("--grid", "grid_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="YAML or JSON grid file (keys: the flag names in snake_case).")(fn)


def grid_from_options(grid_file: Path | None, kwargs: dict[str, Any]) -> Any:
    """Pop the grid flags out of `kwargs`; read and check the grid (raises GridError before any work)."""
    from memplan.errors import MemplanError
    from memplan.planning.grid import load_grid, parse_grid, values_from_text

    flags = {}
    for key in _FLAGS:
        texts = kwargs.pop(key)
        if texts:
            values = values_from_text(key, texts)
            flags[key] = values if len(values) > 1 else values[0]
    if grid_file is not None:
        return load_grid(grid_file, overrides=flags)
    if not flags:
        raise MemplanError("give a grid: --grid grid.yaml, or flags such as --model llama2-7b --quant bf16,nf4")
    return parse_grid(flags, source="flags")


def progress_reporter(enabled: bool | None) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A progress callback drawing a bar on stderr (when it is a terminal, or when asked), and its closer."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None, lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True, force_terminal=bool(enabled)), transient=False)
    task = bar.add_task("sweep", total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop


def refused_lines(frame: Any) -> list[str]:
    """Notes for stderr: what the estimator refused (the five commonest reasons), and why a fleet plan is missing."""
    refused = frame.attrs.get("refused") or {}
    lines: list[str] = []
    if refused:
        top = sorted(refused.items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"note: the estimator refused {sum(refused.values()):,} combinations of the grid:")
        lines += [f"  {n:,} x {reason}" for reason, n in top]
    if "fleet_error" in frame.columns:
        lines += [f"note: no fleet plan: {reason}" for reason in frame["fleet_error"].dropna().unique().tolist()]
    return lines


def render_table(frame: Any) -> str:
    """The varying setup columns, the peak, and the smallest and cheapest GPU, as aligned text."""
    import pandas as pd

    from memplan.planning.grid import FLEET_KEYS, SETUP_KEYS
    from memplan.units import format_bytes

    if frame.empty:
        return "no setup of the grid was accepted by the estimator"
    varying = [c for c in (*SETUP_KEYS, *FLEET_KEYS) if c in frame.columns and (c == "model" or frame[c].nunique() > 1)]
    shown = {**{c: c for c in varying}, "peak_bytes": "peak", "smallest_gpu": "smallest GPU", "cheapest_gpu": "cheapest GPU"}
    if "variants" in frame.columns:
        shown.update({f"usd_per_month.{s}": f"$/month {s}" for s in ("full_finetune", "lora", "lorax")})
    values = {c: frame[c].tolist() for c in shown}

    def text(c: str, v: Any) -> str:
        if v is None or pd.isna(v):
            return "-"
        if c == "peak_bytes":
            return format_bytes(int(v))
        return f"{v:,.0f}" if c.startswith("usd_per_month.") else str(v)

    rows = [[text(c, values[c][i]) for c in shown] for i in range(len(frame))]
    header = list(shown.values())
    widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


@click.command("sweep")
@grid_options
@click.option("--out", "-o", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write .csv, .parquet or .xlsx (by extension); default: print a table.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr [default: when stderr is a terminal].")
def sweep_command(grid_file: Path | None, out: Path | None, progress: bool | None, **kwargs: Any) -> None:
    """Estimate a grid of setups: one row per setup, fits on every GPU, fleet $/month."""
    from memplan.planning.sweep import check_output, sweep_grid, write_sweep

    if out is not None:
        check_output(out)
    grid = grid_from_options(grid_file, kwargs)
    update, close = progress_reporter(progress)
    try:
        frame = sweep_grid(grid, progress=update)
    finally:
        close()
    for line in refused_lines(frame):
        click.echo(line, err=True)
    if out is None:
        click.echo(render_table(frame))
        return
    write_sweep(frame, out)
    click.echo(f"wrote {len(frame):,} rows x {len(grid.gpus)} GPUs to {out}")
