"""`memplan calibrate`: fit the CUDA device terms from measured profiles and
report the estimator's error on the records NOT used for fitting.

Three named constants, nothing per setup (see `device_terms.py`):
- `cuda_context_bytes`: the median of the NVML process memory measured right after
  CUDA initialisation, before any tensor (a direct measurement, not a regression).
- `workspace_bytes`: the median over the fitting records of (measured allocated peak -
  predicted allocated peak), floored at 0: library workspaces the model does not name.
- `allocator_fraction`: the median over the fitting records of
  (NVML used at the peak - context - allocated peak) / allocated peak: the caching
  allocator's reserved-but-unallocated slack plus library workspaces.
Records are split deterministically (a hash of the record id) into a fitting half
and a held-out half; every error statistic is computed on the held-out half.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memplan.measure.records import record_spec
from memplan.measure.stats import error_stats
from memplan.training.device_terms import DeviceTerms
from memplan.errors import ProfileError
from memplan.training.estimate import estimate
from memplan.files import atomic_write_bytes, check_writable
from memplan.paths import user_terms_file
from memplan.training.setup import Setup

__all__ = ["CalibrationRow", "Calibration", "calibrate", "write_device_terms"]


@dataclass(frozen=True)
class CalibrationRow:
    record_id: str
    label: str
    used_for_fit: bool
    predicted_allocated: int
    measured_allocated: int
    predicted_nvml: int
    measured_nvml: int | None

    @property
    def allocated_error(self) -> float:
        return (self.predicted_allocated - self.measured_allocated) / self.measured_allocated

    @property
    def nvml_error(self) -> float | None:
        if not self.measured_nvml:
            return None
        return (self.predicted_nvml - self.measured_nvml) / self.measured_nvml


@dataclass(frozen=True)
class Calibration:
    terms: DeviceTerms
    rows: tuple[CalibrationRow, ...]

    def held_out(self) -> list[CalibrationRow]:
        return [r for r in self.rows if not r.used_for_fit]

    def summary(self) -> dict[str, Any]:
        test = self.held_out()
        alloc = error_stats(r.allocated_error for r in test)
        nvml = error_stats(r.nvml_error for r in test)
        return {
            "records": len(self.rows),
            "fit_records": len(self.rows) - len(test),
            "held_out_records": len(test),
            "allocated_median_abs_error": alloc.median_abs if alloc else None,
            "allocated_max_abs_error": alloc.max_abs if alloc else None,
            "nvml_median_abs_error": nvml.median_abs if nvml else None,
            "nvml_max_abs_error": nvml.max_abs if nvml else None,
            "terms": asdict(self.terms),
        }


def _in_fit_half(record_id: str) -> bool:
    return hashlib.sha256(record_id.encode()).digest()[0] % 2 == 0


def _usable(rec: dict[str, Any]) -> bool:
    m = rec.get("measured") or {}
    return rec.get("outcome") == "ok" and rec.get("setup", {}).get("device") == "cuda" and bool(m.get("steady_peak_bytes"))


def calibrate(records: list[dict[str, Any]]) -> Calibration:
    cuda = [r for r in records if _usable(r)]
    if len(cuda) < 2:
        raise ProfileError(f"calibration needs at least 2 successful CUDA records in profiles/, found {len(cuda)}")
    zero = DeviceTerms(device="cuda", source="uncalibrated")
    prepared = []
    for rec in cuda:
        setup = Setup.from_dict(rec["setup"])
        est = estimate(setup, model=record_spec(rec), terms=zero)
        # Without device terms: what torch's allocator holds (paged optimizer state lives in
        # CUDA unified memory, outside it) and what the device holds (paged state included).
        prepared.append((rec, setup, est.memory.allocated_peak, est.memory.peak))
    fit = [(r, a) for r, _, a, _ in prepared if _in_fit_half(str(r.get("id")))]
    if not fit:
        fit = [(r, a) for r, _, a, _ in prepared[: len(prepared) // 2 or 1]]
    fit_ids = {id(r) for r, _ in fit}
    contexts = [int(r["measured"]["cuda_context_bytes"]) for r, _ in fit if r["measured"].get("cuda_context_bytes")]
    context = int(statistics.median(contexts)) if contexts else 0
    workspace = max(0, int(statistics.median(int(r["measured"]["steady_peak_bytes"]) - p for r, p in fit)))
    slack = []
    for r, _ in fit:
        m = r["measured"]
        if m.get("nvml_peak_bytes"):
            slack.append((int(m["nvml_peak_bytes"]) - context - int(m["steady_peak_bytes"])) / int(m["steady_peak_bytes"]))
    fraction = max(0.0, statistics.median(slack)) if slack else 0.0
    terms = DeviceTerms(
        device="cuda",
        cuda_context_bytes=context,
        workspace_bytes=workspace,
        allocator_fraction=round(fraction, 5),
        source=f"memplan calibrate: {len(fit)} of {len(prepared)} CUDA records fitted, the rest held out",
    )
    rows = []
    for rec, setup, alloc_pred, device_pred in prepared:
        m = rec["measured"]
        rows.append(
            CalibrationRow(
                record_id=str(rec.get("id")),
                label=setup.label(layers=rec.get("layers")),
                used_for_fit=id(rec) in fit_ids,
                predicted_allocated=alloc_pred + terms.allocated_extra_bytes(),
                measured_allocated=int(m["steady_peak_bytes"]),
                predicted_nvml=device_pred + terms.overhead_bytes(device_pred),
                measured_nvml=int(m["nvml_peak_bytes"]) if m.get("nvml_peak_bytes") else None,
            )
        )
    return Calibration(terms=terms, rows=tuple(rows))


def write_device_terms(cal: Calibration, path: Path | None = None) -> Path:
    """Atomically merge the fitted CUDA terms into the user's terms file (default:
    `memplan.paths.user_terms_file()`); the shipped data/device_terms.json is never written."""
    path = Path(path) if path is not None else user_terms_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path, flag="--terms")
    try:
        current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        raise ProfileError(f"--terms {path} is not a JSON device terms file; give another path or delete it") from None
    if not isinstance(current, dict):
        raise ProfileError(f"--terms {path} is not a JSON device terms file; give another path or delete it")
    entry = asdict(cal.terms)
    entry.pop("device")
    entry["held_out"] = {k: v for k, v in cal.summary().items() if k != "terms"}
    current["cuda"] = entry
    atomic_write_bytes(path, (json.dumps(current, indent=2) + "\n").encode("utf-8"))
    return path
