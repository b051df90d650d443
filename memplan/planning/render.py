"""Text renderings of an `Estimate`: a readable table, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json

from memplan.training.estimate import Estimate
from memplan.training.fit import fit_on, fits_on_catalog
from memplan.hardware.gpus import GPU, gpu_catalog
from memplan.planning.labels import PART_LABELS
from memplan.units import format_bytes, format_count, to_gib

__all__ = ["render_estimate", "estimate_payload"]

# The table's rows: the app's part labels, in the same order; the table says whose weights they are.
_ROWS = tuple({**PART_LABELS, "weights": "weights (base)"}.items())


def estimate_payload(est: Estimate, gpu: GPU | None = None) -> dict:
    d = est.to_dict()
    if gpu is not None:
        f = fit_on(est, gpu)
        d["gpu"] = {"name": gpu.key, "usable_bytes": f.usable_bytes, "headroom_bytes": f.headroom_bytes, "fits": f.fits}
    if est.setup.device == "cuda":
        d["fits_on"] = [f.gpu for f in fits_on_catalog(est, gpu_catalog()) if f.fits]
    return d


def render_estimate(est: Estimate, fmt: str, gpu: GPU | None = None) -> str:
    payload = estimate_payload(est, gpu)
    if fmt == "json":
        return json.dumps(payload, indent=2)
    if fmt == "csv":
        flat = {
            "model": payload["model"],
            **{f"setup.{k}": (",".join(v) if isinstance(v, list) else v) for k, v in payload["setup"].items()},
            "parameters.total": payload["parameters"]["total"],
            "parameters.trainable": payload["parameters"]["trainable"],
            **{f"memory_bytes.{k}": v for k, v in payload["memory_bytes"].items()},
            "peak_phase": payload["peak_phase"],
        }
        if "gpu" in payload:
            flat.update({f"gpu.{k}": v for k, v in payload["gpu"].items()})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(flat), lineterminator="\n")
        w.writeheader()
        w.writerow(flat)
        return buf.getvalue().rstrip("\n")
    return _table(est, payload, gpu)


def _layout_lines(est: Estimate) -> list[str]:
    """The parallel layout and the host memory it needs (nothing for one GPU)."""
    s, sh = est.setup, est.sharding
    if sh is None:
        return []
    name = {"ddp": "DDP", "fsdp": "FSDP full shard", "fsdp_shard_grad_op": "FSDP shard-grad-op", "fsdp_hybrid": "FSDP hybrid shard",
            "zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}[s.parallel]
    if s.parallel.startswith("fsdp"):
        name += f" (FSDP{s.fsdp_version})"
    line = f"{name} over {s.gpus} GPUs ({s.gpus_per_node} per node), shards of {sh.shard_group}; every figure below is per GPU"
    out = [line]
    if s.offload != "none":
        out.append(f"offload {s.offload}: host RAM {format_bytes(sh.host_per_gpu)} per GPU, {format_bytes(sh.host_per_node)} per node")
    return out


def _table(est: Estimate, payload: dict, gpu: GPU | None) -> str:
    s = est.setup
    m = est.memory
    lines = [
        f"{est.model.name} ({est.model.architecture}): {format_count(est.total_parameters)} parameters"
        + (f", {format_count(est.active_parameters)} active per token" if est.model.num_experts else ""),
        f"{s.method} fine-tuning, {s.quant}{' + double quant' if s.double_quant else ''}"
        + (f" weights with {s.autocast} autocast" if s.autocast != "none" else "")
        + (f", LoRA r={s.lora_rank} on {_lora_targets(est)}" if s.method == "lora" else "")
        + f", seq {s.seq_len} x batch {s.batch_size}, {s.optimizer}, {s.attention}"
        + (", checkpointing" if s.grad_checkpointing else "")
        + f", {s.device}"
        + (f", recipe {s.recipe}" if s.recipe != "plain" else ""),
        *_layout_lines(est),
        f"trainable: {format_count(est.trainable_parameters)} ({est.trainable_parameters:,})"
        + (f"; adapter file {format_bytes(est.adapter_file_bytes['fp32'], decimal=True)} fp32 / "
           f"{format_bytes(est.adapter_file_bytes['bf16'], decimal=True)} bf16" if est.adapter_file_bytes else ""),
        "",
        f"{'at the peak (' + m.peak_phase + ')':<28}{'GiB':>10}{'share':>8}",
    ]
    for key, label in _ROWS:
        v = est.peak_parts.get(key, 0)
        if v == 0 and key in ("adapters", "overhead", "transients", "master_weights", "comm_buffers", "gathered"):
            continue
        share = 100.0 * v / m.peak if m.peak else 0.0
        lines.append(f"  {label:<26}{to_gib(v):>10.2f}{share:>7.0f}%")
    lines.append(f"  {'peak':<26}{to_gib(m.peak):>10.2f}")
    if m.optimizer_paged:
        lines.append(f"  (of the optimizer states, {format_bytes(m.optimizer_paged)} are paged and evictable)")
    if gpu is not None:
        f = payload["gpu"]
        verdict = "fits" if f["fits"] else "does NOT fit"
        lines.append("")
        lines.append(f"{gpu.name}: {format_bytes(f['usable_bytes'])} usable, headroom {format_bytes(f['headroom_bytes'])}: {verdict}")
    if "fits_on" in payload:
        lines.append(f"fits on: {', '.join(payload['fits_on']) or 'no single catalog GPU'}")
    if est.device_terms.source == "none" and s.device == "cuda":
        lines.append("note: no CUDA device terms calibrated yet; the peak excludes the CUDA context")
    if payload["notes"]:
        lines.append("")
        lines.append("notes:")
        lines += [f"  - {n}" for n in payload["notes"]]
    return "\n".join(lines)


def _lora_targets(est: Estimate) -> str:
    """The module names the adapters go on; PEFT's default is spelled out (`on default` said nothing)."""
    from memplan.model.lora import plan_lora

    names = ", ".join(plan_lora(est.model, est.setup.lora_rank, est.setup.lora_targets).target_names)
    return names if est.setup.lora_targets is not None else f"{names} (PEFT default)"
