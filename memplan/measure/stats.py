"""How wrong the estimator is over a set of records: one summary of relative errors.

Every table that reports accuracy (`memplan calibrate`, `memplan report`, the app's
calibration page, benchmarks/validate_cpu.py) takes its numbers from `error_stats`, so
"median |error|" means the same thing everywhere.

A relative error is (predicted - measured) / measured, as `memplan.measure.compare` defines it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable

__all__ = ["ErrorStats", "error_stats"]


@dataclass(frozen=True)
class ErrorStats:
    """Summary of signed relative errors; the `_abs` fields are over |error|."""

    count: int
    median_abs: float
    p95_abs: float
    max_abs: float
    mean: float  # signed: the bias (positive = the estimate is high)


def _percentile(sorted_values: list[float], q: float) -> float:
    # Linear interpolation between closest ranks: Hyndman & Fan (1996) definition 7,
    # numpy.percentile's default; for one value it is that value.
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def error_stats(errors: Iterable[float | None]) -> ErrorStats | None:
    """Count, median / p95 / max of |error| and the mean signed error; None errors
    and NaN (nothing measured, as pandas holds it) are skipped. None when no error is left."""
    errs = [float(e) for e in errors if e is not None and not math.isnan(e)]
    if not errs:
        return None
    absolute = sorted(abs(e) for e in errs)
    return ErrorStats(
        count=len(errs),
        median_abs=statistics.median(absolute),
        p95_abs=_percentile(absolute, 0.95),
        max_abs=absolute[-1],
        mean=statistics.fmean(errs),
    )
