"""memplan: memory, GPU and cost planning for LLM fine-tuning and serving.

The estimator never imports torch; only `memplan.profiler` does, lazily.
"""

from __future__ import annotations

from memplan.catalog import catalog, load_model
from memplan.errors import MemplanError
from memplan.fleet import plan, plan_frame
from memplan.estimate import Estimate, Memory, estimate
from memplan.gpus import gpu_catalog
from memplan.setup import Setup
from memplan.spec import ModelSpec
from memplan.sweep import sweep

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
]
__version__ = "0.1.0"
