"""Per-GPU memory under a parallel layout: what one rank holds, term by term.

`layout_terms(...)` takes the single-process pieces of an estimate (`estimate.py`) and the parameter
inventory (`shard_inventory.py`) and returns what changes on one rank:

- `resident`: bytes held for the whole step (parameter shards or replicas incl. padding, quant state
  and buffers, optimizer state, the fp32 master shard, persistent communication buckets);
- `gradients(phase_bytes)`: the gradient bytes a rank holds when one process would hold `phase_bytes`;
- `inflight[phase]`: unsharded parameters and gradient buffers in flight in that phase;
- `host`: host RAM per rank for offloaded state.

Activations, logits and layer transients are per rank what one process has for the per-GPU batch
(data parallel: every rank runs the whole model on its own micro-batch).

Sources, per layout (torch 2.13, deepspeed 0.19):
- DDP: `torch/nn/parallel/distributed.py::DistributedDataParallel.__init__` builds a `Reducer`
  whose buckets (`torch/csrc/distributed/c10d/reducer.cpp::Reducer::initialize_buckets`,
  `at::empty({offset})`) hold one flat copy of every trainable gradient for the whole run
  (`gradient_as_bucket_view=False`, the default, keeps `p.grad` separate).
- FSDP1: `torch/distributed/fsdp/_flat_param.py::FlatParamHandle._init_flat_param_and_metadata`
  (16-byte alignment padding before each parameter under `use_orig_params=True`, then padding to a
  multiple of the shard count); `_runtime_utils.py::_post_forward_reshard` keeps the root unsharded
  from forward to backward; `_limiter_utils.py` (2 all-gathers in flight) and BACKWARD_PRE prefetch
  hold two layer units in backward; the unsharded gradient of a unit is reduce-scattered into its
  shard (`_runtime_utils.py::_post_backward_hook`).
- FSDP2: `torch/distributed/fsdp/_fully_shard/_fsdp_param.py::FSDPParam._init_sharded_param` pads
  each parameter's first dimension to a multiple of the shard count; `_fsdp_collectives.py`
  (`foreach_all_gather`, `foreach_reduce`) allocate the flat all-gather output and reduce-scatter input.
- ZeRO (arXiv:1910.02054 section 5): `deepspeed/runtime/zero/stage_1_and_2.py` (fp32 partition
  `single_partition_of_fp32_groups`, `ipg_buffer` of `reduce_bucket_size` elements, the fp32
  `single_grad_partition` at the step) and `stage3.py` / `partition_parameters.py` (`ds_tensor`
  partitions padded per parameter, `stage3_param_persistence_threshold`, the flat gradient
  partition buffer, `__ipg_bucket_flat_buffer`).

Ignores: NCCL's own buffers and communicator memory (not torch tensors; on a GPU the device terms'
context covers a process), the `gpus` ranks' imbalance (every rank holds the padded shard), and
gradient accumulation (it does not change the peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Container, Sequence

from memplan.model.storage import FLOAT_BYTES
from memplan.training.optim import optimizer_bytes
from memplan.training.parallel import is_fsdp, is_zero
from memplan.training.setup import Setup
from memplan.training.shard_inventory import ParamEntry

__all__ = ["LayoutTerms", "ShardedMemory", "layout_terms", "zero_buckets", "shard_group"]

FSDP_ALIGNMENT_BYTES = 16  # torch/distributed/fsdp/_flat_param.py::_get_aligned_numel
FP32 = 4
# deepspeed/runtime/zero/config.py defaults (elements).
ZERO_REDUCE_BUCKET = 500_000_000
ZERO_PREFETCH_BUCKET = 50_000_000
ZERO_MAX_LIVE = 1_000_000_000
ZERO_PERSISTENCE = 100_000


@dataclass(frozen=True)
class ShardedMemory:
    """What one rank holds under the layout, for the JSON and the table (bytes)."""

    layout: str
    gpus: int
    shard_group: int  # ranks that split one parameter (gpus, or gpus_per_node for hybrid layouts)
    parameters: int  # parameter storage on the GPU: shards or replicas, padding, quant state, buffers
    adapters: int  # part of `parameters` that is LoRA adapters
    padding: int  # part of `parameters` that is alignment / divisibility padding
    gradients: int  # gradient bytes at the end of backward
    optimizer_states: int  # optimizer state on the GPU
    master_weights: int  # fp32 master shard (ZeRO, FSDP mixed precision keeps it as the parameter)
    comm_buffers: int  # persistent communication buffers (DDP buckets, ZeRO reduce buckets)
    host_per_gpu: int  # host RAM the rank's offloaded state takes
    host_per_node: int

    @property
    def resident(self) -> int:
        """Bytes the rank holds for the whole step."""
        return self.parameters + self.optimizer_states + self.master_weights + self.comm_buffers


@dataclass(frozen=True)
class LayoutTerms:
    memory: ShardedMemory
    gradients: Callable[[int], int]
    inflight: dict[str, int] = field(default_factory=dict)
    step_temp: int | None = None  # replaces the optimizer step's temporaries when set
    # Optional: communication buffers alive only in some phases (ZeRO-1/2's per-backward reduce
    # bucket, reduce-scatter inputs), reported as comm_buffers at the peak rather than as gathered weights.
    phase_buffers: dict[str, int] = field(default_factory=dict)
    # Gradient bytes per phase where the layout knows them outright (FSDP: the root's gradients stay
    # unsharded until its post-backward, finished layers hold shards); other phases use `gradients`.
    phase_gradients: dict[str, int] = field(default_factory=dict)

    def gradients_in(self, phase: str, single: int) -> int:
        """The rank's gradient bytes in `phase`, whose single-process gradient bytes are `single`."""
        known = same_as(phase, self.phase_gradients)
        return self.phase_gradients[known] if known in self.phase_gradients else self.gradients(single)

    def inflight_in(self, phase: str) -> int:
        """Gathered parameters (and FSDP's flat buffers) alive in `phase`."""
        return self.inflight.get(same_as(phase, self.inflight), 0)

    def buffers_in(self, phase: str) -> int:
        """Communication buffers alive only in some phases, alive in `phase`."""
        return self.phase_buffers.get(same_as(phase, self.phase_buffers), 0)


def shard_group(setup: Setup) -> int:
    return setup.gpus_per_node if setup.parallel == "fsdp_hybrid" else setup.gpus


def zero_buckets(setup: Setup, hidden: int) -> tuple[int, int, int, int]:
    """(reduce bucket, stage-3 prefetch bucket, max live parameters, persistence threshold) in elements:
    Trainer's "auto" values for a recipe that runs through transformers
    (`transformers/integrations/deepspeed.py::HfTrainerDeepSpeedConfig.trainer_config_finalize`:
    hidden², 0.9·hidden², 10·hidden), DeepSpeed's defaults for a plain loop."""
    if setup.recipe == "plain":
        return ZERO_REDUCE_BUCKET, ZERO_PREFETCH_BUCKET, ZERO_MAX_LIVE, ZERO_PERSISTENCE
    return hidden * hidden, int(0.9 * hidden * hidden), ZERO_MAX_LIVE, 10 * hidden


# Moments estimate.py tells apart that a layout may not: where a layout's table has no figure for one, it
# holds what the phase named here holds, followed until the table has one (the rebuilt layer's MLP
# forward holds the buffers and gradients of its backward; the final norm's backward those of the
# loss's; the attention's softmax backward those of the input-norm backward after it, and that, under
# ZeRO, whose gathered parameters and buckets do not change inside one layer's backward, those of the
# layer's SwiGLU backward).
SAME_AS = {"forward_mlp": "forward_layers", "forward_layers": "forward", "backward_final_norm": "backward_loss",
           "backward_recompute": "backward_layers", "backward_attention": "backward_layer_norm",
           "backward_layer_norm": "backward_layers", "backward_layer_end": "backward_layers",
           "backward_first_layer_norm": "backward_first_layer"}


def same_as(phase: str, known: Container[str]) -> str:
    """The phase whose entry in `known` stands for `phase` (`SAME_AS`, followed until `known` has one);
    `phase` itself when none has."""
    at = phase
    while at not in known and at in SAME_AS:
        at = SAME_AS[at]
    return at if at in known else phase


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _dim0_padded(e: ParamEntry, n: int) -> int:
    """Elements of one of `e`'s tensors once FSDP2 pads its first dimension to a multiple of n
    (`_fsdp_param.py::FSDPParam._init_sharded_param`), times its count."""
    return _ceil(e.dim0, n) * n * (e.numel // e.dim0 if e.dim0 else 1) * e.count


def _fsdp1_unit(entries: Sequence[tuple[ParamEntry, int]], n: int, itemsize: int) -> int:
    """Padded numel of one FlatParameter holding `entries` ((entry, copies) in module order)."""
    align = FSDP_ALIGNMENT_BYTES // itemsize
    total = 0
    for e, copies in entries:
        for _ in range(copies):
            if total % align:
                total += align - total % align
            total += e.numel
    return total + (-total % n)


def _instances(e: ParamEntry, layers: int) -> int:
    return e.count * (layers if e.per_layer else 1)


def layout_terms(setup: Setup, inv: Sequence[ParamEntry], *, layers: int, hidden: int, quant_state: int, buffers: int,
                 train_itemsize: int, single_grads: int, head_grad: int = 0, first_layer_grads: int = 0, down_grad: int = 0) -> LayoutTerms:
    """Per-rank terms of `setup`'s layout (see the module docstring for the library code behind each)."""
    n = shard_group(setup)
    p = setup.parallel
    if is_zero(p):
        from memplan.training.sharding_zero import zero_terms

        return zero_terms(setup, inv, n, layers=layers, hidden=hidden, quant_state=quant_state, buffers=buffers,
                          train_itemsize=train_itemsize, single_grads=single_grads)
    if is_fsdp(p):
        return _fsdp(setup, inv, n, layers=layers, quant_state=quant_state, buffers=buffers, train_itemsize=train_itemsize,
                     single_grads=single_grads, head_grad=head_grad, first_layer_grads=first_layer_grads, down_grad=down_grad)
    # DDP (and "none"): every rank holds the whole model, its gradients and optimizer state.
    whole = sum(e.bytes * (layers if e.per_layer else 1) for e in inv) + quant_state + buffers
    adapters = sum(e.bytes * (layers if e.per_layer else 1) for e in inv if e.lora)
    numels = [e.numel for e in inv if e.trainable for _ in range(_instances(e, layers))]
    opt = optimizer_bytes(setup.optimizer, numels, train_itemsize, device=setup.device).total
    comm = single_grads if p == "ddp" else 0
    mem = ShardedMemory(p, setup.gpus, n, whole, adapters, 0, single_grads, opt, 0, comm, 0, 0)
    return LayoutTerms(mem, lambda g: g)


def _fsdp(setup: Setup, inv: Sequence[ParamEntry], n: int, *, layers: int, quant_state: int, buffers: int, train_itemsize: int,
          single_grads: int, head_grad: int, first_layer_grads: int, down_grad: int) -> LayoutTerms:
    """FSDP1 (FlatParameter per unit) and FSDP2 (per-parameter shards) on one rank."""
    compute = FLOAT_BYTES[setup.autocast] if setup.autocast != "none" else FLOAT_BYTES[setup.compute_dtype]
    v2 = setup.fsdp_version == 2
    layer_base = [e for e in inv if e.per_layer and not (e.lora and not v2)]
    root_base = [e for e in inv if not e.per_layer and not (e.lora and not v2)]
    lora_units = [e for e in inv if e.lora and not v2]  # FSDP1 + PEFT's policy: one unit per LoRA Linear

    def padded(entries: list[ParamEntry]) -> tuple[int, int]:
        """(padded unsharded numel, itemsize) of one FSDP1 unit holding `entries` (one layer's, or the root's)."""
        if not entries:
            return 0, compute
        size = max(e.itemsize for e in entries)
        return _fsdp1_unit([(e, e.count) for e in entries], n, size), size

    layer_numel, layer_size = padded(layer_base)
    root_numel, root_size = padded(root_base)
    lora_numels = [(_ceil(e.numel, n) * n, e.itemsize, _instances(e, layers), e.per_layer) for e in lora_units]
    shards = (layer_numel * layer_size * layers + root_numel * root_size) // n + sum(m * size * k for m, size, k, _ in lora_numels) // n
    real = sum(e.bytes * (layers if e.per_layer else 1) for e in inv)
    adapters = sum(e.bytes * (layers if e.per_layer else 1) for e in inv if e.lora) // n
    trainable = [e for e in inv if e.trainable]
    # The optimizer sees each original parameter's part of the rank's shard (FSDP1 use_orig_params=True
    # views, FSDP2 DTensor local shards): states sized to those parts.
    part = (lambda e: _ceil(e.dim0, n) * (e.numel // e.dim0 if e.dim0 else 1)) if v2 else (lambda e: _ceil(e.numel, n))
    shard_numels = [part(e) for e in trainable for _ in range(_instances(e, layers))]
    opt = optimizer_bytes(setup.optimizer, shard_numels, train_itemsize, device=setup.device).total
    grad_shards = sum(shard_numels) * train_itemsize
    # One layer unit unsharded in the compute dtype (MixedPrecision casts the shard before the all-gather).
    lora_per_layer = sum(m * size * k for m, size, k, per in lora_numels if per) // max(layers, 1)
    layer_gathered = layer_numel * (compute if setup.autocast != "none" else layer_size) + lora_per_layer
    root_gathered = root_numel * (compute if setup.autocast != "none" else root_size)
    if v2:
        # Per-parameter shards and all-gathers, each parameter in its own dtype (a LoRA adapter in fp32
        # beside a bf16 base), gathered in the mixed-precision param_dtype when there is one.
        def v2_bytes(entries: list[ParamEntry], size: int | None) -> int:
            return sum(_dim0_padded(e, n) * (size or e.itemsize) for e in entries)

        gather_size = compute if setup.autocast != "none" else None
        layer_gathered, root_gathered = v2_bytes(layer_base, gather_size), v2_bytes(root_base, gather_size)
        shards = (v2_bytes(layer_base, None) * layers + v2_bytes(root_base, None)) // n
    layer_trainable = any(e.trainable for e in layer_base)
    layer_grad = sum(e.numel * e.count * train_itemsize for e in inv if e.per_layer and e.trainable)  # one layer's, unsharded
    layer_grad_shard = sum(part(e) * e.count for e in trainable if e.per_layer) * train_itemsize
    # Phases of a steady backward on one rank (torch/distributed/fsdp/_runtime_utils.py):
    # - the root unit (embeddings, final norm, lm_head) is unsharded from forward until its
    #   post-backward at the very end (`_post_forward_reshard` skips the root), and so are its
    #   gradients: lm_head's and the norm's stay whole (`head_grad`) until then;
    # - a layer unit is gathered by its pre-backward hook; BACKWARD_PRE prefetches the handle before
    #   it in post-forward order (`_exec_order_utils.py::get_handle_to_backward_prefetch`). For a
    #   trainable layer that is the layer below, so two layers are gathered; under PEFT's policy the
    #   handle before a layer is its own LoRA unit, so a frozen base holds one layer at a time
    #   (measured on the CPU ledger: full fine-tuning peaks with two layers gathered, LoRA with one);
    # - a finished layer keeps only its gradient shard (`_post_backward_hook` reduce-scatters).
    # - at a trainable layer's post-backward (`_runtime_utils.py::_post_backward_hook` ->
    #   `_reduce_grad`), its parameters' unsharded gradients and the padded flat gradient built from
    #   them are alive at once, with the layer and the prefetched one still gathered (measured on the
    #   CPU ledger: it is the peak of small-batch full fine-tuning).
    hold = layers if setup.parallel == "fsdp_shard_grad_op" else 1
    prefetch = min(2 if layer_trainable else 1, max(layers, 1))  # no layer below the last one to prefetch
    gathered_layers = root_gathered + layer_gathered * max(hold, prefetch)
    flat_grad = layer_numel * train_itemsize if layer_trainable else 0
    inflight = {
        "forward_layers": root_gathered + layer_gathered * hold,
        "forward": root_gathered + layer_gathered * hold,
        "backward_loss": root_gathered + layer_gathered * hold,
        "backward_layers": gathered_layers,
        "backward_layer_norm": gathered_layers,
        "backward_layer_end": gathered_layers + flat_grad,
        # The last layers' backward: the layer above layer 0 with layer 0 prefetched when trainable.
        "backward_first_layer": root_gathered + layer_gathered * max(min(hold, 2, layers), prefetch),
        # The root's post-backward: still gathered, its parameters' own gradients and the padded flat
        # gradient FSDP builds from them for the reduce-scatter (`_runtime_utils.py::_post_backward_hook`).
        "backward_end": root_gathered + 2 * root_numel * train_itemsize * any(e.trainable for e in root_base),
    }
    done = max(layers - prefetch, 0)  # layers whose gradients are already shards at that moment
    partial = max(first_layer_grads - head_grad - (layers - 1) * layer_grad, 0)  # layer 0's own, as one process
    phase_grads = {
        "forward_layers": 0,
        "forward": 0,
        "backward_loss": 0,
        # The top layer's own unsharded gradients: down_proj's at its SwiGLU backward, all of them
        # from its input norm's backward until its post-backward reduce-scatters them.
        "backward_layers": head_grad + down_grad,
        "backward_layer_norm": head_grad + layer_grad,
        "backward_layer_end": head_grad + layer_grad,
        "backward_first_layer": head_grad + done * layer_grad_shard + partial,
        "backward_first_layer_norm": head_grad + (layers - 1) * layer_grad_shard + layer_grad,
        # The root's post-backward: its gradients are the unsharded copies counted in flight above; the
        # layers' are shards (phi3 full s64 b1, ws 2: +10.8% -> +0.06% on the CPU ledger).
        "backward_end": grad_shards - sum(part(e) * _instances(e, layers) for e in trainable if not e.per_layer) * train_itemsize,
    }
    inflight["backward_first_layer_norm"] = root_gathered + layer_gathered
    if v2:
        inflight, phase_grads = _fsdp2_phases(setup, inv, n, layers=layers, layer_gathered=layer_gathered, layer_grad=layer_grad,
                                              layer_grad_shard=layer_grad_shard, head_grad=head_grad, partial=partial, compute=compute,
                                              down_grad=down_grad, grad_shards=grad_shards, train_itemsize=train_itemsize)
    padding = max(shards - real // n, 0)
    if setup.offload == "params_and_optimizer":
        # CPUOffload(offload_params=True): shards, their gradients and the optimizer step live on the host.
        host = shards + grad_shards + opt
        mem = ShardedMemory(setup.parallel, setup.gpus, n, quant_state + buffers, 0, 0, 0, 0, 0, 0, host, host * setup.gpus_per_node)
        return LayoutTerms(mem, lambda g: 0, inflight, step_temp=0, phase_gradients=dict.fromkeys(phase_grads, 0))
    mem = ShardedMemory(setup.parallel, setup.gpus, n, shards + quant_state + buffers, adapters, padding, grad_shards, opt, 0, 0, 0, 0)
    return LayoutTerms(mem, lambda g: g * grad_shards // single_grads if single_grads else 0, inflight, phase_gradients=phase_grads)


def _fsdp2_phases(setup: Setup, inv: Sequence[ParamEntry], n: int, *, layers: int, layer_gathered: int, layer_grad: int,
                  layer_grad_shard: int, head_grad: int, partial: int, compute: int, down_grad: int, grad_shards: int,
                  train_itemsize: int) -> tuple[dict[str, int], dict[str, int]]:
    """FSDP2 (`fully_shard`) as accelerate's `fsdp2_prepare_model` wraps a model: each decoder layer, the
    input embedding alone, a tail group [final norm, lm_head] with reshard_after_forward=False (only
    [lm_head] under PEFT), then the root.

    - The tail stays unsharded from its forward to its backward; a layer is gathered for its forward and
      again for its backward. In forward a group's flat all-gather output (`_fsdp_collectives.py::
      foreach_all_gather`) outlives its copy-out until the next group's; in backward the group before the
      running one in forward order is prefetched (`_backward_prefetch`), its flat output alive beside the
      running layer's unsharded parameters until it copies it out.
    - A finished group's gradients go through a flat reduce-scatter input of the group's unsharded
      gradient size (`foreach_reduce`), alive while the next group computes; `post_backward` reshards the
      group, drops the previous input (`reduce_scatter_max_input_buffers`), then allocates its own.
    - Layer 0's backward prefetches the input embedding's group, not another layer (under LoRA too: the
      frozen table is gathered and, its backward never running, stays so until the backward ends).
    - The embedding's group ends the backward: its all-gather output, its unsharded gradient and the
      reduce-scatter input made from it (a trainable table: mistral and phi3 full s64-96 b1, -9% and -15%
      before this moment was modelled).
    Measured on the CPU ledger (torch 2.13, ws 2, tiny llama at 96, 256 and 400 tokens): the top layer's
    backward (the layer, the next one's all-gather output, the tail's reduce-scatter input and the layer's
    own unsharded gradients) or layer 0's (the layer once, the embedding's all-gather output, layer 1's
    reduce-scatter input, every other layer's gradient shard).
    """
    # The tail's weights gathered from its forward to its backward; its gradient is the single-process
    # `head_grad` (lm_head's, 0 under LoRA), reduce-scattered before the layers' backward.
    tail_gathered = sum(_dim0_padded(e, n) * compute for e in inv if e.output and not e.lora)
    embed_gathered = sum(_dim0_padded(e, n) * compute for e in inv if not (e.per_layer or e.output or e.lora) and e.dim0 != e.numel)  # tables
    tail_grad = head_grad
    # A tied table is in the tail group ([norm, embedding, lm_head]): gathered from its forward until the
    # group's post_backward, after the embedding's backward; its unsharded gradient (full fine-tuning)
    # exists from the loss's backward on (measured: tiny qwen2, tied, at the loss and in the layers).
    tied = any(e.tied for e in inv)
    held = tail_gathered if tied else 0
    held_grad = sum(e.numel * e.count * e.itemsize for e in inv if e.tied and e.trainable)
    if tied:
        tail_grad = 0  # not reduce-scattered before the layers
    below = layer_gathered if layers > 1 else embed_gathered  # what the top layer's backward prefetches
    # Layer 0's own moment: itself once, the embedding's all-gather output (prefetched, under LoRA too),
    # layer 1's reduce-scatter input; every later layer's gradient is a shard by then.
    prev_rs = layer_grad if layers > 1 else tail_grad  # the reduce-scatter input of the group before layer 0's
    first = (layer_gathered + embed_gathered + prev_rs, (layers - 1) * layer_grad_shard)
    if layers > 2:
        # A middle layer (layer 1) with layer 0 prefetched and layer 2's reduce-scatter input.
        middle = (layer_gathered * 2 + layer_grad, (layers - 2) * layer_grad_shard)
        first = max(first, middle, key=sum)
    if setup.parallel == "fsdp_shard_grad_op":
        # reshard_after_forward=False on every group: the whole model stays unsharded from its forward
        # until each group's backward has run (`post_backward` reshards it); layer 0's backward holds
        # itself and the embedding, as under full sharding.
        whole = sum(_dim0_padded(e, n) * (layers if e.per_layer else 1) * (compute if not e.lora else e.itemsize) for e in inv)
        # The tail's post_backward has resharded it (reshard_after_backward=True) before the layers run,
        # unless it holds a tied table, whose group finishes after the embedding's backward.
        top = whole - (0 if tied else tail_gathered) + tail_grad
        # In forward, as under full sharding, the last group gathered keeps its flat all-gather output
        # (inside the top layer: that layer's, the tail not gathered yet unless tied; at the loss: the
        # tail's, or the last layer's when a tied tail ran first). Random llama full s37 b1, ws 2, peaking at
        # the loss: -6.5% without it.
        inflight = {"forward_layers": whole - (0 if tied else tail_gathered) + layer_gathered,
                    "forward": whole + (layer_gathered if tied else tail_gathered), "backward_loss": whole, "backward_layers": top,
                    "backward_layer_norm": top, "backward_layer_end": top - tail_grad - layer_gathered + layer_grad,
                    "backward_first_layer": layer_gathered + embed_gathered + prev_rs,
                    "backward_first_layer_norm": layer_gathered + embed_gathered + prev_rs}
        first = (0, (layers - 1) * layer_grad_shard)
    else:
        inflight = {
            # Inside a layer's forward: its unsharded parameters and its own flat all-gather output, which
            # `FSDPParamGroup.wait_for_unshard` keeps in `comm_ctx.all_gather_state` until the next group's
            # copy-out (forward only; in backward it is freed at once). On the CPU ledger the peak of
            # small-token LoRA runs (random llama LoRA s18 b1, one layer: -16% without it). At the loss the
            # tail is gathered.
            "forward_layers": 2 * layer_gathered,
            # The last group gathered in forward keeps its flat all-gather output until the root's
            # post-forward (`FSDPState._post_forward`), after the loss: the tail's own (mistral full s96 b1,
            # ws 4: -8.3% without it), or, when a tied tail ran first with the embedding, the last layer's.
            "forward": tail_gathered + (layer_gathered if tied else tail_gathered),
            "backward_loss": tail_gathered,
            "backward_layers": layer_gathered + below + tail_grad,
            "backward_layer_norm": layer_gathered + below + tail_grad,
            "backward_layer_end": below + layer_grad,
            "backward_first_layer": first[0],
            # Layer 0's input norm (full fine-tuning): all its gradients, unsharded, beside the above.
            "backward_first_layer_norm": layer_gathered + embed_gathered + prev_rs,
        }
        for phase in ("backward_layers", "backward_layer_norm", "backward_layer_end", "backward_first_layer", "backward_first_layer_norm"):
            inflight[phase] += held
    phase_grads = {
        "forward_layers": 0,
        "forward": 0,
        "backward_loss": 0,
        "backward_layers": tail_grad // n + down_grad,
        "backward_layer_norm": tail_grad // n + layer_grad,
        "backward_layer_end": tail_grad // n + layer_grad,
        "backward_first_layer": tail_grad // n + first[1] + partial,
        "backward_first_layer_norm": tail_grad // n + (layers - 1) * layer_grad_shard + layer_grad,
    }
    for phase in ("backward_layers", "backward_layer_norm", "backward_layer_end", "backward_first_layer", "backward_first_layer_norm"):
        phase_grads[phase] += held_grad
    # The group holding the input table (the embedding's, or the tail holding a tied one) at its
    # post_backward: the table gathered, its group's gradients unsharded and their reduce-scatter input.
    last_group = [e for e in inv if not (e.per_layer or e.lora) and (e.tied if tied else not e.output)]
    last_grad = sum(_dim0_padded(e, n) for e in last_group if e.trainable) * train_itemsize
    if last_grad:
        inflight["backward_end"] = (held if tied else embed_gathered) + 2 * last_grad
        phase_grads["backward_end"] = grad_shards  # the reduce-scatter output is the group's new shard gradient
    return inflight, phase_grads
