"""Named device constants that no model formula can produce, fitted by
`memplan calibrate` from profile records. The shipped defaults are
`data/device_terms.json` (read-only); `memplan calibrate --write` stores the user's
own in the user config dir (`memplan.paths.user_terms_file`), which wins when present.

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

from pathlib import Path

from memplan.errors import ConfigError
from memplan.paths import shipped_terms_file, user_terms_file

__all__ = ["DeviceTerms", "device_terms", "terms_file", "terms_note"]


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


def terms_file() -> tuple[Path, bool]:
    """The device terms file in use and whether it is the user's: the user's file when it
    exists, else the shipped defaults."""
    user = user_terms_file()
    return (user, True) if user.is_file() else (shipped_terms_file(), False)


def terms_note() -> str:
    """One line saying which device terms the estimates use (the commands print it on stderr)."""
    path, is_user = terms_file()
    return f"device terms: {path} ({'your calibration' if is_user else 'shipped defaults'})"


@lru_cache(maxsize=4)
def device_terms(device: str) -> DeviceTerms:
    path, _ = terms_file()
    if device != "cuda" or not path.is_file():
        return DeviceTerms(device=device)
    try:
        raw = json.loads(path.read_text(encoding="utf-8")).get(device)
        if not raw:
            return DeviceTerms(device=device)
        return DeviceTerms(
            device=device,
            cuda_context_bytes=int(raw.get("cuda_context_bytes", 0)),
            workspace_bytes=int(raw.get("workspace_bytes", 0)),
            allocator_fraction=float(raw.get("allocator_fraction", 0.0)),
            source=str(raw.get("source", "")),
        )
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"device terms file {path} is unreadable or malformed ({type(exc).__name__}); "
                          "run `memplan calibrate` again or delete it") from None
