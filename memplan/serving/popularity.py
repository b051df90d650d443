"""Traffic over N variants, and what an adapter cache of a given size serves from memory.

- Popularity is uniform (1/N each) or Zipf, i^-s / H(N, s) (Breslau et al. 1999, "Web
  caching and Zipf-like distributions: evidence and implications", IEEE INFOCOM).
- LRU hit rates use Che's approximation under independent requests (Che, Tung, Wang 2002,
  "Hierarchical Web caching systems", IEEE JSAC 20(7); why it is accurate: Fricker, Robert,
  Roberts 2012, arXiv:1202.3974), exact for uniform popularity.
- Distinct adapters in a batch: the expected occupancy of `batch` independent draws,
  sum over i of 1 - (1 - p_i)^batch (linearity of expectation).
Ignores: correlated requests (sessions), adapter-aware routing (every replica sees the
whole popularity profile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["popularity_weights", "lru_hit_rate", "expected_distinct"]


def popularity_weights(n: int, kind: str, exponent: float = 1.0) -> "np.ndarray":
    """Share of traffic per variant, most popular first: uniform 1/n, or Zipf i^-s / H(n, s)."""
    import numpy as np

    if kind == "uniform":
        return np.full(n, 1.0 / n)
    w = np.arange(1, n + 1, dtype=float) ** -float(exponent)
    return w / w.sum()


def lru_hit_rate(p: "np.ndarray", slots: int) -> float:
    """Hit rate of an LRU cache of `slots` items (Che's approximation): find the
    characteristic time T with sum(1 - exp(-p_i T)) = slots; hit = sum p_i (1 - exp(-p_i T))."""
    import numpy as np

    n = len(p)
    if slots >= n:
        return 1.0
    if slots <= 0:
        return 0.0
    if float(np.ptp(p)) == 0.0:
        return slots / n  # uniform popularity: Che's fixed point gives exactly slots / n
    lo, hi = 0.0, 1.0
    while np.sum(-np.expm1(-p * hi)) < slots:
        hi *= 2.0
    # Bisection to a relative width of 1e-9 on T (~30 steps instead of 100): the hit
    # rate moves by far less than that, and each step is a pass over n values.
    for _ in range(100):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        if np.sum(-np.expm1(-p * mid)) < slots:
            lo = mid
        else:
            hi = mid
    return float(np.sum(p * -np.expm1(-p * hi)))


def expected_distinct(p: "np.ndarray", batch: int) -> float:
    """Expected distinct variants among `batch` independent requests: sum 1 - (1 - p_i)^batch."""
    import numpy as np

    return float(np.sum(-np.expm1(batch * np.log1p(-np.minimum(p, 1.0 - 1e-16)))))
