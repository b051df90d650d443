"""The profiler: real fine-tuning steps measured on CUDA (allocator + NVML) or the CPU (exact storage ledger).

`profile_setup(setup, layers=..., steps=...)` measures one setup in-process and
returns a record (see `memplan.measure.records`); `run_campaign` runs many, one
subprocess each. This package is the only part of memplan that imports torch,
transformers, peft, bitsandbytes and pynvml, and only when a function runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["profile_setup", "run_campaign", "expand_grid", "load_grid_file", "Job"]


def __getattr__(name: str) -> Any:
    if name == "profile_setup":
        from memplan.measure.profiler.run import profile_setup

        return profile_setup
    if name in ("run_campaign", "expand_grid", "load_grid_file", "Job"):
        from memplan.measure.profiler import campaign

        return getattr(campaign, name)
    raise AttributeError(name)
