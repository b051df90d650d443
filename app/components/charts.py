"""Plotly figures for the pages. They draw numbers handed to them; they compute none."""

from __future__ import annotations

import math
from typing import Any, Sequence

import plotly.graph_objects as go

from memplan.planning.appdata import BreakdownPart

# Tableau 10: distinct in colour and in lightness, readable on white.
PART_COLORS = {
    "weights": "#4C78A8",
    "adapters": "#72B7B2",
    "gradients": "#F58518",
    "optimizer_states": "#E45756",
    "activations": "#54A24B",
    "logits": "#EECA3B",
    "transients": "#B279A2",
    "overhead": "#9D755D",
}
STRATEGY_COLORS = {"full_finetune": "#E45756", "lora": "#F58518", "lorax": "#4C78A8"}
# Full fine-tuning and merged LoRA often cost the same: dashes and symbols keep both visible.
STRATEGY_DASHES = {"full_finetune": "solid", "lora": "dash", "lorax": "solid"}
STRATEGY_SYMBOLS = {"full_finetune": "circle", "lora": "diamond-open", "lorax": "square"}
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


def breakdown_chart(parts: Sequence[BreakdownPart], *, capacity_gib: float, capacity_label: str) -> go.Figure:
    """One horizontal stacked bar (the peak's parts) against the GPU's usable memory."""
    fig = go.Figure()
    for p in parts:
        fig.add_bar(
            x=[p.gib], y=[0], orientation="h", name=p.label, marker_color=PART_COLORS.get(p.key),
            text=[p.text], textposition="inside", insidetextanchor="middle", textangle=0, width=0.6,
            customdata=[p.bytes], hovertemplate=f"{p.label}: {p.text} (%{{customdata:,}} bytes)<extra></extra>",
        )
    fig.add_scatter(
        x=[capacity_gib, capacity_gib], y=[-0.45, 0.45], mode="lines", name=capacity_label,
        line=dict(color="#222222", width=3, dash="dash"), hovertemplate=f"{capacity_label}<extra></extra>",
    )
    _layout(fig, height=230)
    fig.update_layout(barmode="stack", uniformtext=dict(mode="hide", minsize=12), legend_traceorder="normal")
    # Room for whichever is longer, the bar or the capacity line (display only).
    fig.update_xaxes(title_text="GiB (2³⁰ bytes)", range=[0, 1.06 * max(capacity_gib, sum(p.gib for p in parts))])
    fig.update_yaxes(visible=False, range=[-0.6, 0.6])
    return fig


def crossover_chart(rows: Sequence[dict[str, Any]], *, titles: dict[str, str], current_variants: int) -> go.Figure:
    """$/month against N for every strategy, log-log, with the chosen N marked."""
    fig = go.Figure()
    for name, title in titles.items():
        pts = [r for r in rows if r["strategy"] == name]
        fig.add_scatter(
            x=[r["variants"] for r in pts], y=[r["usd_per_month"] for r in pts], mode="lines+markers", name=title,
            line=dict(color=STRATEGY_COLORS.get(name), width=3, dash=STRATEGY_DASHES.get(name, "solid")),
            marker=dict(symbol=STRATEGY_SYMBOLS.get(name, "circle"), size=9),
            hovertemplate=f"{title}<br>N = %{{x:,}}<br>$%{{y:,.0f}} per month<extra></extra>",
        )
    fig.add_vline(x=current_variants, line=dict(color="#555555", dash="dot"))
    # On a log axis a shape takes data coordinates but an annotation takes log10 ones (plotly layout.annotations.x).
    fig.add_annotation(x=math.log10(current_variants), y=1, yref="paper", yanchor="top", xanchor="left",
                       text=f" N = {current_variants:,}", showarrow=False, bgcolor="white")
    _layout(fig, height=380)
    ns = [r["variants"] for r in rows] + [current_variants]
    fig.update_xaxes(type="log", title_text="fine-tuned variants N (log scale)",
                     range=[math.log10(min(ns)) - 0.1, math.log10(max(ns)) + 0.1])  # log axes take log10 ranges
    fig.update_yaxes(type="log", title_text="USD per month (log scale)", tickprefix="$")
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
