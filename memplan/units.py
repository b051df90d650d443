"""The one place that turns byte counts into text.

GiB = 2**30 bytes and GB = 10**9 bytes; every label says which it is.
"""

from __future__ import annotations

__all__ = ["GIB", "MIB", "GB", "MB", "format_bytes", "format_count", "format_usd", "format_seconds", "format_gpus"]

KIB = 2**10
MIB = 2**20
GIB = 2**30
MB = 10**6
GB = 10**9

_BINARY = ((2**40, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB"))
_DECIMAL = ((10**15, "PB"), (10**12, "TB"), (GB, "GB"), (MB, "MB"), (10**3, "kB"))


def format_bytes(n: int | float, *, decimal: bool = False, digits: int = 2) -> str:
    """Render a byte count with the largest unit that keeps it >= 1."""
    units = _DECIMAL if decimal else _BINARY
    sign = "-" if n < 0 else ""
    a = abs(n)
    for size, label in units:
        if a >= size:
            return f"{sign}{a / size:.{digits}f} {label}"
    return f"{sign}{int(a)} B"


def format_count(n: int) -> str:
    """Parameter counts: 6.74B, 4.19M, 14.3K."""
    for size, label in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(n) >= size:
            return f"{n / size:.2f}{label}"
    return str(n)


def format_usd(x: float | None) -> str:
    """Dollars: whole dollars from $100 up, cents below; "n/a" when unknown."""
    if x is None:
        return "n/a"
    return f"${x:,.0f}" if abs(x) >= 100 else f"${x:,.2f}"


def format_seconds(x: float | None) -> str:
    """Latencies: milliseconds below a second."""
    if x is None:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s"


def format_gpus(x: float) -> str:
    """A GPU count; a fractional one (scale-to-zero averages) is marked as such."""
    return f"{x:,.0f}" if abs(x - round(x)) < 1e-9 else f"{x:,.2f} avg"
