"""Does an estimate fit a GPU? Headroom is a value, not an exception."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.training.estimate import Estimate
from memplan.hardware.gpus import GPU, GPUCatalog

__all__ = ["Fit", "fit_on", "fits_on_catalog"]


@dataclass(frozen=True)
class Fit:
    gpu: str
    usable_bytes: int
    peak_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.peak_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0


def fit_on(est: Estimate, gpu: GPU) -> Fit:
    # Compare against what nvidia-smi reports as total (the catalog's usable_bytes):
    # the estimate's peak already includes the device terms (context, allocator slack).
    return Fit(gpu=gpu.key, usable_bytes=gpu.usable_bytes, peak_bytes=est.memory.peak)


def fits_on_catalog(est: Estimate, catalog: GPUCatalog) -> list[Fit]:
    return [fit_on(est, g) for g in catalog.gpus]
