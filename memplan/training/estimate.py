"""`estimate(setup)`: the whole memory picture of one training step.

Pure functions over specs. Persistent memory (weights, adapters, optimizer
states) is exact; activations follow `activations.py`; the peak is the maximum
over the phases of a steady-state step (step >= 2: optimizer state exists and
`zero_grad(set_to_none=True)` has freed last step's gradients), not a sum of maxima.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import cached_property

from memplan.training.activations import GATED_FAMILIES, activation_bytes, compute_bytes, residual_bytes
from memplan.training.activations_autocast import AUTOCAST_FAMILIES, layer_weight_copies
from memplan.model.catalog import load_model
from memplan.training.device_terms import DeviceTerms, device_terms
from memplan.errors import SetupError
from memplan.model.lora import LoraPlan, adapter_file_bytes, plan_lora
from memplan.training.recipes import adapter_dtype, fused_head_bytes, fused_lm_head
from memplan.training.optim import OptimizerBytes, gradient_bytes, optimizer_bytes
from memplan.training.modules_to_save import add_saved_copies, saved_copies
from memplan.training.setup import Setup
from memplan.training.shard_inventory import layer_split, parameter_inventory
from memplan.training.parallel import is_fsdp
from memplan.training.sharding import LayoutTerms, ShardedMemory, layout_terms
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, WeightBytes, is_quantized, weight_bytes

__all__ = ["Memory", "Estimate", "estimate", "trainable_numels"]

FP32 = 4


@dataclass(frozen=True)
class Memory:
    """Bytes on the training device. `peak` is the steady-state step's maximum."""

    weights: int  # base model storage incl. quant state and buffers
    adapters: int  # LoRA A/B weights
    gradients: int
    optimizer_states: int  # resident + paged
    optimizer_paged: int  # part of optimizer_states in unified memory (evictable)
    activations: int  # saved for backward by layers, embeddings and head
    logits: int  # logits and fp32 log_softmax saved for backward
    transients: int  # the largest short-lived buffer at the peak (loss backward, dequant, optimizer temps)
    overhead: int  # device terms: CUDA context, workspaces, allocator slack (0 on CPU)
    allocated_peak: int  # what torch.cuda.max_memory_allocated would show (ledger peak on CPU)
    peak: int  # device total at the peak, as NVML would show it
    peak_phase: str


@dataclass(frozen=True)
class Estimate:
    setup: Setup
    model: ModelSpec
    total_parameters: int
    trainable_parameters: int
    active_parameters: int
    weight_storage: WeightBytes
    adapter_dtype: str | None
    adapter_file_bytes: dict[str, int]
    memory: Memory
    peak_parts: dict[str, int]
    device_terms: DeviceTerms
    sharding: ShardedMemory | None = None  # per-GPU terms under a parallel layout (memory is then per GPU)

    @cached_property  # computed where rendered, never in the sweep's hot loop
    def notes(self) -> tuple[str, ...]:
        """The library behaviours that drive this estimate non-obviously (memplan.training.notes)."""
        from memplan.training.notes import estimate_notes

        return estimate_notes(self)

    def _per_gpu(self) -> dict:
        return _per_gpu_dict(self)

    def to_dict(self) -> dict:
        m = self.memory
        return {
            "model": self.model.name,
            "architecture": self.model.architecture,
            "setup": self.setup.to_dict(),
            "parameters": {
                "total": self.total_parameters,
                "trainable": self.trainable_parameters,
                "active_per_token": self.active_parameters,
                "by_component": self.model.parameters().by_component,
            },
            "lora": None
            if self.adapter_dtype is None
            else {"adapter_dtype": self.adapter_dtype, "adapter_file_bytes": self.adapter_file_bytes},
            # Each key means what the `Memory` field of the same name means; the two sums
            # people compare against other tools are named for what they add up.
            "memory_bytes": {
                "weights": m.weights,
                "adapters": m.adapters,
                "weights_and_adapters": m.weights + m.adapters,
                "quant_state": self.weight_storage.quant_state,
                "gradients": m.gradients,
                "optimizer_states": m.optimizer_states,
                "optimizer_paged": m.optimizer_paged,
                "activations": m.activations,
                "logits": m.logits,
                "activations_and_logits": m.activations + m.logits,
                "transients": m.transients,
                "overhead": m.overhead,
                "allocated_peak": m.allocated_peak,
                "peak": m.peak,
                # Every figure above is per GPU; these are the layout's own terms on one GPU.
                "per_gpu": self._per_gpu(),
                "host": {"per_gpu": self.sharding.host_per_gpu if self.sharding else 0,
                         "per_node": self.sharding.host_per_node if self.sharding else 0},
            },
            "peak_phase": m.peak_phase,
            "peak_breakdown_bytes": self.peak_parts,
            "device_terms": asdict(self.device_terms),
            "notes": list(self.notes),
        }


def _per_gpu_dict(e: "Estimate") -> dict:
    s, m = e.sharding, e.memory
    base = {"gpus": e.setup.gpus, "parallel": e.setup.parallel, "peak": m.peak, "allocated_peak": m.allocated_peak}
    if s is None:
        return base | {"shard_group": 1, "parameters": m.weights + m.adapters, "gradients": m.gradients,
                       "optimizer_states": m.optimizer_states, "master_weights": 0, "comm_buffers": 0, "padding": 0}
    return base | {"shard_group": s.shard_group, "parameters": s.parameters, "gradients": s.gradients, "optimizer_states": s.optimizer_states,
                   "master_weights": s.master_weights, "comm_buffers": s.comm_buffers, "padding": s.padding}


def trainable_numels(spec: ModelSpec, plan: LoraPlan | None) -> list[int]:
    """Numel of every trainable tensor: all parameters (full) or the adapters (LoRA)."""
    if plan is not None:
        return plan.tensor_numels()
    out: list[int] = []
    for lin in spec.linears:
        per = ([] if lin.tied else [lin.weight_numel]) + ([lin.out_features] if lin.bias else [])
        out += per * lin.count
    for t in spec.tensors:
        out += [t.numel] * t.count
    return out


def _largest_trainable(spec: ModelSpec, plan: LoraPlan | None) -> tuple[int, int]:
    """(largest trainable layer linear or adapter matrix, largest other trainable tensor)."""
    if plan is not None:
        return max(plan.tensor_numels(), default=0), 0
    linear = max((lin.weight_numel for lin in spec.linears if not (lin.tied or lin.is_output)), default=0)
    head = max((lin.weight_numel for lin in spec.linears if lin.is_output and not lin.tied), default=0)
    other = max([t.numel for t in spec.tensors] + [head])
    return linear, other


def _largest_dequantized(spec: ModelSpec, setup: Setup) -> int:
    """bnb dequantizes a 4-bit/int8 weight into a compute-dtype temporary (forward for
    batch > 1 and backward; `bitsandbytes/autograd/_functions.py::MatMul4Bit`, and the
    fp16 copy in `MatMul8bitLt.backward`): one matrix of the largest quantized linear."""
    if not is_quantized(setup.quant):
        return 0
    sizes = [lin.weight_numel for lin in spec.linears if not (lin.is_output or lin.tied)]
    return max(sizes, default=0) * FLOAT_BYTES[setup.compute_dtype]


@dataclass(frozen=True)
class _Fixed:
    """The parts of an estimate that depend on the model and the method, format, rank, targets,
    optimizer and device, but not on seq_len, batch_size, checkpointing, attention or dropout."""

    plan: LoraPlan | None
    weights: WeightBytes
    numels: tuple[int, ...]
    trainable_parameters: int
    train_itemsize: int
    adapters: int
    gradients: int
    optimizer: OptimizerBytes
    dequant: int
    opt_temp: int
    head_grad: int
    first_layer_grads: int
    layer_grads: int  # full fine-tuning: one decoder layer's gradients (0 under LoRA)
    down_grad: int  # full fine-tuning: one layer's MLP output projection's gradient (0 under LoRA)
    adapter_file_bytes: tuple[tuple[str, int], ...]
    total_parameters: int
    active_parameters: int


def _fixed_parts(spec: ModelSpec, setup: Setup) -> _Fixed:
    plan = plan_lora(spec, setup.lora_rank, setup.lora_targets) if setup.method == "lora" else None
    if plan is not None and plan.param_targets and setup.lora_dropout:
        # peft/tuners/lora/layer.py::ParamWrapper.__init__ refuses lora_dropout != 0.
        raise SetupError(f"PEFT cannot put LoRA dropout on {', '.join(p.name for p in plan.param_targets)} (lora.ParamWrapper, "
                         "a fused parameter, not an nn.Linear); use --lora-dropout 0 or leave those modules out of --lora-targets")
    # prepare_model_for_kbit_training casts every non-quantized fp16/bf16 parameter to fp32.
    load_dtype = "fp32" if setup.prepare_kbit_training else setup.compute_dtype
    wb = weight_bytes(spec, setup.quant, double_quant=setup.double_quant, compute_dtype=load_dtype)
    numels = trainable_numels(spec, plan)
    # PEFT autocast_adapter_dtype=True: adapters are fp32 on fp16/bf16/quantized bases; SFTTrainer
    # casts them to bf16 on a quantized base (memplan.training.recipes.adapter_dtype).
    train_itemsize = FLOAT_BYTES[adapter_dtype(setup)] if plan is not None else FLOAT_BYTES[setup.param_dtype]
    adapters = sum(numels) * train_itemsize if plan is not None else 0
    grads = gradient_bytes(numels, train_itemsize)
    opt = optimizer_bytes(setup.optimizer, numels, train_itemsize, device=setup.device)

    dequant = _largest_dequantized(spec, setup)
    # Optimizer-step temporaries (torch/optim/adamw.py): the foreach path (CUDA default)
    # builds one `_foreach_sqrt(exp_avg_sq)` list, the size of one state. The single-tensor
    # path (CPU) builds `exp_avg_sq.sqrt()` and its quotient per tensor, plus a contiguous
    # copy of a layer linear's (transposed) gradient: measured on the CPU ledger, torch 2.13,
    # as 3x the largest layer linear and 2x the largest embedding, lm_head or norm.
    if setup.optimizer == "adamw":
        if setup.device == "cuda":
            opt_temp = sum(numels) * train_itemsize
        else:
            linear_max, other_max = _largest_trainable(spec, plan)
            opt_temp = max(3 * linear_max, 2 * other_max) * train_itemsize
    else:
        opt_temp = 0
    head_grad = 0
    # A tied output head's gradient lands in the input embedding's table at the loss's backward and
    # stays through the layers' (tiny qwen2, tied, on the CPU ledger); the rest of the embeddings'
    # gradients appear only at the very end.
    tied_table = spec.tied_numel
    if plan is None:
        head_grad = (sum(lin.weight_numel for lin in spec.linears if lin.is_output and not lin.tied) + tied_table) * train_itemsize
    embed_grad = (sum(t.numel * t.count for t in spec.tensors if t.component == "embeddings") - tied_table) * train_itemsize
    if plan is None:
        # Every later layer's gradients exist, and of layer 0's own only the down-proj's
        # (its weight gradient is computed before the SwiGLU backward peaks).
        # One decoder layer's parameters (shard_inventory.layer_split: by module path, so a one-layer model's
        # final norm stays out).
        per_layer_params = sum(p.numel * per for p in (*spec.linears, *spec.tensors)
                               for per, in_layer in [layer_split(p.count, spec.num_layers, p.path, p.component)] if in_layer)
        last_linear = max((lin.weight_numel for lin in spec.linears if lin.component == "mlp"), default=0)
        first_layer_grads = max(grads - embed_grad - (per_layer_params - last_linear) * train_itemsize, 0)
        layer_grads, down_grad = per_layer_params * train_itemsize, last_linear * train_itemsize
    else:
        first_layer_grads, layer_grads, down_grad = grads, 0, 0
    files = tuple((d, adapter_file_bytes(plan, d, base_dtype=setup.param_dtype)) for d in ("fp32", "fp16", "bf16")) if plan is not None else ()
    fixed = _Fixed(plan, wb, tuple(numels), sum(numels), train_itemsize, adapters, grads, opt, dequant, opt_temp, head_grad,
                   first_layer_grads, layer_grads, down_grad, files, spec.total_parameters, spec.active_parameters)
    return add_saved_copies(fixed, spec, setup)  # PEFT modules_to_save copies (memplan.training.modules_to_save)


# Memo of `_fixed_parts`, keyed by the spec's identity (hashing a ModelSpec costs more than
# the lookup saves) and the setup fields the fixed parts read; the entry keeps the spec alive
# so its id cannot be reused while cached.
_FIXED_CACHE: dict[tuple, tuple[ModelSpec, _Fixed]] = {}
_FIXED_CACHE_SIZE = 4096


def _fixed(spec: ModelSpec, setup: Setup) -> _Fixed:
    key = (id(spec), setup.method, setup.quant, setup.double_quant, setup.compute_dtype, setup.lora_rank,
           setup.lora_targets, setup.optimizer, setup.device, setup.prepare_kbit_training, adapter_dtype(setup), setup.modules_to_save)
    hit = _FIXED_CACHE.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    if len(_FIXED_CACHE) >= _FIXED_CACHE_SIZE:
        _FIXED_CACHE.clear()
    fixed = _fixed_parts(spec, setup)
    _FIXED_CACHE[key] = (spec, fixed)
    return fixed


def estimate(setup: Setup, *, model: ModelSpec | None = None, terms: DeviceTerms | None = None) -> Estimate:
    spec = model if model is not None else load_model(setup.model)
    if spec.model_type == "gemma2" and setup.attention == "sdpa":
        # transformers 5.x: Gemma2ForCausalLM._supports_sdpa is False (its attention softcapping).
        raise SetupError("gemma2 has no SDPA attention in transformers 5.x; use --attention eager (its default) or flash")
    if spec.model_type in ("gpt2", "bert") and setup.seq_len > spec.max_position_embeddings:
        # Learned absolute positions: the embedding table has no row past the last position.
        raise SetupError(
            f"--seq-len {setup.seq_len} exceeds {spec.name}'s {spec.max_position_embeddings} learned positions; "
            f"use --seq-len <= {spec.max_position_embeddings}"
        )
    if setup.autocast != "none" and spec.model_type not in AUTOCAST_FAMILIES:
        raise SetupError(
            f"--autocast is modelled for {', '.join(AUTOCAST_FAMILIES)} (checked on the CPU ledger), not {spec.model_type}; "
            f"load {spec.name} in bf16 instead (--quant bf16, no --autocast)"
        )
    f = _fixed(spec, setup)
    plan, wb, adapters, grads, opt = f.plan, f.weights, f.adapters, f.gradients, f.optimizer
    dequant, opt_temp = f.dequant, f.opt_temp
    act = activation_bytes(spec, _activation_setup(setup), plan)
    if fused_lm_head(setup) and spec.is_causal_lm:
        # TRL's fused LM head replaces the logits and the cross-entropy (memplan.training.recipes).
        head_trainable = sum(lin.weight_numel for lin in spec.linears if lin.is_output and not lin.tied) if plan is None else 0
        head_trainable += saved_copies(spec, setup).head_numel  # a trainable lm_head copy
        fh = fused_head_bytes(setup, hidden=spec.hidden_size, vocab=spec.vocab_size, compute=compute_bytes(setup),
                              head_trainable=head_trainable)
        act = replace(act, head=act.head + fh.saved, logits_saved=0, logits_forward_extra=fh.forward_extra,
                      logits_backward_extra=fh.backward_extra)
    terms = terms if terms is not None else device_terms(setup.device)
    persistent = wb.total + adapters + opt.total
    layout = _layout(spec, setup, f) if setup.parallel != "none" else None
    if layout is not None:
        persistent = layout.memory.resident
    # Phases of a steady-state step (the training loop drops the model outputs before
    # backward, as transformers' Trainer.compute_loss does, so the compute-dtype logits
    # are gone once the loss exists).
    acts = act.layers + act.head
    e_tokens_inter = compute_bytes(setup) * setup.batch_size * setup.seq_len * spec.intermediate_size
    # Under autocast with checkpointing, the autocast cache still holds the low-precision copy
    # of every trainable weight until the forward ends (freed with the cache on exit).
    weight_cache = layer_weight_copies(spec, setup) * spec.num_layers if setup.grad_checkpointing else 0
    head_grad = f.head_grad
    # Full fine-tuning: by layer 0's backward every gradient but the embedding's exists,
    # while layer 0's activations (or its rebuilt copy) and the layer transients are alive.
    first_layer_acts = (
        residual_bytes(setup) * setup.batch_size * setup.seq_len * spec.hidden_size + act.recompute_layer
        if setup.grad_checkpointing
        else act.first_layer
    )
    first_layer_grads = f.first_layer_grads
    tied_sum = 2 * spec.tied_numel * f.train_itemsize if plan is None else 0
    # (phase, gradients, activations, logits, transients) alive on top of the persistent bytes.
    # Inside a layer's MLP backward, in autograd's order (activations.py::_down_input_freed):
    # down_proj's backward runs first (its lora_A, or its trainable base matmul), holding its saved
    # input and the gradient of it (`down_backward`); then that input is freed, before the SwiGLU
    # multiply allocates its branch gradients (`layer_backward_extra`).
    tokens = setup.batch_size * setup.seq_len
    layer_transients = max(act.layer_backward_extra - act.down_input_freed, act.down_backward, dequant + e_tokens_inter)
    residual_grad = residual_bytes(setup) * tokens * spec.hidden_size
    # A decoder layer's input RMSNorm (`LlamaRMSNorm.forward`: `.to(torch.float32)`, `pow(2).mean`,
    # `rsqrt`, multiply) keeps its fp32 input and rsqrt until its backward, which runs in fp32. At its peak
    # five fp32 tokens x hidden tensors are alive beside the residual gradient: the upcast gradient times
    # rsqrt and times the input (MulBackward0, two), the mean's spread gradient (div), and PowBackward0's
    # `2 * x` and its product with the gradient (pow, mul) — on the CPU ledger, tiny llama full bf16 at 96
    # tokens, those five ops by name.
    gated = spec.model_type in GATED_FAMILIES
    norm_saved = FP32 * tokens * (spec.hidden_size + 1) if gated else 0
    norm_backward = residual_grad + (5 * FP32 * tokens * spec.hidden_size if gated else 0)
    below_top = act.layers if setup.grad_checkpointing else act.layers - (act.per_layer if spec.num_layers > 1 else act.first_layer)
    # Layer 0's input norm: every gradient but the embedding's exists (full fine-tuning).
    all_but_embedding = first_layer_grads - f.down_grad + f.layer_grads
    phases: tuple[tuple[str, int, int, int, int], ...] = (
        # Inside the forward of the last layer but one: the layers before it have saved their tensors,
        # the running layer holds a tokens x intermediate output beyond them. Never a single process's
        # peak; a sharded layout holds a layer twice there (FSDP2: its own flat all-gather output).
        ("forward_layers", 0, below_top + act.layer_inputs + act.forward_masks, 0, e_tokens_inter),
        # Without checkpointing: the top layer inside its worst adapted MLP projection's LoRA forward.
        *((("forward_mlp", 0, below_top + act.layer_inputs + act.forward_masks + act.mlp_forward_layer, 0, act.mlp_forward_transient),)
          if act.mlp_forward_transient else ()),
        ("forward", 0, acts, act.logits_saved, max(act.logits_forward_extra, dequant) + weight_cache),
        ("backward_loss", 0, acts, act.logits_saved, max(act.logits_backward_extra, dequant)),
        # The final norm's backward (the same five fp32 temporaries as a layer's input norm, below, with no
        # residual stream beside them): the logits and lm_head's input are gone, every layer's saved
        # tensors remain. The peak where the vocabulary is small (ledger: tiny phi3 LoRA qkv_proj s153 b2,
        # 116-token vocabulary: the five by name, -7.6% before).
        *((("backward_final_norm", head_grad, act.layers + act.layer_inputs + norm_saved, 0, norm_backward - residual_grad),)
          if gated else ()),
        # With checkpointing: the rebuilt top layer inside its worst adapted MLP projection's LoRA forward,
        # beside the gradient of the layer's output.
        *((("backward_recompute", head_grad, act.layers + act.layer_inputs + act.mlp_recompute_layer, 0,
            act.mlp_recompute_transient + residual_grad),) if act.mlp_recompute_transient else ()),
        # The final norm and the loss have been through backward: only the layers' saved
        # tensors (and what every layer takes: the rotary tables, eager masks) remain, plus one rebuilt layer.
        # The top layer's SwiGLU backward: its down_proj's weight gradient exists (full fine-tuning).
        ("backward_layers", head_grad + f.down_grad, act.layers + act.layer_inputs + act.recompute_layer, 0, layer_transients),
        # Eager attention only: the top (or rebuilt) layer's softmax backward, after its MLP's
        # (activations._eager_attention_backward), beside the residual and attention-output gradients.
        *((("backward_attention", head_grad + f.layer_grads, act.layers + act.layer_inputs + act.recompute_layer - act.attention_freed,
             0, act.attention_backward + residual_grad + compute_bytes(setup) * tokens * spec.num_heads * spec.head_dim),)
          if act.attention_backward else ()),
        # The top layer's input-norm backward, then its end: all its weight gradients exist (full
        # fine-tuning), the layers below keep their saved tensors (checkpointing: every layer's input).
        ("backward_layer_norm", head_grad + f.layer_grads, below_top + norm_saved + act.layer_inputs, 0, norm_backward),
        ("backward_layer_end", head_grad + f.layer_grads, below_top + act.layer_inputs, 0, residual_grad),
        ("backward_first_layer", first_layer_grads, first_layer_acts + act.layer_inputs, 0, layer_transients),
        ("backward_first_layer_norm", all_but_embedding, residual_grad + norm_saved + act.layer_inputs, 0, norm_backward),
        # A tied table's two gradients meet here: autograd's input buffer has held the head's since the
        # loss's backward, the embedding's arrives, and `InputBuffer::add` sums them out of place before
        # AccumulateGrad takes the sum (ledger: tiny bert and phi3 full bf16, tied, three vocab x hidden
        # tensors alive; -31.5% and -28.2% before).
        ("backward_end", grads, 0, 0, act.graph_residue + tied_sum),
        # The training loop has released the loss (and with it the graph) before the step.
        ("optimizer_step", grads, 0, 0, opt_temp),
    )
    if layout is not None:
        # Per rank: gradients as the layout keeps them, its buffers in flight, its step temporaries.
        # The optimizer steps over the rank's shard: its temporaries shrink with it.
        step_temp = layout.step_temp if layout.step_temp is not None else opt_temp * layout.gradients(grads) // grads if grads else 0
        phases = tuple((name, layout.gradients_in(name, g), a, lg, (step_temp if name == "optimizer_step" else t)
                        + layout.inflight_in(name) + layout.buffers_in(name))
                       for name, g, a, lg, t in phases)
    best, best_alive = phases[0], -1
    for phase in phases:  # the first phase wins a tie
        alive = phase[1] + phase[2] + phase[3] + phase[4]
        if alive > best_alive:
            best, best_alive = phase, alive
    best_phase, best_grads, best_acts, best_logits, best_transients = best
    best_total = persistent + best_alive
    overhead = terms.overhead_bytes(best_total)
    peak = best_total + overhead
    if layout is not None:
        gathered = layout.inflight_in(best_phase)
        phase_buffers = layout.buffers_in(best_phase)
        lm = layout.memory
        resident_parts = {"weights": lm.parameters - lm.adapters, "adapters": lm.adapters, "optimizer_states": lm.optimizer_states,
                          "master_weights": lm.master_weights, "comm_buffers": lm.comm_buffers + phase_buffers, "gathered": gathered}
        best_transients -= gathered + phase_buffers
    else:
        resident_parts = {"weights": wb.total, "adapters": adapters, "optimizer_states": opt.total}
    peak_parts = {
        **resident_parts,
        "gradients": best_grads,
        "activations": best_acts,
        "logits": best_logits,
        "transients": best_transients,
        "overhead": overhead,
    }
    assert sum(peak_parts.values()) == peak  # internal invariant, not input validation
    if layout is not None:  # per GPU
        lm = layout.memory
        wb_total, adapters, grads, opt_total = lm.parameters - lm.adapters, lm.adapters, lm.gradients, lm.optimizer_states + lm.master_weights
    else:
        wb_total, opt_total = wb.total, opt.total
    memory = Memory(
        weights=wb_total,
        adapters=adapters,
        gradients=grads,
        optimizer_states=opt_total,
        optimizer_paged=opt.paged,
        activations=acts,
        logits=act.logits_saved,
        transients=best_transients,
        overhead=overhead,
        # Paged optimizer state lives in CUDA unified memory, outside torch's allocator.
        allocated_peak=best_total - (opt.paged if setup.device == "cuda" else 0) + terms.allocated_extra_bytes(),
        peak=peak,
        peak_phase=best_phase,
    )
    adapter_sizes = dict(f.adapter_file_bytes)
    return Estimate(
        setup=setup,
        model=spec,
        total_parameters=f.total_parameters,
        trainable_parameters=f.trainable_parameters,
        active_parameters=f.active_parameters,
        weight_storage=wb,
        adapter_dtype=adapter_dtype(setup) if plan is not None else None,
        adapter_file_bytes=adapter_sizes,
        memory=memory,
        peak_parts=peak_parts,
        device_terms=terms,
        sharding=layout.memory if layout is not None else None,
    )


def _activation_setup(setup: Setup) -> Setup:
    """The setup whose activations a rank computes. FSDP's mixed precision (MixedPrecision /
    MixedPrecisionPolicy param_dtype = the autocast dtype) all-gathers the fp32 shards as bf16/fp16
    parameters, so the step runs as a model loaded in that dtype: no autocast weight copies are saved
    (torch/distributed/fsdp/_flat_param.py::FlatParamHandle._use_low_precision_shard; measured on the
    CPU ledger: FSDP1 and FSDP2 activations of an fp32+bf16-autocast LoRA run equal a bf16 run's)."""
    if setup.autocast != "none" and is_fsdp(setup.parallel):
        return replace(setup, quant=setup.autocast, autocast="none", parallel="none", gpus=1, gpus_per_node=None, fsdp_version=1)
    return setup


def _layout(spec: ModelSpec, setup: Setup, f: _Fixed) -> LayoutTerms:
    """The per-rank terms of a parallel layout (memplan.training.sharding)."""
    inv = parameter_inventory(spec, quant=setup.quant, double_quant=setup.double_quant, param_dtype=setup.param_dtype,
                              quant_storage=setup.quant_storage, plan=f.plan, adapter_itemsize=f.train_itemsize)
    return layout_terms(setup, inv, layers=spec.num_layers, hidden=spec.hidden_size, quant_state=f.weights.quant_state,
                        buffers=f.weights.buffers, train_itemsize=f.train_itemsize, single_grads=f.gradients, head_grad=f.head_grad,
                        first_layer_grads=f.first_layer_grads, down_grad=f.down_grad)
