"""Notes on a parallel layout's per-GPU estimate (`memplan.training.notes` adds them).

Each names the library behaviour behind a non-obvious part of the per-GPU number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.model.storage import FLOAT_BYTES, is_four_bit
from memplan.training.parallel import is_fsdp, is_zero
from memplan.training.sharding import same_as, zero_buckets
from memplan.units import format_bytes

if TYPE_CHECKING:
    from memplan.training.estimate import Estimate

__all__ = ["sharding_notes"]


# What FSDP holds unsharded at each phase of the step (memplan.training.sharding, from the wrappers' code).
_FSDP_PEAK: dict[int, dict[str, str]] = {
    1: {
        "forward_layers": "the root unit and the layer running its forward",
        "forward": "the root unit stays gathered from forward to backward",
        "backward_loss": "the root unit stays gathered from forward to backward",
        "backward_layers": "the root unit, the layer in backward and the one BACKWARD_PRE prefetches",
        "backward_layer_norm": "the root unit, the layer in backward and the prefetched one, the layer's unsharded gradients",
        "backward_layer_end": "a layer's post-backward: its unsharded gradients and the padded flat gradient built for the "
                              "reduce-scatter, beside the gathered layers",
        "backward_first_layer": "the root unit and layer 0",
        "backward_first_layer_norm": "the root unit and layer 0, with layer 0's unsharded gradients",
        "backward_end": "the root's post-backward: its unsharded gradients and their flat copy",
    },
    2: {
        "forward_layers": "the layer running its forward and the next layer's flat all-gather output",
        "forward": "the tail group (norm, lm_head) stays gathered until its backward",
        "backward_loss": "the tail group (norm, lm_head) stays gathered until its backward",
        "backward_layers": "the layer in backward, the next group's flat all-gather output and the previous group's "
                           "reduce-scatter input",
        "backward_layer_norm": "the layer in backward, the next group's all-gather output, the previous reduce-scatter "
                               "input and the layer's unsharded gradients",
        "backward_layer_end": "a layer's post-backward: its reduce-scatter input beside the next group's all-gather output",
        "backward_first_layer": "layer 0, the embedding's (or layer 0's) all-gather output and layer 1's reduce-scatter input",
        "backward_first_layer_norm": "layer 0 with its unsharded gradients, the embedding's all-gather output and layer 1's "
                                     "reduce-scatter input",
        "backward_end": "the embedding group's post-backward: the table, its unsharded gradient and the reduce-scatter input",
    },
}

# Shard-grad-op (reshard_after_forward=False) keeps each group gathered from its forward to its backward.
_SHARD_GRAD_OP: dict[str, str] = {
    "forward_layers": "every group gathered so far (shard-grad-op keeps each until its backward) and the running "
                      "layer's flat all-gather output",
    "forward": "the whole model gathered (shard-grad-op keeps each group until its backward) and the last group's "
               "flat all-gather output",
    "backward_loss": "the whole model gathered (shard-grad-op keeps each group until its backward)",
    "backward_layers": "every group whose backward has not run yet, gathered since the forward",
    "backward_layer_norm": "every group whose backward has not run yet, gathered since the forward, and the layer's "
                           "unsharded gradients",
}


def sharding_notes(est: "Estimate") -> list[str]:
    s, sh = est.setup, est.sharding
    if sh is None:
        return []
    out = [f"per GPU: {s.gpus} ranks, each runs the whole model on its own micro-batch of {s.batch_size}; "
           "NCCL's own buffers and communication time are not counted"]
    if is_fsdp(s.parallel):
        gathered = est.peak_parts.get("gathered", 0)
        table = {**_FSDP_PEAK[s.fsdp_version], **(_SHARD_GRAD_OP if s.parallel == "fsdp_shard_grad_op" else {})}
        why = table.get(same_as(est.memory.peak_phase, table))
        if why and gathered:
            out.append(f"FSDP{s.fsdp_version} holds {format_bytes(gathered)} of unsharded parameters and gradient buffers at "
                       f"the peak ({est.memory.peak_phase}: {why})")
        else:
            out.append(f"FSDP{s.fsdp_version} holds nothing unsharded at the peak ({est.memory.peak_phase}: the step runs on "
                       "the rank's shards)")
        if s.fsdp_version == 1 and s.method == "lora":
            out.append("PEFT's fsdp_auto_wrap_policy wraps every LoRA Linear as its own FSDP unit (one dtype and one "
                       "requires_grad per FlatParameter)")
        if sh.padding:
            out.append(f"FlatParameter/shard padding: {format_bytes(sh.padding)} per GPU")
    if is_zero(s.parallel):
        reduce_bucket, _prefetch, _live, persistence = zero_buckets(s, est.model.hidden_size)
        source = "DeepSpeed's default" if s.recipe == "plain" else "Trainer's \"auto\" (hidden²)"
        # Stages 1/2 allocate the bucket at the first gradient hook (a phase buffer), stage 3 for the run.
        ts = FLOAT_BYTES[est.adapter_dtype] if est.adapter_dtype else FLOAT_BYTES[s.param_dtype]
        bucket = sh.comm_buffers or reduce_bucket * ts
        out.append(f"ZeRO reduce bucket of {reduce_bucket:,} elements ({source}): {format_bytes(bucket)} per GPU"
                   + ("; set reduce_bucket_size (or run through Trainer, --recipe trainer) to shrink it"
                      if s.recipe == "plain" and bucket > 2**28 else ""))
        if s.offload == "none":
            out.append(f"DeepSpeed keeps an fp32 master partition and fp32 optimizer states: {format_bytes(sh.master_weights)} "
                       f"+ {format_bytes(sh.optimizer_states)} per GPU, whatever the model dtype")
        else:
            out.append("DeepSpeed keeps the fp32 master partition, the fp32 optimizer states and the fp32 gradient partition "
                       "on the host (offload_optimizer), and steps there")
        if s.parallel == "zero3":
            out.append(f"ZeRO-3 keeps parameters of at most {persistence:,} elements (stage3_param_persistence_threshold) "
                       "gathered on every rank, and reuses gathered layers within stage3_max_reuse_distance")
    if is_four_bit(s.quant) and s.quant_storage != "uint8":
        out.append(f"bnb_4bit_quant_storage={s.quant_storage}: the packed 4-bit data is sharded as {s.quant_storage} "
                   "elements (still 0.5 bytes per weight); the quant state stays whole on every rank")
    if sh.host_per_gpu:
        out.append(f"offload ({s.offload}) needs {format_bytes(sh.host_per_gpu)} of host RAM per GPU, "
                   f"{format_bytes(sh.host_per_node)} per node of {s.gpus_per_node}"
                   + ("; on --device cpu DeepSpeed's CPU accelerator keeps both in the same RAM, so a rank's process "
                      "holds the per-GPU figure plus the host's" if s.device == "cpu" else ""))
    return out
