"""Text renderings of a grid sweep (`memplan sweep`, `memplan report`): the table and the notes for stderr.

No formulas: the frame is `memplan.planning.sweep.sweep_grid`'s, and bytes become text
only through `memplan.units` (GiB = 2**30 bytes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.units import plural

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["refused_lines", "render_sweep_table", "no_rows_message", "plural"]


def no_rows_message(frame: pd.DataFrame) -> str:
    """One line for a grid the estimator refused entirely: how many, and the commonest reasons."""
    refused = frame.attrs.get("refused") or {}
    if not refused:
        return "the grid has no setup to estimate; give at least one value for every key"
    top = sorted(refused.items(), key=lambda kv: -kv[1])[:3]
    reasons = "; ".join(f"{n:,} x {reason}" for reason, n in top)
    more = f"; and {plural(len(refused) - 3, 'other reason')}" if len(refused) > 3 else ""
    total = sum(refused.values())
    which = "the only combination" if total == 1 else f"all {total:,} combinations"
    return f"the estimator refused {which} of the grid, so nothing was written: {reasons}{more}"


def refused_lines(frame: pd.DataFrame) -> list[str]:
    """Notes for stderr: what the estimator refused (the five commonest reasons), and why a fleet plan is missing."""
    refused = frame.attrs.get("refused") or {}
    lines: list[str] = []
    if refused:
        top = sorted(refused.items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"note: the estimator refused {plural(sum(refused.values()), 'combination')} of the grid:")
        lines += [f"  {n:,} x {reason}" for reason, n in top]
    if "fleet_error" in frame.columns:
        lines += [f"note: no fleet plan: {reason}" for reason in frame["fleet_error"].dropna().unique().tolist()]
    return lines


def render_sweep_table(frame: pd.DataFrame) -> str:
    """The varying setup columns, the peak, and the smallest and cheapest GPU, as aligned text."""
    import pandas as pd

    from memplan.planning.grid import FLEET_KEYS, SETUP_KEYS
    from memplan.units import format_bytes

    if frame.empty:
        return "no setup of the grid was accepted by the estimator"
    varying = [c for c in (*SETUP_KEYS, *FLEET_KEYS) if c in frame.columns and (c == "model" or frame[c].nunique() > 1)]
    per_gpu = "gpus" in frame.columns and bool((frame["gpus"] > 1).any())  # a parallel layout: every figure per GPU
    shown = {**{c: c for c in varying}, "peak_bytes": "peak per GPU" if per_gpu else "peak"}
    if "host_per_node_bytes" in frame.columns and bool((frame["host_per_node_bytes"] > 0).any()):
        shown["host_per_node_bytes"] = "host RAM per node"  # offloaded state: a limit too
    shown.update({"smallest_gpu": "smallest GPU", "cheapest_gpu": "cheapest GPU"})
    if "variants" in frame.columns:
        shown.update({f"usd_per_month.{s}": f"$/month {s}" for s in ("full_finetune", "lora", "lorax")})
    values = {c: frame[c].tolist() for c in shown}

    def text(c: str, v: Any) -> str:
        if v is None or pd.isna(v):
            return "-"
        if c in ("peak_bytes", "host_per_node_bytes"):
            return format_bytes(int(v))
        return f"{v:,.0f}" if c.startswith("usd_per_month.") else str(v)

    rows = [[text(c, values[c][i]) for c in shown] for i in range(len(frame))]
    header = list(shown.values())
    widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
