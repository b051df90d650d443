"""memplan.units: the one module that turns numbers into text.

House style rule 3 (STYLE.md): GiB = 2**30 and GB = 10**9, and every label says which.
Expected strings are written out by hand from those definitions, never produced by the
code under test.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memplan.units import GB, GIB, MB, MIB, format_bytes, format_count, format_gpus, format_seconds, format_usd


def test_unit_constants_are_the_si_and_iec_definitions() -> None:
    # IEC 80000-13: Ki/Mi/Gi are powers of 1024; SI: k/M/G are powers of 1000.
    assert (MIB, GIB) == (1_048_576, 1_073_741_824)
    assert (MB, GB) == (1_000_000, 1_000_000_000)


@pytest.mark.parametrize(
    "n, decimal, expected",
    [
        (2**30, False, "1.00 GiB"),
        (10**9, True, "1.00 GB"),
        # 10**9 bytes is 0.931 GiB, so it must fall to MiB: 10**9 / 2**20 = 953.67.
        (10**9, False, "953.67 MiB"),
        # 2**30 bytes in decimal units: 1.073741824 GB.
        (2**30, True, "1.07 GB"),
        # Llama-2-7B in bf16: 6,738,415,616 x 2 = 13,476,831,232 bytes (REFERENCE.md count)
        # = 12.551 GiB = 13.477 GB: the "12.55 GiB" vLLM logs (tests/serving) and the "13.5 GB" of the founding docs.
        (13_476_831_232, False, "12.55 GiB"),
        (13_476_831_232, True, "13.48 GB"),
        (999, False, "999 B"),
        (1000, False, "0.98 KiB"),  # binary: never four integer digits
        (1023, False, "1.00 KiB"),
        (1000 * 2**20, False, "0.98 GiB"),  # 1000 MiB, not "1000.00 MiB" (issue: app fine-tune page)
        (999, True, "999 B"),
        (1024, False, "1.00 KiB"),
        (1000, True, "1.00 kB"),
        (2**40, False, "1.00 TiB"),
        (350 * 10**12, True, "350.00 TB"),  # founding docs: 1,000 GPT-3 copies = 350 TB
        (35 * 10**15, True, "35.00 PB"),  # ... and 100k copies = 35 PB
        (-1536, False, "-1.50 KiB"),  # negative headroom keeps its sign
        (0, False, "0 B"),
    ],
)
def test_format_bytes_labels(n: int, decimal: bool, expected: str) -> None:
    assert format_bytes(n, decimal=decimal) == expected


def test_digits_option() -> None:
    assert format_bytes(3 * 2**29, digits=0) == "2 GiB"  # 1.5 GiB rounds half to even
    assert format_bytes(2**30 + 2**20, digits=4) == "1.0010 GiB"


_LABEL = re.compile(r"^(-?)(\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB|kB|MB|GB|TB|PB)$")
_SIZES = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
          "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15}


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**52), 2**52), st.booleans())
def test_format_bytes_round_trips_within_rounding(n: int, decimal: bool) -> None:
    """Parse the label back with the unit's definition: within half a unit in the last digit,
    at most three integer digits, and binary labels never mix with decimal."""
    text = format_bytes(n, decimal=decimal)
    m = _LABEL.match(text)
    assert m, text
    sign, value, unit = m.groups()
    assert (unit in ("kB", "MB", "GB", "TB", "PB")) == (decimal and abs(n) >= 1000)
    assert (unit in ("KiB", "MiB", "GiB", "TiB")) == (not decimal and abs(n) >= 1000)
    size = _SIZES[unit]
    back = float(value) * size * (-1 if sign else 1)
    assert abs(back - n) <= 0.005 * size + 1e-9 * abs(n)
    if unit != "B":
        # at least 1 (decimal) or 1000/1024 (binary) of the unit, before rounding
        assert float(value) >= (1.0 if decimal else round(1000 / 1024, 2))
        # not a larger unit available below TiB/PB: never four integer digits
        if unit not in ("TiB", "PB"):
            assert float(value) < 1000.0005


@pytest.mark.parametrize(
    "n, expected",
    [
        (6_738_415_616, "6.74B"),  # REFERENCE.md: Llama-2-7B total
        (4_194_304, "4.19M"),  # REFERENCE.md: LoRA r=8 on q,v
        (14_300, "14.30K"),
        (999, "999"),
        (174_604_259_328_000, "174.60T"),
    ],
)
def test_format_count(n: int, expected: str) -> None:
    assert format_count(n) == expected


@pytest.mark.parametrize(
    "x, expected",
    [(None, "n/a"), (0.526, "$0.53"), (99.994, "$99.99"), (100, "$100"), (12_345.6, "$12,346")],
)
def test_format_usd(x: float | None, expected: str) -> None:
    assert format_usd(x) == expected


@pytest.mark.parametrize("x, expected", [(None, "-"), (0.1, "100 ms"), (0.0004, "0 ms"), (1.0, "1.0 s"), (48.3, "48.3 s")])
def test_format_seconds(x: float | None, expected: str) -> None:
    assert format_seconds(x) == expected


@pytest.mark.parametrize("x, expected", [(3.0, "3"), (1234.0, "1,234"), (0.25, "0.25 avg"), (2.5, "2.50 avg")])
def test_format_gpus_marks_fractional_averages(x: float, expected: str) -> None:
    assert format_gpus(x) == expected
