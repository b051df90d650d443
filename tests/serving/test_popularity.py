"""Traffic and adapter caches (memplan.serving.popularity): Zipf shares, Che's LRU
approximation against a simulated LRU cache, distinct adapters per batch against sampling."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from memplan.serving.popularity import expected_distinct, lru_hit_rate, popularity_weights


def test_popularity_profiles() -> None:
    u = popularity_weights(1000, "uniform")
    z = popularity_weights(1000, "zipf", 1.2)
    assert u.sum() == pytest.approx(1.0) and z.sum() == pytest.approx(1.0)
    assert z[0] / z[1] == pytest.approx(2**1.2) and z[0] / z[9] == pytest.approx(10**1.2)


def _simulated_lru_hits(p: np.ndarray, slots: int, requests: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    cache: collections.OrderedDict[int, None] = collections.OrderedDict()
    hits = 0
    for item in rng.choice(len(p), size=requests, p=p):
        if item in cache:
            hits += 1
            cache.move_to_end(item)
        else:
            cache[item] = None
            if len(cache) > slots:
                cache.popitem(last=False)
    return hits / requests


@pytest.mark.parametrize("kind, exponent, slots", [("uniform", 1.0, 50), ("zipf", 0.8, 20), ("zipf", 1.2, 50)])
def test_lru_hit_rate_matches_a_simulated_lru_cache(kind: str, exponent: float, slots: int) -> None:
    # An actual LRU cache fed 60,000 independent requests; Che's approximation is within ~1%.
    p = popularity_weights(300, kind, exponent)
    assert lru_hit_rate(p, slots) == pytest.approx(_simulated_lru_hits(p, slots, 60_000, seed=7), abs=0.015)
    assert lru_hit_rate(p, 0) == 0.0 and lru_hit_rate(p, 300) == 1.0


def test_expected_distinct_adapters_matches_sampling() -> None:
    rng = np.random.default_rng(3)
    p = popularity_weights(500, "zipf", 1.0)
    draws = [len(set(rng.choice(500, size=32, p=p))) for _ in range(3000)]
    assert expected_distinct(p, 32) == pytest.approx(np.mean(draws), rel=0.02)
