"""Text renderings of measured runs: `memplan validate`, `memplan profile` and `memplan calibrate`.

Tables of profile records (the measured summary, predicted vs measured per component,
the full-depth extrapolation, the held-out calibration errors) as aligned text, JSON or
CSV. No formulas: the numbers come from `memplan.measure` (records, compare, extrapolate,
calibrate), and bytes become text only through `memplan.units` (GiB = 2**30 bytes).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from memplan.units import format_bytes, to_gib

if TYPE_CHECKING:
    import pandas as pd

    from memplan.measure.calibrate import Calibration

__all__ = [
    "run_label",
    "text_table",
    "render_measured",
    "render_records",
    "render_comparison",
    "render_extrapolation",
    "render_calibration",
    "outcome_line",
    "render_random_validation",
]


def run_label(record: dict[str, Any]) -> str:
    """The label `memplan profile` gives the record's run (`Setup.label`, and the rank of a sharded run)."""
    from memplan.training.setup import Setup

    rank = record.get("rank")
    return Setup.from_dict(record["setup"]).label(layers=record.get("layers")) + (f" rank {rank}" if rank is not None else "")


def _b(value: Any) -> str:
    return "-" if value is None else format_bytes(value)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned columns two spaces apart: the first left-aligned, the others right-aligned."""
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
    return text_table(header, rows)


def render_records(records: list[dict[str, Any]], fmt: str) -> str:
    """`memplan validate --measured`: the measured summary as a table, the flat records frame as CSV,
    or the records themselves as JSON."""
    if fmt == "table":
        return render_measured(records) if records else "no records"
    if fmt == "csv":
        from memplan.measure.records import records_frame

        return records_frame(records).to_csv(index=False).rstrip("\n")
    return json.dumps(records, indent=2)


def render_comparison(frame: pd.DataFrame, fmt: str) -> str:
    """`memplan.measure.compare.compare_records`' frame: JSON, CSV, or one table per run."""
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
        out.append(f"{first['label']}  on {first['device_name']}  [{run_id[:8]}]")
        rows = []
        for _, r in group.iterrows():
            rel = "-" if pd.isna(r["rel_error"]) else f"{100 * r['rel_error']:+.1f}%"
            measured = None if pd.isna(r["measured_bytes"]) else int(r["measured_bytes"])
            rows.append(["  " + r["component"], _b(int(r["predicted_bytes"])), _b(measured), rel])
        out.append(text_table(["  component", "predicted", "measured", "error"], rows))
    return "\n".join(out)


def render_extrapolation(records: list[dict[str, Any]], fmt: str) -> str:
    """Full-depth extrapolations of truncated runs against the estimator (and a full-depth run)."""
    from memplan.measure.extrapolate import depth_frame

    frame = depth_frame(records)
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return frame.to_json(orient="records", indent=2)
    if frame.empty:
        return "no setup was measured at two or more truncated depths (memplan profile --layers N --layers M)"
    rows = []
    for r in frame.to_dict("records"):
        label = r["label"]
        full = "-" if r["measured_full_bytes"] is None or r["measured_full_bytes"] != r["measured_full_bytes"] else (
            f"{format_bytes(int(r['measured_full_bytes']))} ({100 * r['extrapolation_error']:+.2f}%)")
        rows.append([label, r["metric"].replace("_bytes", ""), f"L{r['depths']} -> {r['full_depth']}", format_bytes(r["per_layer_bytes"]),
                     format_bytes(r["extrapolated_bytes"]), format_bytes(r["predicted_bytes"]), f"{100 * r['error_vs_predicted']:+.2f}%", full])
    return text_table(["setup", "metric", "depths", "per layer", "extrapolated", "predicted", "pred err", "measured full (extrap. err)"], rows)


def render_calibration(cal: Calibration, fmt: str) -> str:
    """`memplan calibrate`: the fitted CUDA terms and the error on every held-out record, worst first."""
    summary = cal.summary()
    if fmt == "json":
        rows = [r.__dict__ | {"allocated_error": r.allocated_error, "nvml_error": r.nvml_error} for r in cal.rows]
        return json.dumps({"summary": summary, "rows": rows}, indent=2)
    t = cal.terms
    lines = [
        f"CUDA context: {format_bytes(t.cuda_context_bytes)}; allocator slack: {100 * t.allocator_fraction:.2f}% of the allocated peak",
        f"fitted on {summary['fit_records']} records; errors below are on the {summary['held_out_records']} held-out records",
        f"{'setup':<62} {'pred GiB':>9} {'meas GiB':>9} {'err':>7} {'NVML err':>9}",
    ]
    for r in sorted(cal.held_out(), key=lambda r: -abs(r.allocated_error)):
        nv = f"{100 * r.nvml_error:+.1f}%" if r.nvml_error is not None else "-"
        lines.append(f"{r.label[:62]:<62} {to_gib(r.predicted_allocated):>9.2f} {to_gib(r.measured_allocated):>9.2f} "
                     f"{100 * r.allocated_error:>+6.1f}% {nv:>9}")
    if summary["allocated_median_abs_error"] is not None:
        lines.append(
            f"allocated peak: median |error| {100 * summary['allocated_median_abs_error']:.2f}%, max {100 * summary['allocated_max_abs_error']:.2f}%"
            + (f"; NVML total: median {100 * summary['nvml_median_abs_error']:.2f}%, max {100 * summary['nvml_max_abs_error']:.2f}%"
               if summary["nvml_median_abs_error"] is not None else "")
        )
    return "\n".join(lines)


def outcome_line(record: dict[str, Any]) -> str:
    """One profile run as `memplan profile` reports it while the campaign runs: outcome, detail, duration."""
    m = record.get("measured") or {}
    if record["outcome"] == "error":
        detail = (record.get("error") or {}).get("message", "")[:160]
    elif record["outcome"] == "oom":
        detail = f"in phase {(record.get('oom') or {}).get('phase')}"
    else:
        peak = m.get("steady_peak_bytes")
        detail = f"steady peak {format_bytes(peak)}" if peak is not None else ""
    return f"{record['outcome']:<5} {detail} ({record['duration_s']:.0f} s)"


def render_random_validation(frame: pd.DataFrame, *, seed: int) -> str:
    """`memplan validate --random`: one line per drawn run (largest steady-peak |error| first), then
    median / p95 / max |error| overall, for the claimed families, and per family."""
    from memplan.measure.stats import error_stats

    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    lines = []
    ok = frame[frame.outcome == "ok"].copy()
    ok["abs_err"] = ok.peak_rel_error.abs()
    for _, r in ok.sort_values("abs_err", ascending=False).iterrows():
        tag = "" if r["claimed"] else " (not claimed)"
        lines.append(f"{r['family']:<8} {r['label'][:90]:<90} pred {format_bytes(int(r['peak_predicted_bytes'])):>10}  "
                     f"meas {format_bytes(int(r['peak_measured_bytes'])):>10}  {100 * r['peak_rel_error']:+7.2f}%{tag}")
    for _, r in frame[frame.outcome != "ok"].iterrows():
        lines.append(f"{r['family']:<8} {r['label'][:90]:<90} {r['outcome']}: {str(r['error_message'])[:160]}")
    groups = [("all families", ok), ("claimed (" + ", ".join(sorted(set(ok[ok.claimed].family))) + ")", ok[ok.claimed])]
    groups += [(fam, ok[ok.family == fam]) for fam in sorted(set(frame.family))]
    lines.append(f"steady-state peak |error|, seed {seed} ({len(ok)} ok of {len(frame)} runs):")
    for name, sub in groups:
        st = error_stats(sub.peak_rel_error)
        if st is not None:
            lines.append(f"  {name:<40} n={st.count:<4} median {pct(st.median_abs):>7}  p95 {pct(st.p95_abs):>7}  "
                         f"max {pct(st.max_abs):>7}  mean {100 * st.mean:+.2f}%")
    return "\n".join(lines)
