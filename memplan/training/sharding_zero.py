"""Per-GPU terms of DeepSpeed ZeRO stages 1-3 (`memplan.training.sharding.layout_terms` dispatches here).

Every term mirrors a buffer of deepspeed 0.19.8 (file::function below) and was checked buffer by buffer
on the CPU storage ledger at world size 2 (`memplan profile --device cpu --gpus 2 --parallel zero1|2|3`).
Notation: N ranks, Ψt trainable elements, ts their element size (the engine dtype: `recipes.adapter_dtype`),
B = reduce_bucket_size elements (Trainer's "auto" h², DeepSpeed's 5e8: `sharding.zero_buckets`).

- ZeRO-1/2 (`runtime/zero/stage_1_and_2.py::DeepSpeedZeroOptimizer`): the trainable parameters become views
  of one flat buffer of every trainable element, padded to a multiple of 2N (`__init__` ->
  `flatten_dense_tensors_aligned`, `nccl_start_alignment_factor = 2`), held whole by every rank; each rank
  keeps the fp32 master and optimizer state of its P = padded/N elements (arXiv:1910.02054 section 5.1,
  K = 12 bytes per trainable parameter over N for Adam). The reduce bucket lives for one backward, from
  the first gradient hook to the epilogue; stage 1 keeps autograd's whole gradients until the reduction
  after the backward, stage 2 reduces while it goes; both copy the rank's gradients into
  `grads_in_partition` (P plus the overhang of the parameters cut by the partition boundaries).
- ZeRO-3 (`stage3.py::DeepSpeedZeroOptimizer_Stage3`, `partition_parameters.py`): every parameter is
  partitioned on its own (ceil(numel/N) elements); the gradient partitions and the bucket are made once;
  what is gathered in each phase follows `partitioned_param_coordinator.py` (memplan.training.zero_gather).
- Phases are the estimator's (`estimate.py`); a phase's bytes are the worst rank's (the last rank makes its
  gradient partition first; rank 0's holds the largest overhang).
- CPU vs CUDA: on CUDA DeepSpeed's AdamW is FusedAdam (`ops/adam/fused_adam.py`: one fused kernel, no step
  temporaries); the CPU profiler runs `torch.optim.AdamW` (`torch_adam`), whose single-tensor path makes two
  fp32 temporaries the size of the partition (`exp_avg_sq.sqrt()` and its quotient). gloo's
  `reduce_scatter_tensor` copies its input, NCCL's does not.

Ignores: overlap_comm for stages 1/2 (off unless set; it doubles the bucket), stage3_max_live_parameters
(1e9, above what the trace keeps), round_robin_gradients, NCCL's own buffers, the 4-byte step tensors and
scalars of the norm and the loss scaler, a reduction's flattened copy beside a layer's own backward
transients (counted at the epilogue's reduction). Offloaded layouts are modelled from the code, not measured.
"""

from __future__ import annotations

from typing import Sequence

from memplan.training.optim import optimizer_bytes
from memplan.training.setup import Setup
from memplan.training.shard_inventory import ParamEntry
from memplan.training.sharding import FP32, LayoutTerms, ShardedMemory, _ceil, _instances, zero_buckets
from memplan.training.zero_gather import INPUT_GROUP, gathered_bytes, is_input_embedding

__all__ = ["zero_terms", "zero_partition", "ZERO_SUB_GROUP_SIZE"]

FP64 = 8
ZERO_SUB_GROUP_SIZE = 1_000_000_000  # deepspeed/runtime/zero/config.py sub_group_size; Trainer leaves it
ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: nccl_start_alignment_factor, times the data-parallel size


def _module_order(inv: Sequence[ParamEntry], layers: int) -> list[ParamEntry]:
    """Every parameter tensor in `model.parameters()` order: the input embedding, each decoder layer, then
    the final norm and the head (transformers' modeling order; LoRA A/B last in a layer, as memplan's
    inventory lists them: they only move partition boundaries by an adapter's size)."""
    before = [e for e in inv if is_input_embedding(e)]
    per_layer = [e for e in inv if e.per_layer]
    after = [e for e in inv if not e.per_layer and not is_input_embedding(e)]
    out = [e for e in before for _ in range(e.count)]
    out += [e for _ in range(layers) for e in per_layer for _ in range(e.count)]
    return out + [e for e in after for _ in range(e.count)]


def zero_partition(numels: Sequence[int], n: int) -> tuple[int, int]:
    """(P, the most elements any rank's `grads_in_partition` holds) for stages 1/2.

    `stage_1_and_2.py::__init__` pads the flat group to a multiple of 2N and gives each rank P = padded/N;
    `get_partition_info` puts in `params_in_partition` every parameter that overlaps the rank's range, and
    `copy_grads_in_partition` allocates their whole numel, so a rank holds P plus the overhang of the
    parameters cut by its boundaries."""
    total = sum(numels)
    align = ALIGNMENT_FACTOR * n
    part = _ceil(total, align) * align // n
    if part == 0:
        return 0, 0
    diff = [0] * (n + 1)
    offset = 0
    for numel in numels:
        if numel:
            first, last = offset // part, min((offset + numel - 1) // part, n - 1)
            diff[first] += numel
            diff[last + 1] -= numel
            offset += numel
    most = running = 0
    for d in diff[:n]:
        running += d
        most = max(most, running)
    return part, most


def _adam_temps(setup: Setup, elements: int) -> int:
    """Optimizer-step temporaries over an fp32 partition of `elements`: torch AdamW's single-tensor path on
    the CPU (`torch/optim/adamw.py::_single_tensor_adamw`: `exp_avg_sq.sqrt()` and `/ bias_correction2_sqrt`,
    two partition-sized fp32 tensors); none for FusedAdam on CUDA or for SGD (in-place updates)."""
    return 2 * FP32 * elements if setup.optimizer == "adamw" and setup.device == "cpu" else 0


def zero_terms(setup: Setup, inv: Sequence[ParamEntry], n: int, *, layers: int, hidden: int, quant_state: int, buffers: int,
               train_itemsize: int, single_grads: int) -> LayoutTerms:
    """Per-rank terms of ZeRO stage 1, 2 or 3 (see the module docstring for the code behind each)."""
    reduce_bucket, prefetch, _max_live, persistence = zero_buckets(setup, hidden)
    ts = train_itemsize
    order = _module_order(inv, layers)
    trainable = [e.numel for e in order if e.trainable]
    psi_t = sum(trainable)
    largest = max(trainable, default=0)
    layer_largest = max((e.numel for e in inv if e.trainable and e.per_layer), default=largest)
    # A gradient bigger than the bucket is not copied into it: it waits on the parameter for the next hook's
    # reduction (`extra_large_param_to_reduce`, stage3 `__add_grad_to_ipg_bucket`), beside the next one.
    in_flight = (2 if layer_largest > reduce_bucket else 1) * layer_largest * ts
    pending_last = trainable[0] * ts if trainable and trainable[0] > reduce_bucket else 0
    # Buckets that hold several gradients are flattened / concatenated for the collective (stage_1_and_2.py::
    # allreduce_bucket `self.flatten(bucket)`, comm/coalesced_collectives.py::reduce_scatter_coalesced `torch.cat`);
    # a bucket of one tensor is reduced in place. With B above every gradient, buckets fill to B.
    flat = min(reduce_bucket, psi_t) * ts if reduce_bucket > largest else 0
    one_reduction = psi_t <= reduce_bucket  # everything is reduced once, in the backward epilogue
    # Stages 1/2 make the bucket at the first gradient hook (`process_gradients` -> `setup_buckets`). At the
    # last layer's backward peak (its SwiGLU backward, after down_proj's) a gradient exists only if the head
    # or down_proj trains: attention-only adapters (PEFT's q,v default) have none yet.
    early_grads = any(e.trainable and ((not e.per_layer and not is_input_embedding(e)) or INPUT_GROUP.get(e.name.split(".")[0]) == 3)
                      for e in inv)
    bucket_phases = ("backward_layers",) * early_grads + ("backward_first_layer", "backward_end")
    offload_opt = setup.offload in ("optimizer", "params_and_optimizer")
    if setup.parallel == "zero3":
        return _stage3(setup, inv, n, order=order, ts=ts, reduce_bucket=reduce_bucket, prefetch=prefetch, persistence=persistence,
                       layers=layers, quant_state=quant_state, buffers=buffers, in_flight=in_flight, pending_last=pending_last,
                       flat=flat, offload_opt=offload_opt, largest=largest)
    stage = 1 if setup.parallel == "zero1" else 2
    part, in_partition = zero_partition(trainable, n)
    grads_in_partition = in_partition * ts  # copy_grads_in_partition: `torch.empty(total_size, dtype=self.dtype)`
    padded = part * n
    frozen = sum(e.numel * e.itemsize * _instances(e, layers) for e in inv if not e.trainable)
    params = frozen + padded * ts + quant_state + buffers  # bit16_groups_flat: every rank holds all of it
    adapters = sum(e.numel * e.itemsize * _instances(e, layers) for e in inv if e.lora)
    master = part * FP32  # __init__: single_partition_of_fp32_groups, an fp32 clone of the rank's slice
    states = optimizer_bytes(setup.optimizer, [part], FP32, device=setup.device).total  # moments on the fp32 partition
    bucket = reduce_bucket * ts  # setup_buckets: `torch.empty(reduce_bucket_size)` at the first gradient hook
    if offload_opt:
        # ZeRO-Offload (cpu_offload): master, moments and the fp32 gradient partition live on the host
        # (pinned), with a bf16 staging copy of the partition and a host copy buffer of the largest parameter
        # (`__init__`: param_buffer_of_bit16_for_cpu_offload_groups, temp_grad_buffer_for_cpu_offload); the GPU
        # keeps `temp_grad_buffer_for_gpu_offload` (largest parameter) and the step runs on the host.
        host = master + states + part * FP32 + part * ts + largest * ts
        mem = ShardedMemory(setup.parallel, setup.gpus, n, params + largest * ts, adapters, (padded - psi_t) * ts, 0, 0, 0, 0,
                            host, host * setup.gpus_per_node)
        buffers_at = {phase: bucket for phase in bucket_phases}
        # Each reduced gradient's norm is taken on the GPU in fp64 before its copy to the host
        # (`set_norm_for_param_grad_in_gpu`: `accumulated_grad.data.double().norm(2)` over the parameter's
        # piece of the partition), beside the gradient: at the largest parameter, the end of the backward
        # (ledger, tiny mistral full s96 b1 ZeRO-2 offload, ws 2: -13.6% -> within 0.1%).
        buffers_at["backward_end"] = buffers_at.get("backward_end", 0) + FP64 * min(largest, part) + largest * ts
        grads_at = {"forward": 0, "backward_loss": 0, "backward_end": 0, "optimizer_step": 0}
        return LayoutTerms(mem, (lambda g: g) if stage == 1 else (lambda g: min(g, in_flight)), {}, step_temp=0,
                           phase_buffers=buffers_at, phase_gradients=grads_at)
    # step(): the flattened bf16 partition `self.flatten(averaged_gradients)`, its fp32 cast
    # (`single_grad_partition`) while grads_in_partition is alive; then the optimizer over the fp32 partition
    # (the bf16 gradients are freed by then). Before it, the fp64 norm of each partition gradient
    # (`get_grad_norm_direct`: `g.to(get_norm_dtype())`, fp64 where supported).
    piece = min(largest, part)
    step = max(grads_in_partition + FP64 * piece, grads_in_partition + part * ts + part * FP32,
               part * FP32 + _adam_temps(setup, part))
    mem = ShardedMemory(setup.parallel, setup.gpus, n, params, adapters, (padded - psi_t) * ts, grads_in_partition, states, master,
                        0, 0, 0)
    if stage == 1:
        # Stage 1 reduces nothing during the backward: autograd's gradients stay whole on the parameters
        # (as one process holds them) until engine.py::allreduce_gradients -> reduce_gradients copies them
        # bucket by bucket in parameter order; rank 0's partition buffer is made at the first reduction,
        # when only the gradients copied into the first bucket have been freed.
        lead = 0
        if trainable and trainable[0] <= reduce_bucket:
            for numel in trainable:
                if lead + numel > reduce_bucket:
                    break
                lead += numel
        end = single_grads if one_reduction else single_grads - lead * ts + grads_in_partition
        return LayoutTerms(mem, lambda g: g, {}, step_temp=step, phase_buffers={phase: bucket for phase in bucket_phases},
                           phase_gradients={"backward_end": end, "optimizer_step": 0})
    # Stage 2 reduces as the backward goes (`reduce_independent_p_g_buckets_and_remove_grads`): gradients are
    # copied into the bucket and freed; the partition buffer exists from the first reduction that reaches
    # the rank (the last rank's: once more than a bucket of gradients has been produced). A reduction's
    # flattened copy is transient, made in a gradient hook: it is counted at the epilogue's reduction, not
    # beside a layer's own backward transients.
    reduced_after = reduce_bucket * ts

    def in_backward(g: int) -> int:
        return (grads_in_partition if g > reduced_after else 0) + min(g, in_flight)

    buffers_at = {phase: bucket for phase in bucket_phases}
    # The epilogue (independent_gradient_partition_epilogue) reduces the last bucket; a single reduction
    # flattens every gradient before the partition buffer exists (the larger of the two is the peak).
    end_grads = grads_in_partition + pending_last
    if one_reduction and flat > grads_in_partition:
        end_grads = 0
    buffers_at["backward_end"] = bucket + (flat if end_grads == 0 or not one_reduction else 0)
    grads_at = {"forward": 0, "backward_loss": 0, "backward_end": end_grads, "optimizer_step": 0}
    return LayoutTerms(mem, in_backward, {}, step_temp=step, phase_buffers=buffers_at, phase_gradients=grads_at)


def _stage3(setup: Setup, inv: Sequence[ParamEntry], n: int, *, order: list[ParamEntry], ts: int, reduce_bucket: int, prefetch: int,
            persistence: int, layers: int, quant_state: int, buffers: int, in_flight: int, pending_last: int, flat: int,
            offload_opt: bool, largest: int) -> LayoutTerms:
    def part_bytes(e: ParamEntry) -> int:
        return _ceil(e.numel, n) * e.itemsize * _instances(e, layers)

    # partition_parameters.py::_partition_param: `torch.empty(partition_size)` per parameter, ceil(numel/N);
    # trainable ones are then defragmented into `lp_param_buffer` (stage3.py::_create_fp16_partitions_with_defragmentation).
    partitions = sum(part_bytes(e) for e in inv)
    real = sum(e.numel * e.itemsize * _instances(e, layers) for e in inv)
    adapters = sum(part_bytes(e) for e in inv if e.lora)
    part = sum(_ceil(e.numel, n) for e in order if e.trainable)  # P3
    master = part * FP32  # _create_fp32_partitions: fp32 clone of every sub group's partition
    states = optimizer_bytes(setup.optimizer, [part], FP32, device=setup.device).total
    # _setup_for_real_optimizer: the bucket `torch.empty(reduce_bucket_size)` and the gradient partitions
    # `grad_partitions_flat_buffer` (`torch.zeros(P3)`, gradient_accumulation_dtype) are made once, at
    # initialize; `__init__`'s 1-byte `inf_or_nan_tracker` beside them.
    bucket = reduce_bucket * ts + 1
    grad_buffer = part * ts
    gathered = gathered_bytes(setup, inv, n, layers=layers, persistence=persistence, prefetch=prefetch)
    # Reduce-scatter (stage3.py::__avg_scatter_grads -> reduce_scatter_coalesced): the concatenated,
    # interleaved partitions of a multi-gradient bucket; on gloo `reduce_scatter_tensor` copies its input
    # (a bucket's worth, or one gradient larger than the bucket), NCCL does not.
    gloo = setup.device == "cpu"
    # Counted at the epilogue's reduction of the last bucket (the concatenation of several gradients, or the
    # first parameter's, larger than the bucket, in place), not beside a layer's backward transients: a
    # reduction runs in a gradient hook, between the layer's matmuls.
    buffers_at = {"backward_end": flat + ((flat or pending_last) if gloo else 0)}
    # step(): per sub group of ~sub_group_size partition elements, `flatten(averaged_gradients)` (a copy)
    # cast to fp32 (`_prepare_fp32_grad_for_sub_group`), then the optimizer over it; the fp64 norm of each
    # partition gradient first (`get_grad_norm_direct`).
    sub = min(part, ZERO_SUB_GROUP_SIZE + _ceil(largest, n))
    step = max(FP64 * _ceil(largest, n), sub * ts + sub * FP32, sub * FP32 + _adam_temps(setup, sub))
    host = 0
    on_gpu = partitions + quant_state + buffers
    if offload_opt:
        # offload_optimizer: master, moments and fp32 gradients on the host; the reduced gradient
        # partitions go to a pinned host buffer instead of the GPU one; the step runs on the host.
        host = master + states + part * FP32 + grad_buffer
        grad_buffer, step = 0, 0
        if setup.offload == "params_and_optimizer":
            # offload_param: the partitions live on the host; the GPU holds what is gathered.
            host += partitions
            on_gpu, adapters = quant_state + buffers, 0
    mem = ShardedMemory(setup.parallel, setup.gpus, n, on_gpu, adapters, max(partitions - real // n, 0), grad_buffer,
                        0 if offload_opt else states, 0 if offload_opt else master, bucket, host, host * setup.gpus_per_node)
    grads_at = {"forward": grad_buffer, "backward_loss": grad_buffer, "backward_end": grad_buffer + pending_last,
                "optimizer_step": grad_buffer}
    return LayoutTerms(mem, lambda g: grad_buffer + min(g, in_flight), gathered, step_temp=step, phase_buffers=buffers_at,
                       phase_gradients=grads_at)
