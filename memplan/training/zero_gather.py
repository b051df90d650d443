"""ZeRO-3's gathered parameters on one rank, per phase of a steady step (step >= 2).

`partitioned_param_coordinator.py::PartitionedParameterCoordinator` all-gathers a module's parameters
when it runs (`fetch_sub_module`) and, once the first step has recorded the module trace
(`reset_step` -> `ZeRoTraceMode.COMPLETE`), releases them after the module only when
`__params_to_release` finds no later use of them within `stage3_max_reuse_distance` elements of the
trace (it walks the following modules, adding every parameter's `ds_numel`, and stops at the limit).
The trace is the forward, then the backward, in which a module appears when its output requires grad
(and, under gradient checkpointing, again when its layer is recomputed). So:

- a parameter used again in the backward stays gathered from its forward use to its backward use while
  the trace between the two holds fewer than max_reuse_distance elements: for a layer with j layers after
  it, the forward's rest plus the backward up to its reuse is about c·j·(layer elements) + 2·(head
  elements), c = 2 (c = 3 with checkpointing: the later layers are recomputed too). Every layer within
  reach of the forward's end is kept: a whole small model (c·Ψ < 1e9 elements), about 1e9/c elements of
  a large one;
- a parameter not used in the backward (layer 0's q/k/v under LoRA when the layer input needs no grad,
  the frozen input embedding without checkpointing) is released after its forward use;
- after its backward use a parameter is released;
- persistent parameters (`ds_persist`: numel <= stage3_param_persistence_threshold) are gathered whole from
  their first use until `stage3.py::step` -> `_partition_all_parameters`.

Each gathered parameter is a `ceil(numel/N)·N` buffer of its storage dtype (`partition_parameters.py::
_all_gather_sequential` / `_allgather_params_coalesced`). When the model is larger than what the trace
keeps, the backward prefetches up to stage3_prefetch_bucket_size elements of the released layers ahead
(`fetch_sub_module`); a coalesced gather holds the flat buffer and the per-parameter copies at once
(`AllGatherCoalescedHandle.wait`), so that prefetch counts twice.

Ignores: module-level granularity inside a layer (a layer is kept or not as a whole), the transient
double of a coalesced fetch in the forward, stage3_max_live_parameters (1e9 elements: never the limit
below the reuse distance).
"""

from __future__ import annotations

from typing import Sequence

from memplan.training.setup import Setup
from memplan.training.shard_inventory import ParamEntry
from memplan.training.sharding import _ceil, _instances

__all__ = ["gathered_bytes", "is_input_embedding", "ZERO_MAX_REUSE_DISTANCE", "INPUT_GROUP"]

ZERO_MAX_REUSE_DISTANCE = 1_000_000_000  # deepspeed/runtime/zero/config.py stage3_max_reuse_distance; Trainer leaves it
# Position of a decoder layer's linears by the input they read (llama-family modeling code): the attention
# norm's output, the attention output, the MLP norm's output, the gated product.
INPUT_GROUP = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "qkv_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2,
               "gate_up_proj": 2, "gate": 2, "down_proj": 3}


def _module(e: ParamEntry) -> str:
    return e.name.split(".")[0]


def is_input_embedding(e: ParamEntry) -> bool:
    """The tables the model reads its inputs from, first in `model.parameters()` (llama-family
    `embed_tokens`, BERT's `*_embeddings`, GPT-2's `wte` / `wpe`)."""
    return not e.per_layer and ("embed" in e.name or e.name in ("wte", "wpe"))


def gathered_bytes(setup: Setup, inv: Sequence[ParamEntry], n: int, *, layers: int, persistence: int, prefetch: int) -> dict[str, int]:
    """Bytes of gathered (unpartitioned) parameters on a rank in each estimator phase."""
    gc = bool(setup.grad_checkpointing)
    full = setup.method == "full"

    def gathered(e: ParamEntry, instances: int) -> int:
        return _ceil(e.numel, n) * n * e.itemsize * instances

    persistent = sum(gathered(e, _instances(e, layers)) for e in inv if e.numel <= persistence)
    big = [e for e in inv if e.numel > persistence]
    before = [e for e in big if is_input_embedding(e)]
    after = [e for e in big if not e.per_layer and not is_input_embedding(e)]
    per_layer = [e for e in big if e.per_layer]
    # The input embedding is in the backward trace when its output requires grad: full fine-tuning, a
    # trainable copy, or checkpointing (transformers 5 `activation_checkpointing_enable` calls
    # `enable_input_require_grads` on models whose main input is input_ids).
    embed_trainable = any(e.trainable and is_input_embedding(e) for e in inv)
    embed_used = full or gc or embed_trainable
    # Layer 0 without an input gradient (LoRA, no checkpointing): a frozen linear joins the backward only
    # when an adapted module before it made its input require grad.
    adapted = [INPUT_GROUP[_module(e)] for e in inv if e.lora and e.per_layer and _module(e) in INPUT_GROUP]
    first_adapted = min(adapted, default=len(INPUT_GROUP))

    def used_in_layer0(e: ParamEntry) -> bool:
        if full or gc or embed_trainable or e.trainable:
            return True
        group = INPUT_GROUP.get(_module(e))
        return group is None or group > first_adapted

    layer = sum(gathered(e, e.count) for e in per_layer)
    layer0 = sum(gathered(e, e.count) for e in per_layer if used_in_layer0(e))
    embed_all = sum(gathered(e, e.count) for e in before)
    embed = embed_all if embed_used else 0
    # A tied output embedding (no head weight of its own in the inventory) is the input embedding's
    # parameter fetched again by the head module: used last in the forward and first in the backward.
    tied = not any(not e.per_layer and e.name.endswith(".weight") for e in inv)
    head = sum(gathered(e, e.count) for e in after) + (embed_all if tied else 0)
    # Trace elements (every parameter's ds_numel, persistent ones included) of a layer and of the modules
    # after the layers; the head is used last in the forward and first in the backward.
    trace_layer = sum(e.numel * e.count for e in inv if e.per_layer)
    trace_after = sum(e.numel * e.count for e in inv if not e.per_layer and (not is_input_embedding(e) or tied))
    c = 3 if gc else 2
    budget = ZERO_MAX_REUSE_DISTANCE - 2 * trace_after
    if budget <= 0:
        kept = 0
    else:
        kept = layers if trace_layer == 0 else min(layers, _ceil(budget, c * trace_layer))
    embed_kept = embed_used and c * layers * trace_layer + 2 * trace_after < ZERO_MAX_REUSE_DISTANCE
    all_kept = kept == layers and (embed_kept or not embed_used)
    layers_kept = min(kept, max(layers - 1, 0)) * layer + (layer0 if kept == layers else 0)
    turnaround = head + layers_kept + (embed if embed_kept and not tied else 0)
    itemsize = max((e.itemsize for e in per_layer), default=0)
    ahead = 0 if all_kept else 2 * prefetch * itemsize
    return {
        "forward": persistent + turnaround,
        "backward_loss": persistent + turnaround,
        "backward_layers": persistent + layers_kept + (embed if embed_kept else 0) + ahead,
        "backward_first_layer": persistent + layer0 + embed,
        "backward_end": persistent,
        "optimizer_step": 0,
    }
