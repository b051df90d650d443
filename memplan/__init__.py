"""memplan: memory, GPU and cost planning for LLM fine-tuning and serving.

The public API lives here; each name comes from the subpackage that owns it
(`model`, `hardware`, `training`, `serving`, `measure`, `planning`). No name here
shadows a module: `memplan.estimate` is the function, and the module that
defines it is `memplan.training.estimate`.

The estimator never imports torch; only `memplan.measure.profiler` does, lazily.
"""

from __future__ import annotations

from memplan.errors import MemplanError
from memplan.hardware.gpus import gpu_catalog
from memplan.model.catalog import catalog, load_model
from memplan.model.spec import ModelSpec
from memplan.planning.sweep import sweep
from memplan.serving.fleet import plan, plan_frame, sweep_variants
from memplan.training.estimate import Estimate, Memory, estimate
from memplan.training.setup import Setup

__all__ = [
    "Estimate",
    "Memory",
    "MemplanError",
    "ModelSpec",
    "Setup",
    "catalog",
    "estimate",
    "gpu_catalog",
    "load_model",
    "plan",
    "plan_frame",
    "sweep",
    "sweep_variants",
]
__version__ = "0.1.0"
