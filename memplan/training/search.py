"""`memplan fit`: the largest batch, longest sequence and highest rank that fit a GPU,
the smallest and cheapest catalog GPU that fits a setup, and past one GPU the fewest GPUs
or the cheapest cluster (`memplan.training.clusters`), all gathered by `fit_answer`.

Memory is monotone in batch, sequence and rank (tests check it), so each limit is
found by doubling then bisection over `estimate`: one formula, no second model. Under a
parallel layout the limits are per GPU (`--batch-size` is per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from memplan.model.catalog import load_model
from memplan.errors import MemplanError
from memplan.training.clusters import LayoutFit, cheapest_clusters, fewest_gpus
from memplan.training.estimate import Estimate, estimate
from memplan.training.fit import fit_on
from memplan.hardware.gpus import GPU, GPUCatalog
from memplan.training.setup import Setup
from memplan.model.spec import ModelSpec

__all__ = ["Limits", "limits_on", "smallest_gpu", "cheapest_gpu", "FitAnswer", "fit_answer"]


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


def _fitting(est: Estimate, catalog: GPUCatalog) -> list[GPU]:
    return [g for g in catalog.gpus if fit_on(est, g).fits]


def _smallest(gpus: list[GPU]) -> GPU | None:
    return min(gpus, key=lambda g: (g.usable_bytes, g.usd_per_hour), default=None)


def _cheapest(gpus: list[GPU]) -> GPU | None:
    return min(gpus, key=lambda g: (g.usd_per_hour, g.usable_bytes), default=None)


def smallest_gpu(setup: Setup, catalog: GPUCatalog) -> GPU | None:
    """The catalog GPU with the least usable memory that still fits (per GPU, under the setup's layout)."""
    return _smallest(_fitting(estimate(setup), catalog))


def cheapest_gpu(setup: Setup, catalog: GPUCatalog) -> GPU | None:
    """The catalog GPU with the lowest price per hour that still fits (per GPU, under the setup's layout)."""
    return _cheapest(_fitting(estimate(setup), catalog))


@dataclass(frozen=True)
class FitAnswer:
    """Everything `memplan fit` reports for one setup (rendered by `memplan.planning.render_fit`)."""

    setup: Setup
    peak_bytes: int  # the setup as given, per GPU
    smallest: GPU | None  # single catalog GPU types that hold the setup as given
    cheapest: GPU | None
    gpu: GPU | None  # the GPU asked about (--gpu)
    # Past one GPU: per layout, the fewest `gpu`s (gpu given) or the cheapest cluster (no gpu),
    # best first (`memplan.training.clusters`); None where nothing was searched.
    layouts: tuple[LayoutFit, ...] | None = None
    limits: Limits | None = None  # on `gpu`, for `limits_setup`
    limits_setup: Setup | None = None  # the setup as given, or the best cluster found when that does not fit one GPU


def fit_answer(setup: Setup, catalog: GPUCatalog, *, gpu: GPU | None = None, gpus_per_node: int | None = None,
               spec: ModelSpec | None = None) -> FitAnswer:
    """The single-GPU answers, and the cluster search where it applies: a layout was given
    (`--parallel`), or none was and one GPU does not hold the setup (`gpu`, or with no `gpu`
    any catalog GPU). `gpus_per_node`: the node size whole-node counts step by (None: data/gpus.json's gpus_per_node)."""
    spec = spec if spec is not None else load_model(setup.model)
    est = estimate(setup, model=spec)  # an impossible setup raises here, once
    fitting = _fitting(est, catalog)
    small, cheap = _smallest(fitting), _cheapest(fitting)
    layouts: list[LayoutFit] | None = None
    target = setup
    if gpu is not None:
        if setup.parallel != "none" or est.memory.peak > gpu.usable_bytes:
            layouts = fewest_gpus(setup, gpu, spec=spec, gpus_per_node=gpus_per_node)
            best = layouts[0].fewest.get(gpu.key) if layouts else None
            if best is not None and setup.gpus == 1 and est.memory.peak > gpu.usable_bytes:
                target = best.setup  # the limits of the cluster that holds it, per GPU
    elif setup.parallel != "none" or small is None:
        layouts = cheapest_clusters(setup, catalog.gpus, spec=spec, gpus_per_node=gpus_per_node)
    limits = limits_on(target, gpu, spec=spec) if gpu is not None else None
    return FitAnswer(setup=setup, peak_bytes=est.memory.peak, smallest=small, cheapest=cheap, gpu=gpu,
                     layouts=tuple(layouts) if layouts is not None else None, limits=limits,
                     limits_setup=target if gpu is not None else None)
