"""Plotly figures for the pages. They draw numbers handed to them; they compute none."""

from __future__ import annotations

import math
from typing import Any, Sequence

import plotly.graph_objects as go

from memplan.planning.appdata import BreakdownPart
from memplan.units import format_usd, log_ticks

# Tableau 10: distinct in colour and in lightness, readable on white.
PART_COLORS = {
    "weights": "#4C78A8",
    "adapters": "#72B7B2",
    "gradients": "#F58518",
    "optimizer_states": "#E45756",
    "master_weights": "#FF9DA6",
    "comm_buffers": "#BAB0AC",
    "gathered": "#79706E",
    "activations": "#54A24B",
    "logits": "#EECA3B",
    "transients": "#B279A2",
    "overhead": "#9D755D",
}
# Pairs of strategies often cost the same and their lines coincide: full fine-tuning and merged LoRA (one
# deployment per variant either way), LoRAX and vLLM multi-LoRA (one shared base). The first of each pair
# is a wide pale line with big filled markers, the second a narrow dashed or dotted line with open markers on top.
STRATEGY_COLORS = {"full_finetune": "rgba(228,87,86,0.45)", "lora": "#F58518", "lorax": "rgba(76,120,168,0.45)",
                   "vllm_multi_lora": "#54A24B"}
STRATEGY_DASHES = {"full_finetune": "solid", "lora": "dash", "lorax": "solid", "vllm_multi_lora": "dot"}
STRATEGY_WIDTHS = {"full_finetune": 8, "lora": 2.5, "lorax": 8, "vllm_multi_lora": 2.5}
STRATEGY_SYMBOLS = {"full_finetune": "circle", "lora": "diamond-open", "lorax": "square", "vllm_multi_lora": "x-thin-open"}
STRATEGY_SIZES = {"full_finetune": 13, "lora": 9, "lorax": 12, "vllm_multi_lora": 10}
STRATEGY_STYLE_TEXT = {"full_finetune": "wide pale red line", "lora": "dashed orange line, open diamonds",
                       "lorax": "wide pale blue line", "vllm_multi_lora": "dotted green line, crosses"}
QUANT_COLORS = {"bf16": "#4C78A8", "fp16": "#72B7B2", "fp32": "#9D755D", "int8": "#F58518", "nf4": "#54A24B", "fp4": "#B279A2"}
_FONT = dict(family="sans-serif", size=14)


def _layout(fig: go.Figure, *, height: int) -> go.Figure:
    fig.update_layout(
        height=height,
        margin=dict(l=10, r=10, t=40, b=10),
        font=_FONT,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
        plot_bgcolor="white",
    )
    fig.update_xaxes(showgrid=True, gridcolor="#e6e6e6", zeroline=False)
    fig.update_yaxes(showgrid=True, gridcolor="#e6e6e6", zeroline=False)
    return fig


def breakdown_chart(parts: Sequence[BreakdownPart], *, capacity: float, unit: str, capacity_label: str, per_gpu: bool = False) -> go.Figure:
    """One horizontal stacked bar (the peak's parts) against the GPU's usable memory, both in `unit` (GiB or TiB);
    `per_gpu`: the bar is one GPU's share under a parallel layout, and the axis says so."""
    fig = go.Figure()
    for p in parts:
        fig.add_bar(
            x=[p.value], y=[0], orientation="h", name=p.label, marker_color=PART_COLORS.get(p.key),
            text=[p.text], textposition="inside", insidetextanchor="middle", textangle=0, width=0.6,
            customdata=[p.bytes], hovertemplate=f"{p.label}: {p.text} (%{{customdata:,}} bytes)<extra></extra>",
        )
    fig.add_scatter(
        x=[capacity, capacity], y=[-0.45, 0.45], mode="lines", name=capacity_label,
        line=dict(color="#222222", width=3, dash="dash"), hovertemplate=f"{capacity_label}<extra></extra>",
    )
    _layout(fig, height=230)
    fig.update_layout(barmode="stack", uniformtext=dict(mode="hide", minsize=12), legend_traceorder="normal")
    # Room for whichever is longer, the bar or the capacity line (display only).
    axis = {"GiB": "GiB (2³⁰ bytes)", "TiB": "TiB (2⁴⁰ bytes)"}[unit]
    fig.update_xaxes(title_text=axis.replace(" (", " per GPU (", 1) if per_gpu else axis,
                     range=[0, 1.06 * max(capacity, sum(p.value for p in parts))])
    fig.update_yaxes(visible=False, range=[-0.6, 0.6])
    return fig


def crossover_chart(rows: Sequence[dict[str, Any]], *, titles: dict[str, str], current_variants: int) -> go.Figure:
    """$/month against N for every strategy, log-log, with the chosen N marked."""
    fig = go.Figure()
    for name, title in titles.items():
        pts = [r for r in rows if r["strategy"] == name]
        fig.add_scatter(
            x=[r["variants"] for r in pts], y=[r["usd_per_month"] for r in pts], mode="lines+markers", name=title,
            line=dict(color=STRATEGY_COLORS.get(name), width=STRATEGY_WIDTHS.get(name, 3), dash=STRATEGY_DASHES.get(name, "solid")),
            marker=dict(symbol=STRATEGY_SYMBOLS.get(name, "circle"), size=STRATEGY_SIZES.get(name, 9),
                        line=dict(width=2, color=STRATEGY_COLORS.get(name))),
            hovertemplate=f"{title}<br>N = %{{x:,}}<br>$%{{y:,.0f}} per month<extra></extra>",
        )
    fig.add_vline(x=current_variants, line=dict(color="#555555", dash="dot"))
    ns = [r["variants"] for r in rows] + [current_variants]
    lo, hi = math.log10(min(ns)) - 0.1, math.log10(max(ns)) + 0.1  # log axes take log10 ranges
    # On a log axis a shape takes data coordinates but an annotation takes log10 ones (plotly layout.annotations.x).
    # In the right half the label goes left of the marker, so N = 100,000 stays inside the plot.
    right = math.log10(current_variants) > (lo + hi) / 2
    fig.add_annotation(x=math.log10(current_variants), y=1, yref="paper", yanchor="top", xanchor="right" if right else "left",
                       text=f"N = {current_variants:,} " if right else f" N = {current_variants:,}", showarrow=False, bgcolor="white")
    _layout(fig, height=380)
    xticks = log_ticks(min(ns), max(ns))
    costs = [r["usd_per_month"] for r in rows if r["usd_per_month"] > 0]
    yticks = log_ticks(min(costs), max(costs)) if costs else []
    fig.update_xaxes(type="log", title_text="fine-tuned variants N (log scale)", range=[lo, hi],
                     tickvals=xticks, ticktext=[f"{v:,.0f}" for v in xticks])
    # Labels at the decades (1-2-5 on a short range), not plotly's minor 2 and 5 of every decade.
    fig.update_yaxes(type="log", title_text="USD per month (log scale)", tickvals=yticks, ticktext=[format_usd(v) for v in yticks])
    return fig


def calibration_chart(points: Sequence[dict[str, Any]], *, quants: Sequence[str]) -> go.Figure:
    """Predicted against measured peak (GiB), one colour per quant; the diagonal is a perfect estimate."""
    fig = go.Figure()
    top = max([max(p["measured_gib"], p["predicted_gib"]) for p in points] + [0.0])
    fig.add_scatter(x=[0, top], y=[0, top], mode="lines", name="predicted = measured",
                    line=dict(color="#888888", dash="dash"), hoverinfo="skip")
    for quant in quants:
        pts = [p for p in points if p["quant"] == quant]
        fig.add_scatter(
            x=[p["measured_gib"] for p in pts], y=[p["predicted_gib"] for p in pts], mode="markers", name=quant,
            marker=dict(color=QUANT_COLORS.get(quant), size=10, line=dict(width=1, color="white")),
            text=[p["label"] for p in pts], customdata=[p["error_text"] for p in pts],
            hovertemplate="%{text}<br>measured %{x:.3f} GiB, predicted %{y:.3f} GiB (%{customdata})<extra></extra>",
        )
    _layout(fig, height=420)
    fig.update_xaxes(title_text="measured peak, GiB (2³⁰ bytes)", rangemode="tozero")
    fig.update_yaxes(title_text="predicted peak, GiB (2³⁰ bytes)", rangemode="tozero")
    return fig
