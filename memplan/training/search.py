"""`memplan fit`: the largest batch, longest sequence and highest rank that fit a GPU,
and the smallest and cheapest catalog GPU that fits a setup.

Memory is monotone in batch, sequence and rank (tests check it), so each limit is
found by doubling then bisection over `estimate`: one formula, no second model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from memplan.model.catalog import load_model
from memplan.errors import MemplanError
from memplan.training.estimate import estimate
from memplan.training.fit import Fit, fit_on
from memplan.hardware.gpus import GPU, GPUCatalog
from memplan.training.setup import Setup
from memplan.model.spec import ModelSpec

__all__ = ["Limits", "limits_on", "smallest_gpu", "cheapest_gpu"]


@dataclass(frozen=True)
class Limits:
    gpu: str
    fits_as_given: bool
    max_batch_size: int  # 0 when even batch 1 does not fit
    max_seq_len: int
    max_lora_rank: int | None  # None for full fine-tuning


def _largest(ok: Callable[[int], bool], ceiling: int) -> int:
    """Largest n in [1, ceiling] with ok(n), assuming ok is monotone decreasing; 0 if none."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= ceiling and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, ceiling + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _fits(setup: Setup, spec: ModelSpec, gpu: GPU) -> bool:
    try:
        return fit_on(estimate(setup, model=spec), gpu).fits
    except MemplanError:
        return False


def limits_on(setup: Setup, gpu: GPU, *, spec: ModelSpec | None = None) -> Limits:
    spec = spec if spec is not None else load_model(setup.model)
    seq_ceiling = 1 << 22
    batch = _largest(lambda n: _fits(replace(setup, batch_size=n), spec, gpu), 1 << 16)
    seq = _largest(lambda n: _fits(replace(setup, seq_len=n), spec, gpu), seq_ceiling)
    rank: int | None = None
    if setup.method == "lora":
        from memplan.model.lora import resolve_targets

        # PEFT trains any rank, but above a target's min(in, out) the extra rank adds memory and no
        # capacity (rank(B @ A) <= min(in, out)): the highest rank worth training is capped there.
        cap = min(min(lin.in_features, lin.out_features) for lin in resolve_targets(spec, setup.lora_targets))
        rank = _largest(lambda n: _fits(replace(setup, lora_rank=n), spec, gpu), cap)
    return Limits(gpu=gpu.key, fits_as_given=_fits(setup, spec, gpu), max_batch_size=batch, max_seq_len=seq, max_lora_rank=rank)


def _fitting(setup: Setup, catalog: GPUCatalog) -> list[tuple[GPU, Fit]]:
    est = estimate(setup)
    return [(g, f) for g in catalog.gpus if (f := fit_on(est, g)).fits]


def smallest_gpu(setup: Setup, catalog: GPUCatalog) -> GPU | None:
    """The catalog GPU with the least usable memory that still fits."""
    options = _fitting(setup, catalog)
    return min(options, key=lambda gf: (gf[0].usable_bytes, gf[0].usd_per_hour))[0] if options else None


def cheapest_gpu(setup: Setup, catalog: GPUCatalog) -> GPU | None:
    """The catalog GPU with the lowest price per hour that still fits."""
    options = _fitting(setup, catalog)
    return min(options, key=lambda gf: (gf[0].usd_per_hour, gf[0].usable_bytes))[0] if options else None
