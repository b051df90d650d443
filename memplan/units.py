"""The one place that turns byte counts into text.

GiB = 2**30 bytes and GB = 10**9 bytes; every label says which it is.
"""

from __future__ import annotations

__all__ = ["GIB", "MIB", "GB", "MB", "to_gib", "format_bytes", "format_count", "format_usd", "format_seconds", "format_gpus", "log_ticks"]

KIB = 2**10
MIB = 2**20
GIB = 2**30
MB = 10**6
GB = 10**9

_BINARY = ((2**40, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB"))
_DECIMAL = ((10**15, "PB"), (10**12, "TB"), (GB, "GB"), (MB, "MB"), (10**3, "kB"))



def to_gib(n: int | float) -> float:
    """Bytes as GiB (2**30), a number for a table column or a chart axis; text goes through `format_bytes`."""
    return n / GIB


def format_bytes(n: int | float, *, decimal: bool = False, digits: int = 2) -> str:
    """Render a byte count with at most three integer digits.

    Decimal units step every 1000, so the largest unit that keeps the value >= 1 does it.
    Binary units step every 1024: a value of 1000-1023 of one unit is shown in the next
    (1000 MiB is "0.98 GiB", never "1000.00 MiB")."""
    units = _DECIMAL if decimal else _BINARY
    sign = "-" if n < 0 else ""
    a = abs(n)
    for size, label in units:
        # binary: the next smaller unit would print 1000.00 or more (rounding included)
        if a >= (size if decimal else size * (1000 - 0.5 * 10**-digits) / 1024):
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


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis spanning [lo, hi] (both > 0): the powers of ten in it, or the
    1-2-5 steps where fewer than three powers fall inside, so no axis is left with one label
    and none is crowded with plotly's minor labels (2, 3, ..., 9 of every decade)."""
    import math

    if not (0 < lo <= hi < math.inf):
        return []
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = [10.0**k for k in range(first, last + 1) if lo <= 10.0**k <= hi]
    if len(decades) >= 3:
        return decades
    steps = [m * 10.0**k for k in range(first, last + 1) for m in (1, 2, 5)]
    return [v for v in steps if lo <= v <= hi] or [lo, hi]


def with_article(word: str) -> str:
    """`an int8`, `an nf4`, `an fp16`, `a bf16`, `a full`: the article as the word is spoken
    (an initialism such as nf4 is read letter by letter: "en-ef-four")."""
    w = word.lower()
    spelled = len(w) > 1 and w[0] in "fhlmnrsx" and w[1] not in "aeiouy"
    return f"{'an' if w[:1] in ('a', 'e', 'i', 'o') or spelled else 'a'} {word}"


def plural(n: int, word: str, words: str | None = None) -> str:
    """`1 combination`, `2 combinations`: a count with its noun agreeing."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"
