"""Per-GPU terms of DeepSpeed ZeRO stages 1-3 (`memplan.training.sharding` dispatches here).

Sources: arXiv:1910.02054 section 5; `deepspeed/runtime/zero/stage_1_and_2.py::DeepSpeedZeroOptimizer`,
`stage3.py::DeepSpeedZeroOptimizer_Stage3`, `partition_parameters.py`, `partitioned_param_coordinator.py`
(deepspeed 0.19.8).
"""

from __future__ import annotations

from typing import Sequence

from memplan.training.setup import Setup
from memplan.training.shard_inventory import ParamEntry
from memplan.training.sharding import FP32, LayoutTerms, ShardedMemory, _ceil, _instances, zero_buckets

__all__ = ["zero_terms"]


def zero_terms(setup: Setup, inv: Sequence[ParamEntry], n: int, *, layers: int, hidden: int, quant_state: int, buffers: int,
          train_itemsize: int, single_grads: int) -> LayoutTerms:
    reduce_bucket, prefetch, _max_live, persistence = zero_buckets(setup, hidden)
    stage = int(setup.parallel[-1])
    psi_t = sum(e.numel * _instances(e, layers) for e in inv if e.trainable)
    part = _ceil(psi_t, n)
    master = part * FP32  # single_partition_of_fp32_groups / fp32_partitioned_groups_flat
    states = {"adamw": 2, "sgd_momentum": 1, "sgd": 0}[setup.optimizer] * part * FP32
    offload_opt = setup.offload in ("optimizer", "params_and_optimizer")
    host = master + states + part * FP32 if offload_opt else 0
    # ZeRO-2/3 reduce gradients through a bucket of reduce_bucket_size elements (two with overlap_comm).
    overlap = stage == 3
    bucket = min(reduce_bucket, max(psi_t, 1)) * train_itemsize * (2 if overlap else 1) if stage >= 2 else 0
    inflight: dict[str, int] = {}
    adapters = sum(e.bytes * (layers if e.per_layer else 1) for e in inv if e.lora)
    if stage < 3:
        params = sum(e.bytes * (layers if e.per_layer else 1) for e in inv) + quant_state + buffers
        grad_end = single_grads if stage == 1 else part * train_itemsize
    else:
        def stored(e: ParamEntry) -> int:
            whole = e.numel <= persistence  # persistent parameters stay gathered after first use
            return (e.numel + _ceil(e.numel, n) if whole else _ceil(e.numel, n)) * e.itemsize

        params = sum(stored(e) * _instances(e, layers) for e in inv) + quant_state + buffers
        adapters = sum(stored(e) * _instances(e, layers) for e in inv if e.lora)
        grad_end = part * train_itemsize
        layer_full = sum(e.numel * e.itemsize * e.count for e in inv if e.per_layer and e.numel > persistence)
        gathered = min(layer_full * 2, prefetch * 2 + layer_full)
        inflight = {k: gathered for k in ("forward", "backward_loss", "backward_layers", "backward_first_layer")}
        if setup.offload == "params_and_optimizer":
            host += sum(_ceil(e.numel, n) * e.itemsize * _instances(e, layers) for e in inv)
            params, adapters = quant_state + buffers, 0
    grads = (lambda g: g) if stage == 1 else (lambda g: g * part // psi_t if psi_t else 0)
    mem = ShardedMemory(setup.parallel, setup.gpus, n, params, adapters, 0, grad_end, 0 if offload_opt else states,
                        0 if offload_opt else master, bucket, host, host * setup.gpus_per_node)
    # The step casts the fp32 gradient partition (stage_1_and_2.py: single_grad_partition) and
    # copies the updated fp32 partition back to the 16-bit one.
    return LayoutTerms(mem, grads, inflight, step_temp=0 if offload_opt else part * FP32)
