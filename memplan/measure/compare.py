"""Predicted vs measured: the estimator checked against profile records.

For every `ok` record, re-run `estimate()` on the record's setup (on the model
config the run used, truncated to its `layers`) and pair each component with
its measurement:

| component        | predicted (`Estimate.to_dict()["memory_bytes"]`) | measured (`record["measured"]`) |
|------------------|--------------------------------------------------|---------------------------------|
| weights          | weights (base model only)                        | weights_bytes (ledger, after load) |
| adapters         | adapters (LoRA only)                             | trainable_bytes                 |
| gradients        | gradients                                        | gradients_bytes (last backward) |
| optimizer_states | optimizer_states                                 | optimizer_state_bytes           |
| activations      | activations_and_logits                           | activations_bytes (end of last forward) |
| peak             | allocated_peak (+ host on a CPU run: offloaded state shares the RAM) | steady_peak_bytes (CUDA max allocated / CPU ledger) |
| device_peak      | peak (CUDA only)                                 | nvml_peak_bytes                 |

`rel_error` = (predicted - measured) / measured (0 when both are 0; None when nothing
was measured or the measurement is 0). Records that ended in `oom` or
`error` have nothing to compare and are left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from memplan.errors import MemplanError, ProfileError
from memplan.measure.records import record_spec
from memplan.training.setup import Setup

if TYPE_CHECKING:
    import pandas as pd

    from memplan.training.estimate import Estimate

__all__ = ["COMPONENTS", "compare_record", "compare_records", "measured_peak_prediction", "record_spec"]

COMPONENTS = ("weights", "adapters", "gradients", "optimizer_states", "activations", "peak", "device_peak")
_SETUP_COLUMNS = ("model", "method", "quant", "double_quant", "lora_rank", "lora_targets", "seq_len", "batch_size",
                  "grad_checkpointing", "optimizer", "attention", "device", "autocast")


def measured_peak_prediction(est: "Estimate") -> int:
    """The estimate of what a profile's `steady_peak_bytes` counts: the allocated peak per GPU, plus,
    on `--device cpu`, the state DeepSpeed offloads to the host, which its CPU accelerator keeps in the
    same RAM as the "device" buffers (the ledger sees both in one process)."""
    host = est.sharding.host_per_gpu if est.sharding is not None and est.setup.device == "cpu" else 0
    return est.memory.allocated_peak + host


def compare_record(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of (component, predicted_bytes, measured_bytes, rel_error) for one ok record."""
    from memplan.training.estimate import estimate

    if record.get("outcome") != "ok":
        return []
    setup = Setup.from_dict(record["setup"])
    try:
        spec = record_spec(record)
    except MemplanError as exc:
        raise ProfileError(f"cannot re-estimate record {record.get('id')}: {exc}") from None
    full = estimate(setup, model=spec)
    mem = full.to_dict()["memory_bytes"]
    m = record.get("measured") or {}
    measured_weights = m.get("weights_bytes")
    if (setup.prepare_kbit_training or record.get("rank") is not None) and m.get("parameters_bytes") is not None:
        # prepare_model_for_kbit_training upcasts after loading, and a rank's shard is made after
        # loading the whole model: compare what training holds (per GPU for a rank).
        measured_weights = m["parameters_bytes"] - ((m.get("trainable_bytes") or 0) if setup.method == "lora" else 0)
    pairs: list[tuple[str, int, Any]] = [("weights", mem["weights"], measured_weights)]
    if setup.method == "lora":
        pairs.append(("adapters", mem["adapters"], m.get("trainable_bytes")))
    pairs += [
        ("gradients", mem["gradients"], m.get("gradients_bytes")),
        ("optimizer_states", mem["optimizer_states"], m.get("optimizer_state_bytes")),
        ("activations", mem["activations_and_logits"], m.get("activations_bytes")),
        ("peak", measured_peak_prediction(full), m.get("steady_peak_bytes")),
    ]
    if setup.device == "cuda":
        pairs.append(("device_peak", mem["peak"], m.get("nvml_peak_bytes")))
    rank = record.get("rank")
    base = {"id": record["id"], "label": setup.label(layers=record.get("layers")) + (f" rank {rank}" if rank is not None else ""),
            "layers": record.get("layers"),
            "device_name": (record.get("env") or {}).get("device_name")}
    d = setup.to_dict()
    for col in _SETUP_COLUMNS:
        base[col] = ",".join(d[col]) if col == "lora_targets" and d[col] else d[col]
    rows = []
    for component, predicted, measured in pairs:
        rel = None  # no measurement, or nothing measured against a non-zero prediction
        if measured:
            rel = (predicted - measured) / measured
        elif measured == 0 and predicted == 0:
            rel = 0.0
        rows.append({**base, "component": component, "predicted_bytes": int(predicted),
                     "measured_bytes": None if measured is None else int(measured), "rel_error": rel})
    return rows


def compare_records(records: Iterable[dict[str, Any]]) -> "pd.DataFrame":
    """One row per (ok record, component); columns as in `compare_record`."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    for r in records:
        rows += compare_record(r)
    columns = ["id", "label", *_SETUP_COLUMNS, "layers", "device_name", "component", "predicted_bytes", "measured_bytes", "rel_error"]
    return pd.DataFrame(rows, columns=columns)
