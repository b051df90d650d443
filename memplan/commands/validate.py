"""`memplan validate`: predicted vs measured for the records in `profiles/`.

Also home of the two record tables `memplan profile` prints: the measured
summary and the comparison.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from memplan.commands.options import output_format

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["render_measured", "render_comparison", "run_label"]


def run_label(record: dict[str, Any]) -> str:
    from memplan.measure.profiler.campaign import Job
    from memplan.training.setup import Setup

    return Job(Setup.from_dict(record["setup"]), record.get("layers"), record["steps"]).label()


def _b(value: Any) -> str:
    from memplan.units import format_bytes

    return "-" if value is None else format_bytes(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]
    return "\n".join(lines)


def render_measured(records: list[dict[str, Any]]) -> str:
    """One line per run: outcome and the headline measurements (GiB = 2**30 bytes)."""
    cuda = any(r["setup"]["device"] == "cuda" for r in records)
    header = ["run", "outcome", "weights", "steady peak"]
    if cuda:
        header += ["peak reserved", "NVML peak", "CUDA context"]
    rows = []
    for r in records:
        m = r.get("measured") or {}
        outcome = r["outcome"]
        if outcome == "oom" and (r.get("oom") or {}).get("requested_bytes") is not None:
            outcome = f"oom (+{_b(r['oom']['requested_bytes'])})"
        row = [run_label(r), outcome, _b(m.get("weights_bytes")), _b(m.get("steady_peak_bytes"))]
        if cuda:
            row += [_b(m.get("steady_peak_reserved_bytes")), _b(m.get("nvml_peak_bytes")), _b(m.get("cuda_context_bytes"))]
        rows.append(row)
    return _table(header, rows)


def render_comparison(frame: "pd.DataFrame", fmt: str) -> str:
    import pandas as pd

    if fmt == "json":
        return json.dumps(frame.astype(object).where(frame.notna(), None).to_dict(orient="records"), indent=2)
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if frame.empty:
        return "no ok records to compare"
    out = []
    for run_id, group in frame.groupby("id", sort=False):
        first = group.iloc[0]
        layers = "" if pd.isna(first["layers"]) else f" (first {int(first['layers'])} layers)"
        quant = first["quant"] + ("+dq" if first["double_quant"] else "")
        lora = f" r{first['lora_rank']}:{first['lora_targets'] or 'default'}" if first["method"] == "lora" else ""
        gc = " gc" if first["grad_checkpointing"] else ""
        out.append(f"{first['model']}{layers}  {first['method']} {quant}{lora}  seq {first['seq_len']} batch {first['batch_size']}{gc}  "
                   f"{first['optimizer']}  on {first['device_name']}  [{run_id[:8]}]")
        rows = []
        for _, r in group.iterrows():
            rel = "-" if pd.isna(r["rel_error"]) else f"{100 * r['rel_error']:+.1f}%"
            measured = None if pd.isna(r["measured_bytes"]) else int(r["measured_bytes"])
            rows.append(["  " + r["component"], _b(int(r["predicted_bytes"])), _b(measured), rel])
        out.append(_table(["  component", "predicted", "measured", "error"], rows))
    return "\n".join(out)


def render_extrapolation(records: list[dict[str, Any]], fmt: str) -> str:
    """Full-depth extrapolations of truncated runs against the estimator (and a full-depth run)."""
    from memplan.measure.extrapolate import depth_frame
    from memplan.units import format_bytes

    frame = depth_frame(records)
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return frame.to_json(orient="records", indent=2)
    if frame.empty:
        return "no setup was measured at two or more truncated depths (memplan profile --layers N --layers M)"
    rows = []
    for r in frame.to_dict("records"):
        label = f"{r['model']} {r['method']} {r['quant']}{'+dq' if r['double_quant'] else ''} s{r['seq_len']} b{r['batch_size']}"
        full = "-" if r["measured_full_bytes"] is None or r["measured_full_bytes"] != r["measured_full_bytes"] else (
            f"{format_bytes(int(r['measured_full_bytes']))} ({100 * r['extrapolation_error']:+.2f}%)")
        rows.append([label, r["metric"].replace("_bytes", ""), f"L{r['depths']} -> {r['full_depth']}", format_bytes(r["per_layer_bytes"]),
                     format_bytes(r["extrapolated_bytes"]), format_bytes(r["predicted_bytes"]), f"{100 * r['error_vs_predicted']:+.2f}%", full])
    return _table(["setup", "metric", "depths", "per layer", "extrapolated", "predicted", "pred err", "measured full (extrap. err)"], rows)


@click.command("validate")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, dir_okay=True))
@click.option("--model", "-m", "model_filter", default=None, help="Only records of this model (setup.model).")
@click.option("--device", "device_filter", default=None, help="Only records measured on this device (cuda | cpu).")
@click.option("--measured", is_flag=True, help="Print the measured summary instead of the comparison.")
@click.option("--extrapolate", is_flag=True, help="Extrapolate runs truncated with --layers at two or more depths to full depth, per layer.")
@output_format()
def validate(paths: tuple[str, ...], model_filter: str | None, device_filter: str | None, measured: bool, extrapolate: bool,
             fmt: str) -> None:
    """Predicted vs measured, per component and for the peak (records: PATHS or profiles/)."""
    from memplan.measure.compare import compare_records
    from memplan.measure.records import read_records

    records = read_records(list(paths) if paths else None)
    if model_filter is not None:
        records = [r for r in records if r["setup"]["model"] == model_filter]
    if device_filter is not None:
        records = [r for r in records if r["setup"]["device"] == device_filter]
    if extrapolate:
        click.echo(render_extrapolation(records, fmt))
        return
    if measured:
        if fmt == "table":
            click.echo(render_measured(records) if records else "no records")
        else:
            from memplan.measure.records import records_frame

            frame = records_frame(records)
            click.echo(frame.to_csv(index=False).rstrip("\n") if fmt == "csv" else json.dumps(records, indent=2))
        return
    click.echo(render_comparison(compare_records(records), fmt))
