"""Per-layer extrapolation of truncated profile runs to full depth.

Models too large for one GPU (70B, Mixtral) are measured with `memplan profile
--layers N` at two or more depths. Every decoder layer of a model is the same, so
each measured quantity is linear in the depth: M(L) = fixed + L * per_layer, where
`fixed` holds the embeddings, lm_head, logits and device terms. A least-squares line
through the measured depths gives M at the model's full depth, which is set beside the
estimator's full-depth prediction and, where the same setup was also measured at full
depth (a model that fits, such as Llama-2-13B QLoRA), beside that measurement.

Ignores: a change of peak phase between depths (the line then bends; with two depths
it cannot be seen, with three the residual shows it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from memplan.training.setup import Setup

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DepthFit", "METRICS", "depth_fits", "depth_frame"]

# measured field -> the Estimate.memory field it is compared with
METRICS = {"steady_peak_bytes": "allocated_peak", "nvml_peak_bytes": "peak"}


@dataclass(frozen=True)
class DepthFit:
    """One setup measured at several truncated depths, extrapolated to full depth."""

    setup: Setup
    device_name: str
    metric: str
    depths: tuple[int, ...]
    measured: tuple[int, ...]
    per_layer_bytes: float
    fixed_bytes: float
    full_depth: int
    extrapolated_bytes: int
    max_residual_bytes: float  # largest distance of a measured depth from the line (0 for two depths)
    predicted_bytes: int  # the estimator at full depth
    measured_full_bytes: int | None  # a full-depth record of the same setup, if one exists

    @property
    def error_vs_predicted(self) -> float:
        """(predicted - extrapolated) / extrapolated."""
        return (self.predicted_bytes - self.extrapolated_bytes) / self.extrapolated_bytes

    @property
    def extrapolation_error(self) -> float | None:
        """(extrapolated - measured at full depth) / measured: the method's own error."""
        if not self.measured_full_bytes:
            return None
        return (self.extrapolated_bytes - self.measured_full_bytes) / self.measured_full_bytes


def _line(xs: list[int], ys: list[int]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, largest |residual|)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) for x, y in zip(xs, ys))


def depth_fits(records: Iterable[dict[str, Any]]) -> list[DepthFit]:
    """Every (setup, device, metric) measured `ok` at two or more distinct truncated depths."""
    from memplan.model.catalog import load_model
    from memplan.training.estimate import estimate

    groups: dict[tuple[str, str, int], dict[int | None, dict[str, Any]]] = {}
    for r in records:
        if r.get("outcome") != "ok":
            continue
        setup = Setup.from_dict(r["setup"])
        key = (json.dumps(setup.to_dict(), sort_keys=True), str((r.get("env") or {}).get("device_name", setup.device)), r["steps"])
        groups.setdefault(key, {})[r.get("layers")] = r  # the latest record per depth wins
    fits: list[DepthFit] = []
    for (setup_json, device_name, _), by_depth in groups.items():
        setup = Setup.from_dict(json.loads(setup_json))
        spec = load_model(setup.model)
        depths = sorted(d for d in by_depth if d is not None and d < spec.num_layers)
        if len(depths) < 2:
            continue
        est = estimate(setup, model=spec).memory
        full = by_depth.get(None) or by_depth.get(spec.num_layers)
        for metric, predicted_field in METRICS.items():
            ys = [by_depth[d]["measured"].get(metric) for d in depths]
            if any(y is None for y in ys):
                continue
            a, b, resid = _line(depths, ys)
            measured_full = (full or {}).get("measured", {}).get(metric) if full else None
            fits.append(DepthFit(
                setup=setup, device_name=device_name, metric=metric, depths=tuple(depths), measured=tuple(ys),
                per_layer_bytes=b, fixed_bytes=a, full_depth=spec.num_layers,
                extrapolated_bytes=round(a + b * spec.num_layers), max_residual_bytes=resid,
                predicted_bytes=getattr(est, predicted_field), measured_full_bytes=measured_full,
            ))
    return fits


def depth_frame(records: Iterable[dict[str, Any]]) -> "pd.DataFrame":
    """`depth_fits` as a DataFrame, one row per (setup, device, metric)."""
    import pandas as pd

    rows = []
    for f in depth_fits(records):
        s = f.setup
        rows.append({
            "label": s.label(), "model": s.model, "method": s.method, "quant": s.quant, "double_quant": s.double_quant, "lora_rank": s.lora_rank,
            "lora_targets": ",".join(s.lora_targets) if s.lora_targets else None, "seq_len": s.seq_len, "batch_size": s.batch_size,
            "grad_checkpointing": s.grad_checkpointing, "optimizer": s.optimizer, "device_name": f.device_name, "metric": f.metric,
            "depths": ",".join(map(str, f.depths)), "full_depth": f.full_depth, "per_layer_bytes": round(f.per_layer_bytes),
            "extrapolated_bytes": f.extrapolated_bytes, "predicted_bytes": f.predicted_bytes,
            "error_vs_predicted": f.error_vs_predicted, "measured_full_bytes": f.measured_full_bytes,
            "extrapolation_error": f.extrapolation_error, "max_residual_bytes": round(f.max_residual_bytes),
        })
    return pd.DataFrame(rows)
