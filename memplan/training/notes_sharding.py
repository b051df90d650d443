"""Notes on a parallel layout's per-GPU estimate (`memplan.training.notes` adds them).

Each names the library behaviour behind a non-obvious part of the per-GPU number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.model.storage import is_four_bit
from memplan.training.parallel import is_fsdp, is_zero
from memplan.training.sharding import zero_buckets
from memplan.units import format_bytes

if TYPE_CHECKING:
    from memplan.training.estimate import Estimate

__all__ = ["sharding_notes"]


def sharding_notes(est: "Estimate") -> list[str]:
    s, sh = est.setup, est.sharding
    if sh is None:
        return []
    out = [f"per GPU: {s.gpus} ranks, each runs the whole model on its own micro-batch of {s.batch_size}; "
           "NCCL's own buffers and communication time are not counted"]
    if is_fsdp(s.parallel):
        gathered = est.peak_parts.get("gathered", 0)
        out.append(f"FSDP{s.fsdp_version} holds {format_bytes(gathered)} of unsharded parameters and gradient buffers at the peak"
                   + (" (the root unit stays gathered from forward to backward; BACKWARD_PRE prefetch gathers the next "
                      "trainable layer)" if s.fsdp_version == 1 else
                      " (a layer's flat all-gather output beside its unsharded parameters, and the previous group's "
                      "reduce-scatter input)"))
        if s.fsdp_version == 1 and s.method == "lora":
            out.append("PEFT's fsdp_auto_wrap_policy wraps every LoRA Linear as its own FSDP unit (one dtype and one "
                       "requires_grad per FlatParameter)")
        if sh.padding:
            out.append(f"FlatParameter/shard padding: {format_bytes(sh.padding)} per GPU")
    if is_zero(s.parallel):
        reduce_bucket, _prefetch, _live, persistence = zero_buckets(s, est.model.hidden_size)
        source = "DeepSpeed's default" if s.recipe == "plain" else "Trainer's \"auto\" (hidden²)"
        out.append(f"ZeRO reduce bucket of {reduce_bucket:,} elements ({source}): {format_bytes(sh.comm_buffers)} per GPU"
                   + ("; set reduce_bucket_size (or run through Trainer, --recipe trainer) to shrink it"
                      if s.recipe == "plain" and sh.comm_buffers > 2**28 else ""))
        out.append(f"DeepSpeed keeps an fp32 master partition and fp32 optimizer states: {format_bytes(sh.master_weights)} "
                   f"+ {format_bytes(sh.optimizer_states)} per GPU, whatever the model dtype")
        if s.parallel == "zero3":
            out.append(f"ZeRO-3 keeps parameters of at most {persistence:,} elements (stage3_param_persistence_threshold) "
                       "gathered on every rank, and reuses gathered layers within stage3_max_reuse_distance")
    if is_four_bit(s.quant) and s.quant_storage != "uint8":
        out.append(f"bnb_4bit_quant_storage={s.quant_storage}: the packed 4-bit data is sharded as {s.quant_storage} "
                   "elements (still 0.5 bytes per weight); the quant state stays whole on every rank")
    if sh.host_per_gpu:
        out.append(f"offload ({s.offload}) needs {format_bytes(sh.host_per_gpu)} of host RAM per GPU, "
                   f"{format_bytes(sh.host_per_node)} per node of {s.gpus_per_node}")
    return out
