"""memplan.measure.stats.error_stats: expected values worked out by hand below."""

from __future__ import annotations

import math

import pytest

from memplan.measure.stats import ErrorStats, error_stats


def test_hand_computed_summary() -> None:
    # |errors| sorted: 0.01, 0.02, 0.05, 0.10, 0.20 -> median 0.05, max 0.20;
    # p95 at rank 0.95 * 4 = 3.8: 0.10 + 0.8 * (0.20 - 0.10) = 0.18; mean (-0.2+0.01-0.02+0.05+0.1)/5 = -0.012
    s = error_stats([-0.2, 0.01, -0.02, 0.05, 0.1])
    assert isinstance(s, ErrorStats) and s.count == 5
    assert s.median_abs == pytest.approx(0.05)
    assert s.p95_abs == pytest.approx(0.18)
    assert s.max_abs == pytest.approx(0.2)
    assert s.mean == pytest.approx(-0.012)


def test_even_count_median_and_one_value() -> None:
    assert error_stats([0.1, -0.3]).median_abs == pytest.approx(0.2)
    one = error_stats([-0.04])
    assert (one.count, one.median_abs, one.p95_abs, one.max_abs, one.mean) == (1, 0.04, 0.04, 0.04, -0.04)


def test_missing_measurements_are_skipped() -> None:
    s = error_stats([None, math.nan, 0.5])
    assert s.count == 1 and s.max_abs == 0.5
    assert error_stats([]) is None and error_stats([None, math.nan]) is None
