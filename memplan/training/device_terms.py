"""Named device constants that no model formula can produce, fitted by
`memplan calibrate` from `profiles/` and stored in `data/device_terms.json`.

- cuda_context_bytes: memory NVML shows for this process before any tensor
  (CUDA context, cuBLAS/cuDNN handles and workspaces).
- workspace_bytes: allocations no model formula names (cuBLAS/cuDNN workspaces,
  kernel scratch) that show up in torch's allocated bytes: the median residual of
  the allocated peak over the fitting records.
- allocator_fraction: the caching allocator's reserved-minus-allocated slack,
  as a fraction of the allocated peak.
On the CPU every term is zero: the ledger counts tensor storages exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from memplan.paths import data_dir

__all__ = ["DeviceTerms", "device_terms"]


@dataclass(frozen=True)
class DeviceTerms:
    device: str
    cuda_context_bytes: int = 0
    workspace_bytes: int = 0
    allocator_fraction: float = 0.0
    source: str = "none"

    def allocated_extra_bytes(self) -> int:
        """What torch's allocator holds beyond the modelled tensors."""
        return self.workspace_bytes

    def overhead_bytes(self, allocated_peak: int) -> int:
        """Device memory beyond the modelled tensors, as NVML would show it."""
        allocated = allocated_peak + self.workspace_bytes
        return self.workspace_bytes + self.cuda_context_bytes + int(self.allocator_fraction * allocated)


@lru_cache(maxsize=4)
def device_terms(device: str) -> DeviceTerms:
    path = data_dir() / "device_terms.json"
    if device != "cuda" or not path.is_file():
        return DeviceTerms(device=device)
    raw = json.loads(path.read_text()).get(device)
    if not raw:
        return DeviceTerms(device=device)
    return DeviceTerms(
        device=device,
        cuda_context_bytes=int(raw.get("cuda_context_bytes", 0)),
        workspace_bytes=int(raw.get("workspace_bytes", 0)),
        allocator_fraction=float(raw.get("allocator_fraction", 0.0)),
        source=str(raw.get("source", "")),
    )
