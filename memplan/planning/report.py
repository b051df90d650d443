"""`memplan report`: one self-contained HTML file for a grid (plotly.js inlined once, gzipped;
nothing is fetched when the file is opened; each chart is a JSON block that one script draws).

Sections: a summary table per model; peak memory against sequence length, one line
per base format; a heatmap of the share of setups that fit on each GPU; $/month
against the number of variants for the four fleet strategies; the estimator's
accuracy on the measured runs in `profiles/`; the assumptions and the memplan
version. Every number is a column of `memplan.planning.sweep` or a field of a library result
(`memplan.measure.compare`, `memplan.measure.calibrate`); bytes become text only through `memplan.units`.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from memplan.errors import MemplanError
from memplan.planning.grid import Grid
from memplan.units import GIB, format_bytes, format_count, format_usd, log_ticks

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

__all__ = ["CHART_IDS", "build_report", "write_report", "load_profile_records", "memplan_version"]

CHART_IDS = {"memory": "chart-memory-vs-context", "fits": "chart-fits-heatmap", "cost": "chart-cost-vs-variants",
             "calibration": "chart-calibration"}
_FACETS_PER_ROW = 3
_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem}h2{margin-top:2.5rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0 1.2rem;font-size:.88rem}th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right}
th{background:#f4f4f4}td{white-space:nowrap}td.l,th.l{text-align:left}td.l{white-space:normal}td.n{text-align:left}.note{color:#555;font-size:.9rem}.muted{color:#777}"""


def memplan_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memplan")
    except PackageNotFoundError:
        from memplan import __version__

        return __version__


def load_profile_records(profiles: str | Path | None = None) -> list[dict[str, Any]]:
    """Validated records of `profiles` (a .jsonl file or a folder; default: the shipped records
    plus ./profiles/, empty if there are none)."""
    from memplan.measure.records import read_records

    return read_records(profiles)


# ---- HTML helpers ---------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str) -> str:
    """A plain HTML table; `align` has one letter per column: l (text), n (text kept on one line), r (numbers)."""
    th = ['<th class="l">' if a != "r" else "<th>" for a in align]
    td = [f'<td class="{a}">' if a != "r" else "<td>" for a in align]
    head = "".join(f"{th[j]}{_e(h)}</th>" for j, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"{td[j]}{_e(v)}</td>" for j, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure_html(fig: "go.Figure", div_id: str) -> str:
    """An empty chart div and the figure as JSON beside it; `_PLOTLY_LOADER` draws it once plotly.js
    is unpacked. `<\\/` keeps a `</script>` inside a model name from ending the JSON block."""
    height = fig.layout.height or 450
    data = fig.to_json(validate=False, pretty=False, remove_uids=True).replace("</", "<\\/")
    return (f'<div id="{_e(div_id)}" class="plotly-graph-div" style="height:{int(height)}px;width:100%"></div>'
            f'<script type="application/json" class="memplan-figure" data-div="{_e(div_id)}">{data}</script>')


def _plotlyjs_gzip_base64() -> str:
    """plotly.js (4.8 MB minified) gzipped and base64-encoded: about 2 MB, unpacked by the browser."""
    import base64
    import gzip

    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


# Unpacks plotly.js once (DecompressionStream: Chrome 80, Firefox 113, Safari 16.4 and later), runs it,
# then draws every chart from its JSON block. It sits at the end of the body, so the tables show first.
_PLOTLY_LOADER = """(async () => {
  const figs = Array.from(document.querySelectorAll('script.memplan-figure'));
  try {
    const b64 = document.getElementById('memplan-plotlyjs').textContent;
    const bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const js = await new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'))).text();
    const lib = document.createElement('script');
    lib.textContent = js;
    document.head.appendChild(lib);
  } catch (err) {
    for (const f of figs) document.getElementById(f.dataset.div).textContent =
      'This browser cannot unpack the charts (it needs DecompressionStream: Chrome 80, Firefox 113, Safari 16.4 or later): ' + err;
    return;
  }
  for (const f of figs) {
    const fig = JSON.parse(f.textContent);
    Plotly.newPlot(f.dataset.div, fig.data, fig.layout, {displaylogo: false, responsive: true});
  }
})();"""


def _na(x: Any) -> bool:
    import pandas as pd

    return x is None or bool(pd.isna(x))


def _shown(x: Any) -> str:
    return "-" if _na(x) else str(x)


def _number(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return f"{int(v):,}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _share(flags: "pd.Series") -> str:
    return f"{flags.mean():.0%}" if len(flags) else "-"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _reference(rows: "pd.DataFrame", dims: Sequence[str], cover: str) -> tuple["pd.DataFrame", dict[str, Any]]:
    """Narrow `rows` to one value per dimension: the value that keeps the most distinct values of
    `cover` (each a line of the chart), then the most rows; the first on ties. A row whose value
    is NA (the option does not apply to it, e.g. the rank of full fine-tuning) matches any value."""
    fixed: dict[str, Any] = {}
    for d in dims:
        if d not in rows.columns:
            continue
        values = rows[d].dropna().drop_duplicates().tolist()
        if len(values) <= 1:
            continue
        best: tuple[int, int] | None = None
        for value in values:
            sub = rows[(rows[d] == value).fillna(False) | rows[d].isna()]
            score = (sub[cover].nunique(), len(sub))
            if best is None or score > best:
                best, keep, fixed[d] = score, sub, value
        rows = keep
    return rows, fixed


def _fixed_text(fixed: dict[str, Any]) -> str:
    return ", ".join(f"{k} {'NA' if _na(v) else v}" for k, v in fixed.items()) or "nothing else varies"


def _facets(n: int, titles: Sequence[str], *, height: int = 320) -> "go.Figure":
    from plotly.subplots import make_subplots

    cols = min(_FACETS_PER_ROW, max(n, 1))
    rows = -(-max(n, 1) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=0.09, vertical_spacing=0.16 / rows * 2)
    fig.update_layout(height=height * rows + 80, template="plotly_white", margin=dict(l=60, r=20, t=60, b=50))
    return fig


# ---- sections ------------------------------------------------------------------------------------


def _summary(frame: "pd.DataFrame", per_setup: int) -> str:
    """One table per model, one row per (method, base format, rank, targets). `per_setup`: rows per
    training setup (the fleet inputs repeat each setup)."""
    parts = []
    keys = ["method", "quant", "double_quant", "lora_rank", "lora_targets"]
    for model, rows in frame.groupby("model", observed=True, sort=False):
        body = []
        for key, g in rows.groupby(keys, observed=True, sort=False, dropna=False):
            method, quant, dq, rank, targets = key
            lo, hi = g.loc[g["peak_bytes"].idxmin()], g.loc[g["peak_bytes"].idxmax()]
            adapter = g["adapter_file_bytes.bf16"].iloc[0]
            body.append([
                method, f"{quant} + double quant" if dq else quant, _shown(rank), _shown(targets),
                f"{len(g) // per_setup:,}", format_bytes(int(lo["peak_bytes"])), format_bytes(int(hi["peak_bytes"])),
                format_count(int(g["trainable_parameters"].iloc[0])), "-" if _na(adapter) else format_bytes(int(adapter), decimal=True),
                _share(g.loc[g["device"] == "cuda", "smallest_gpu"].notna()),
                "none" if _na(lo["cheapest_gpu"]) else lo["cheapest_gpu"],
                "none" if _na(hi["cheapest_gpu"]) else hi["cheapest_gpu"],
            ])
        parts.append(f"<h3>{_e(model)}</h3>" + _table(
            ["method", "base", "rank", "targets", "setups", "lowest peak", "highest peak", "trainable", "adapter file (bf16)",
             "fit a GPU", "cheapest GPU, lowest peak", "cheapest GPU, highest peak"], body, align="nnnnrrrrrrnn"))
    return "".join(parts) or '<p class="note">No setup of the grid was accepted by the estimator.</p>'


def _memory_chart(frame: "pd.DataFrame") -> tuple[str, str]:
    import plotly.graph_objects as go

    models = list(frame["model"].cat.categories)
    fig = _facets(len(models), models)
    quants = list(frame["quant"].cat.categories)
    colors = dict(zip(quants, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")))
    notes = []
    legend: set[str] = set()
    dims = ["method", "double_quant", "compute_dtype", "lora_rank", "lora_targets", "lora_dropout", "batch_size",
            "grad_checkpointing", "optimizer", "attention", "device", "prepare_kbit_training", "autocast"]
    for i, model in enumerate(models):
        rows, fixed = _reference(frame[frame["model"] == model], dims, cover="quant")
        for quant in quants:
            q = rows[rows["quant"] == quant].drop_duplicates("seq_len").sort_values("seq_len")
            if q.empty:
                continue
            fig.add_trace(go.Scatter(
                x=q["seq_len"], y=q["peak_bytes"] / GIB, mode="lines+markers", name=quant, legendgroup=quant,
                showlegend=quant not in legend,
                line=dict(color=colors.get(quant)), customdata=[format_bytes(int(v)) for v in q["peak_bytes"]],
                hovertemplate="seq %{x}: %{customdata}<extra>" + _e(quant) + "</extra>",
            ), row=i // _FACETS_PER_ROW + 1, col=i % _FACETS_PER_ROW + 1)
            legend.add(quant)
        notes.append(f"<li>{_e(model)}: {_e(_fixed_text(fixed))}</li>")
    seq = sorted(frame["seq_len"].unique().tolist())
    fig.update_xaxes(title_text="sequence length (tokens)", type="log", tickvals=seq, ticktext=[f"{v:,}" for v in seq])
    fig.update_yaxes(rangemode="tozero")
    fig.update_yaxes(title_text="peak (GiB)", col=1)
    note = f'<p class="note">Other inputs held at one value per model (the value that keeps the most lines):</p><ul class="note">{"".join(notes)}</ul>'
    return _figure_html(fig, CHART_IDS["memory"]), note


def _fits_chart(frame: "pd.DataFrame", gpus: Sequence[str]) -> str:
    import plotly.graph_objects as go

    cuda = frame[frame["device"] == "cuda"]
    if cuda.empty:
        return '<p class="note">No CUDA setups in the grid: nothing to fit on a GPU.</p>'
    labels, z = [], []
    for key, g in cuda.groupby(["model", "method", "quant"], observed=True, sort=False):
        labels.append(" · ".join(str(k) for k in key))
        z.append([float(g[f"fits.{gpu}"].astype("float64").mean()) for gpu in gpus])
    fig = go.Figure(go.Heatmap(
        z=z, x=list(gpus), y=labels, zmin=0, zmax=1, colorscale="RdYlGn", colorbar=dict(title="fit", tickformat=".0%"),
        text=[[f"{v:.0%}" for v in r] for r in z], texttemplate="%{text}", hovertemplate="%{y} on %{x}: %{text} of setups fit<extra></extra>",
    ))
    fig.update_layout(template="plotly_white", height=max(260, 28 * len(labels) + 140), margin=dict(l=220, r=20, t=30, b=60),
                      yaxis=dict(autorange="reversed"), xaxis=dict(side="bottom"))
    return _figure_html(fig, CHART_IDS["fits"])


def _cost_chart(frame: "pd.DataFrame") -> tuple[str, str]:
    import plotly.graph_objects as go

    from memplan.planning.sweep import STRATEGIES

    if "variants" not in frame.columns:
        return "", ('<p class="note">No fleet inputs in the grid: add <code>variants</code>, <code>rps</code> and '
                    "<code>serve_gpu</code> to compare full fine-tuning, LoRA, LoRAX and vLLM multi-LoRA by $/month.</p>")
    ok = frame[frame["fleet_error"].isna()]
    models = [m for m in frame["model"].cat.categories if (ok["model"] == m).any()]
    fig = _facets(len(models), models)
    # full_finetune and lora often cost the same (both one deployment per variant): the first is a wide pale
    # line with round markers, the second a narrow dashed line with open diamonds drawn on top, so both show.
    lines = {"full_finetune": dict(color="rgba(214,39,40,0.45)", width=7), "lora": dict(color="#ff7f0e", width=2.5, dash="dash"),
             # lorax and vllm_multi_lora (one shared base either way) coincide too: the same pattern in blue.
             "lorax": dict(color="rgba(44,160,44,0.45)", width=7), "vllm_multi_lora": dict(color="#1f77b4", width=2.5, dash="dot")}
    markers = {"full_finetune": dict(symbol="circle", size=11, color="rgba(214,39,40,0.6)"),
               "lora": dict(symbol="diamond-open", size=9, color="#ff7f0e", line=dict(width=2)),
               "lorax": dict(symbol="square", size=10, color="rgba(44,160,44,0.6)"),
               "vllm_multi_lora": dict(symbol="triangle-up-open", size=9, color="#1f77b4", line=dict(width=2))}
    notes: list[str] = []
    costs: list[float] = []
    dims = ["method", "quant", "lora_rank", "lora_targets", *[c for c in ("rps", "serve_gpu", "serve_quant", "popularity",
            "zipf_exponent", "prompt_tokens", "output_tokens", "utilization", "scale_to_zero", "dataset_tokens", "epochs",
            "train_gpu") if c in frame.columns]]
    for i, model in enumerate(models):
        rows = ok[ok["model"] == model]
        lora = rows[rows["method"] == "lora"]
        rows, fixed = _reference(lora if not lora.empty else rows, dims, cover="variants")
        rows = rows.drop_duplicates("variants").sort_values("variants")
        for s in STRATEGIES:
            y = rows[f"usd_per_month.{s}"]
            if y.isna().all():
                continue
            costs.extend(v for v in y.dropna().tolist() if v > 0)
            fig.add_trace(go.Scatter(
                x=rows["variants"], y=y, mode="lines+markers", name=s, legendgroup=s, showlegend=i == 0,
                line=lines.get(s, {}), marker=markers.get(s, {}), customdata=rows[f"gpus.{s}"],
                hovertemplate="N=%{x}: $%{y:,.0f}/month on %{customdata:,.1f} GPUs<extra>" + s + "</extra>",
            ), row=i // _FACETS_PER_ROW + 1, col=i % _FACETS_PER_ROW + 1)
        notes.append(f"<li>{_e(model)}: {_e(_fixed_text(fixed))}</li>")
    ns = sorted(frame["variants"].unique().tolist())
    fig.update_xaxes(title_text="variants N", type="log", tickvals=ns, ticktext=[f"{v:,}" for v in ns])
    # Labels at the decades only (1-2-5 steps on a short range), not plotly's minor 2..9 of every decade.
    ticks = log_ticks(min(costs), max(costs)) if costs else []
    fig.update_yaxes(type="log", tickvals=ticks, ticktext=[format_usd(v) for v in ticks])
    fig.update_yaxes(title_text="USD per month", col=1)  # one title per row: beside the tick labels of the next panel it would collide
    refused = frame["fleet_error"].dropna().unique().tolist()
    extra = "".join(f"<li>refused by the fleet planner: {_e(r)}</li>" for r in refused)
    extra += ("<li>full_finetune (wide pale line, round markers) and lora (dashed line, open diamonds, drawn on top) "
              "often cost the same, one deployment per variant either way; so do lorax (wide pale green line) and "
              "vllm_multi_lora (dotted line, open triangles), one shared base either way: where lines coincide, both are drawn.</li>")
    note = f'<p class="note">Other inputs held at one value per model (the value that keeps the most lines):</p><ul class="note">{"".join(notes)}{extra}</ul>'
    return _figure_html(fig, CHART_IDS["cost"]), note


def _calibration(records: list[dict[str, Any]]) -> str:
    import plotly.graph_objects as go

    from memplan.measure.calibrate import calibrate
    from memplan.measure.compare import compare_records
    from memplan.measure.stats import error_stats
    from memplan.errors import ProfileError

    if not records:
        return ('<p><strong>No profiles yet.</strong> Run <code>memplan profile</code> to measure real training steps; '
                "the estimator's error on them is then shown here.</p>")
    rows = compare_records(records)
    rows = rows[rows["rel_error"].notna()]
    ok = sum(1 for r in records if r.get("outcome") == "ok")
    out = [f"<p>{len(records):,} records in profiles ({ok:,} ran to completion); error = (predicted - measured) / measured.</p>"]
    body = []
    for (device, component), g in rows.groupby(["device", "component"], sort=False):
        st = error_stats(g["rel_error"].astype(float).tolist())
        if st is None:
            continue
        body.append([device, component, f"{st.count:,}", _pct(st.median_abs), _pct(st.max_abs), f"{st.mean:+.1%}"])
    out.append(_table(["device", "component", "records", "median |error|", "max |error|", "mean error"], body, align="llrrrr"))
    try:
        s = calibrate(records).summary()
        out.append(f'<p>CUDA device terms fitted on {s["fit_records"]} records; on the {s["held_out_records"]} held-out records '
                   f'the allocated peak has median |error| {_pct(s["allocated_median_abs_error"])} (max {_pct(s["allocated_max_abs_error"])})'
                   f', NVML total {_pct(s["nvml_median_abs_error"])} (max {_pct(s["nvml_max_abs_error"])}).</p>')
    except ProfileError as exc:
        out.append(f'<p class="note">CUDA calibration: {_e(exc)}.</p>')
    peak = rows[rows["component"] == "peak"]
    if not peak.empty:
        fig = go.Figure()
        for device, g in peak.groupby("device", sort=False):
            fig.add_trace(go.Scatter(x=g["measured_bytes"] / GIB, y=g["predicted_bytes"] / GIB, mode="markers", name=str(device),
                                     customdata=[f"{e:+.1%}" for e in g["rel_error"]],
                                     hovertemplate="measured %{x:.3f} GiB, predicted %{y:.3f} GiB (%{customdata})<extra></extra>"))
        top = float(max(peak["measured_bytes"].max(), peak["predicted_bytes"].max())) / GIB
        fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="exact", line=dict(dash="dot", color="#888")))
        fig.update_layout(template="plotly_white", height=420, xaxis_title="measured peak (GiB)", yaxis_title="predicted peak (GiB)")
        out.append(_figure_html(fig, CHART_IDS["calibration"]))
    return "".join(out)


def _assumptions(frame: "pd.DataFrame", grid: Grid) -> str:
    from memplan.training.device_terms import device_terms
    from memplan.hardware.gpus import gpu_catalog

    t = device_terms("cuda")
    terms = ("not calibrated yet (no CUDA context or allocator slack in the peaks)" if t.source == "none" else
             f"CUDA context {format_bytes(t.cuda_context_bytes)}, workspaces {format_bytes(t.workspace_bytes)}, "
             f"allocator slack {t.allocator_fraction:.2%} of the allocated peak ({t.source})")
    items = [
        "Peak = the largest device total over the phases of a steady-state training step (forward, loss backward, "
        "layer backward, optimizer step), not a sum of maxima; one GPU per job (no FSDP/DeepSpeed sharding).",
        f"CUDA device terms: {terms}.",
        "A setup fits a GPU when its peak is at most the memory nvidia-smi reports as total; headroom = that minus the peak.",
        "Options that cannot apply are collapsed: full fine-tuning has no LoRA rank, targets or dropout; double quantization "
        "needs nf4/fp4; prepare_kbit_training needs a quantized base.",
        "Sizes: GiB = 2^30 bytes, GB = 10^9 bytes.",
    ]
    out = ["<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>"]
    cat = gpu_catalog()
    rows = [[g.key, g.name, format_bytes(g.usable_bytes), f"${g.usd_per_hour:.3f}", g.price_provider, g.price_date]
            for g in (cat.get(k) for k in grid.gpus)]
    out.append("<h3>GPUs</h3>" + _table(["GPU", "name", "usable", "per hour", "price from", "dated"], rows, align="llrrll"))
    if grid.fleet:
        from memplan.serving.memory import assumptions

        rows = [[name, _number(a["value"]), a["unit"], a["source"]] for name, a in assumptions().to_dict().items()]
        out.append("<h3>Fleet planner (data/serving.json)</h3>" + _table(["name", "value", "unit", "source"], rows, align="lrll"))
    refused = frame.attrs.get("refused") or {}
    if refused:
        rows = [[reason, f"{n:,}"] for reason, n in sorted(refused.items(), key=lambda kv: -kv[1])]
        out.append("<h3>Combinations the estimator refused</h3>" + _table(["reason", "combinations"], rows, align="lr"))
    return "".join(out)


# ---- the page ------------------------------------------------------------------------------------


def build_report(frame: "pd.DataFrame", grid: Grid, *, records: list[dict[str, Any]]) -> str:
    """The whole HTML page for a sweep of `grid` and the profile `records`."""
    version = memplan_version()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    refused = sum((frame.attrs.get("refused") or {}).values())
    per_setup = math.prod(len(v) for v in grid.fleet.values())
    size = f"{len(frame) // per_setup:,} setups" + (f" × {per_setup:,} fleet inputs" if per_setup > 1 else "")
    memory_html, memory_note = _memory_chart(frame) if len(frame) else ("", "")
    cost_html, cost_note = _cost_chart(frame) if len(frame) else ("", "")
    body = [
        f"<h1>memplan capacity report</h1><p class=\"muted\">memplan {_e(version)} · {_e(when)} · grid {_e(grid.source)} · "
        f"{size} × {len(grid.gpus)} GPUs" + (f" · {refused:,} combinations refused" if refused else "") + "</p>",
        "<h2>Summary per model</h2>", _summary(frame, per_setup),
        "<h2>Peak memory against sequence length</h2>", memory_html, memory_note,
        "<h2>Which GPU does it fit on?</h2><p class=\"note\">Share of each group's setups whose peak fits the GPU.</p>",
        _fits_chart(frame, grid.gpus) if len(frame) else "",
        "<h2>Cost per month against the number of variants</h2>", cost_html, cost_note,
        "<h2>Accuracy on measured runs</h2>", _calibration(records),
        "<h2>Assumptions</h2>", _assumptions(frame, grid),
        f'<p class="muted">Made by memplan {_e(version)} (<code>memplan report</code>).</p>',
    ]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>memplan capacity report</title>"
            f"<style>{_CSS}</style></head><body>" + "".join(body)
            + f'<script type="application/octet-stream" id="memplan-plotlyjs">{_plotlyjs_gzip_base64()}</script>'
            + f"<script>{_PLOTLY_LOADER}</script></body></html>")


def write_report(grid: Grid, path: str | Path, *, profiles: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[int, "pd.DataFrame"]:
    """Sweep `grid`, read the profiles, write the report to `path`; returns its size in bytes and the sweep.
    Everything that can be refused (the path, the profile records) is checked before the sweep."""
    from memplan.planning.sweep import sweep_grid

    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        raise MemplanError(f"--out {path}: the report is an HTML file; name it .html")
    from memplan.files import atomic_write_bytes, check_writable
    from memplan.planning.render_sweep import no_rows_message

    check_writable(out)  # a folder, a missing or read-only folder: refused before the sweep
    records = load_profile_records(profiles)
    frame = sweep_grid(grid, progress=progress)
    if frame.empty:  # a page with no rows would look like an answer
        raise MemplanError(no_rows_message(frame))
    text = build_report(frame, grid, records=records)
    data = text.encode("utf-8")
    atomic_write_bytes(out, data)
    return len(data), frame
