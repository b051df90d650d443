"""Activation memory of one training step, from what the modeling code saves.

Every term below was checked tensor by tensor against the CPU ledger
(`torch.autograd.graph.saved_tensors_hooks` over a real step, transformers 5.23,
peft 0.21, torch 2.13). What autograd keeps for backward:
- RMSNorm (`LlamaRMSNorm.forward`): the fp32 copy of the input (`pow` saves it) and
  the per-token fp32 `rsqrt`; with a trainable weight also the normalised bf16 tensor.
  Gemma2's norm multiplies in fp32, so that last tensor is fp32 there.
- `nn.Linear` saves its input only when its weight needs a gradient (autograd's
  `addmm` saves `mat1` only for `mat2`'s grad): a frozen base linear, quantized or
  not, saves nothing (bnb `MatMul4Bit`/`MatMul8bitLt` keep only the packed weight).
- PEFT `lora.Linear.forward` casts the input to the fp32 adapter dtype once per
  adapted module (q and v each keep their own copy) and `lora_A` saves it; `lora_B`
  saves A's (tokens x r) output. Dropout p > 0 also keeps its mask (bool on CUDA,
  input dtype on the CPU) where the input requires grad.
- Attention: rotary builds new q and k; SDPA/flash save q, k, v, the output (which is
  also `o_proj`'s input: same storage) and an fp32 logsumexp per head and token. SDPA
  uses native GQA when there is no mask (`integrations/sdpa_attention.py::use_gqa_in_sdpa`),
  so k and v are not expanded. Eager attention (`eager_attention_forward`) saves q, the
  `repeat_kv`-expanded k and v, the fp32 softmax and its compute-dtype copy (b x heads x s x s).
- SwiGLU MLP: gate output, activation output and up output (3 x tokens x intermediate).
  Phi-3's fused `gate_up_proj` output is kept whole by the two views saved on it.
- Layer 0 under LoRA without checkpointing: its input (the frozen embedding's output)
  does not require grad, so its first norm saves nothing.
- Loss (`loss/loss_utils.py::ForCausalLMLoss`): `logits.float()` then `cross_entropy`,
  whose `log_softmax` saves its fp32 output; the backward holds that output, its fp32
  gradient and the fp32 gradient of the logits at once (12 bytes per logit).
- Gradient checkpointing (non-reentrant, `GradientCheckpointingLayer`): each layer keeps
  only its input; backward rebuilds one layer at a time.
- Eager attention's softmax backward (`_eager_attention_backward`): two fp32 batch x heads x
  s x s transients in the top (or rebuilt) layer, after its MLP has released its tensors.
- Layer 0 under LoRA (`_grad_flow`): with a frozen input, only what flows from an adapted
  projection needs a gradient, so only that is saved.
GPT-2 and BERT blocks: `activations_classic.py`.
Ignores: embedding/attention/residual dropout of the gated families (0.0 in every config of
theirs), allocator rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.training.activations_autocast import autocast_head_bytes, autocast_layer_bytes, low_bytes
from memplan.training.activations_classic import classic_attention_backward, classic_head_bytes, classic_layer_bytes
from memplan.training.modules_to_save import saved_copies
from memplan.model.lora import LoraPlan
from memplan.training.recipes import adapter_bytes, fused_lm_head, input_require_grads, lora_under_autocast
from memplan.training.parallel import is_zero
from memplan.training.setup import Setup
from memplan.training.zero_gather import INPUT_GROUP
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, is_quantized

__all__ = ["GATED_FAMILIES", "ActivationBytes", "activation_bytes", "compute_bytes", "residual_bytes"]

FP32 = 4
INT64 = 8
GATED_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3")


@dataclass(frozen=True)
class ActivationBytes:
    """Saved-for-backward bytes of one step, and the transient peaks around them."""

    first_layer: int  # saved by layer 0 (differs under LoRA: its input needs no grad)
    per_layer: int  # saved by every other layer
    recompute_layer: int  # one layer rebuilt during a checkpointed backward
    layers: int  # saved by all layers as configured
    head: int  # rotary tables, final norm, lm_head input, token ids (not logits)
    logits_saved: int  # fp32 log_softmax (+ softcap) kept for backward
    logits_forward_extra: int  # compute-dtype logits + fp32 upcast alive at the loss
    logits_backward_extra: int  # fp32 gradients alive during the loss backward
    layer_backward_extra: int  # gradients alive inside one layer's backward
    rotary: int  # cos/sin tables, alive until layer 0's backward
    # down_proj's saved input (its LoRA-A's under LoRA, with the dropout mask; the base matmul's
    # under full fine-tuning), freed before the SwiGLU backward peak of `layer_backward_extra`
    # (see `_down_input_freed`); 0 where nothing is released.
    down_input_freed: int
    # Transients at down_proj's own backward: the gradient of its input (fp32 through a LoRA-A,
    # the compute dtype through a trainable base) and the one flowing down the residual stream.
    down_backward: int
    graph_residue: int  # a tokens x intermediate tensor alive from backward until the loss is freed
    # Eager attention's softmax backward in the top (or rebuilt) layer (`_eager_attention_backward`):
    # the fp32 transients alive there, and what that layer has released by then. 0 under SDPA/flash.
    attention_backward: int = 0
    attention_freed: int = 0

    @property
    def saved(self) -> int:
        return self.layers + self.head + self.logits_saved


def compute_bytes(setup: Setup) -> int:
    """Element size of the activations. `prepare_model_for_kbit_training` casts the
    embeddings, norms and lm_head to fp32, so the whole residual stream (and every
    non-quantized op on it) runs in fp32 (peft/utils/other.py). Under autocast the
    matmul outputs (attention, MLP, logits) are low precision."""
    if setup.autocast != "none":
        return low_bytes(setup)
    return FP32 if setup.prepare_kbit_training else FLOAT_BYTES[setup.param_dtype]


def residual_bytes(setup: Setup) -> int:
    """Element size of the residual stream (layer inputs, norm inputs): fp32 under autocast."""
    return FP32 if setup.autocast != "none" else compute_bytes(setup)


def _mask_bytes(setup: Setup, e: int) -> int:
    # torch native_dropout keeps a bool mask on CUDA; on the CPU the mask has the input dtype.
    return 1 if setup.device == "cuda" else e


def _lora_bytes(spec: ModelSpec, plan: LoraPlan | None, setup: Setup, t: int, *, input_grad: bool, masks_only: bool = False) -> int:
    """Per-layer bytes the LoRA branches save (fp32 input copy, A's output, dropout mask)."""
    if plan is None:
        return 0
    key = (id(plan), spec.num_layers, _uncast_input(setup), setup.lora_dropout > 0, _mask_bytes(setup, FP32), input_grad, masks_only,
           adapter_bytes(setup), lora_under_autocast(setup))
    hit = _LORA_PER_TOKEN.get(key)
    if hit is None or hit[0] is not plan:
        if len(_LORA_PER_TOKEN) >= 4096:
            _LORA_PER_TOKEN.clear()
        hit = (plan, _lora_per_token(spec, plan, setup, input_grad=input_grad, masks_only=masks_only))
        _LORA_PER_TOKEN[key] = hit
    return t * hit[1]


# Memo of the per-token LoRA bytes (the loop over targets is the sweep's hot spot), keyed by the
# plan's identity and the setup fields it reads; the entry keeps the plan alive so its id stays its own.
_LORA_PER_TOKEN: dict[tuple, tuple[LoraPlan, int]] = {}


def _uncast_input(setup: Setup) -> bool:
    """Is the adapted modules' input fp32 already, so that PEFT's `_cast_input_dtype` returns it
    uncopied (`x.dtype == dtype`): under prepare_model_for_kbit_training, or on an fp32 base
    without autocast; or bf16 adapters (SFTTrainer on a quantized base, memplan.training.recipes)
    over a bf16 stream."""
    return setup.autocast == "none" and compute_bytes(setup) == adapter_bytes(setup)


def _lora_per_token(spec: ModelSpec, plan: LoraPlan, setup: Setup, *, input_grad: bool, masks_only: bool) -> int:
    total = 0
    ab = adapter_bytes(setup)  # fp32 (PEFT's autocast_adapter_dtype), bf16 under SFTTrainer's QLoRA cast
    if lora_under_autocast(setup):
        ab = FLOAT_BYTES["bf16"]  # autocast's bf16 casts are what lora_A / lora_B save (recipes.lora_under_autocast)
    shared_inputs: set[str] = set()
    for lin in plan.targets:
        if lin.count != spec.num_layers:  # lm_head / MLM head: counted in the head
            continue
        if not masks_only:
            total += ab * plan.rank  # A's output, saved by lora_B
            if setup.lora_dropout > 0 or not _uncast_input(setup):
                # lora_A saves its own input: the dropout's output (a new tensor per adapted module,
                # even where the input is already fp32), else the cast to the adapter dtype. Ledger:
                # tiny qwen2 fp4 kbit-prep q,v dropout 0.1: v_proj's dropout output was missing.
                total += ab * lin.in_features
            else:
                # The input is already fp32: no cast copy; lora_A saves the module input itself,
                # which q/k/v (and gate/up) share, and which SDPA already keeps for o_proj.
                group = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(lin.name, lin.name)
                if group not in shared_inputs and lin.name != "o_proj":
                    shared_inputs.add(group)
                    total += ab * lin.in_features
        if setup.lora_dropout > 0 and (input_grad or lin.name not in ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value")):
            total += _mask_bytes(setup, FP32) * lin.in_features
    return total


def _down_input_freed(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, t: int) -> int:
    """What down_proj keeps of its tokens x intermediate input that is freed before the SwiGLU
    multiply's backward. Autograd runs down_proj's nodes before the multiply's, and
    `torch/csrc/autograd/engine.cpp::call_function` releases a node's saved tensors once it has run
    (retain_graph=False), so the input is gone when the branch gradients are allocated.

    - Full fine-tuning: the base matmul's saved input (for the weight gradient), in the compute
      dtype. Ledger, tiny llama full bf16 s128 b2 gc (the rebuilt layer 0's backward): +1.84% -> +0.0x%.
    - LoRA: the fp32 input `lora_A` saves (a cast copy, or the input itself when the stream is
      already fp32) and the dropout mask; PEFT's `lora/layer.py::Linear.forward` builds
      `result + lora_B(lora_A(dropout(x))) * scaling` after the base matmul, so the adapter's nodes
      run first.
    Dense gated MLPs without autocast only (Mixtral's experts are parameter targets; the autocast
    path keeps low-precision copies instead)."""
    if setup.autocast != "none" or spec.model_type not in GATED_FAMILIES or spec.num_experts:
        return 0
    if plan is None:
        return compute_bytes(setup) * t * spec.intermediate_size if setup.method == "full" else 0
    # Under DeepSpeed the adapters are in the stream's dtype (recipes.adapter_dtype), so lora_A saves the
    # input itself, as under prepare_model_for_kbit_training, and the same release shows on the ledger
    # (tiny llama bf16 all-linear r16 s128 b2 gc, ZeRO-2 ws 2: +4.27% -> +0.55%).
    zero_uncast = is_zero(setup.parallel) and _uncast_input(setup)
    if not (setup.prepare_kbit_training or zero_uncast):
        # Checked on the ledger under prepare_model_for_kbit_training only (tiny llama nf4
        # all-linear: +9.46% -> +0.02%, +5.03% -> +0.21%). Elsewhere the input is freed the same
        # way, but the ledger puts the peak earlier, in the rebuilt down_proj's forward (a second
        # fp32 t x I buffer alive; traced on tiny qwen2 bf16 all-linear gc), which the unreduced
        # SwiGLU term covers (bf16 -1.6%; subtracting: -5.5%; an fp32 base: +4.8% vs -7.3%).
        # That moment is not modelled yet.
        return 0
    down = [lin for lin in plan.targets if lin.name == "down_proj" and lin.count == spec.num_layers]
    if not down:
        return 0
    inter = down[0].in_features
    mask = _mask_bytes(setup, FP32) * t * inter if setup.lora_dropout > 0 else 0
    return compute_bytes(setup) * t * inter + mask  # the input itself, in the stream's dtype (fp32 under prepare_kbit)


def _down_backward(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, t: int) -> int:
    """Transients at down_proj's backward, when its input is released (`_down_input_freed`):
    the gradient of that input (fp32 through lora_A, the compute dtype through a trainable base
    matmul) and the residual-stream gradient."""
    if not _down_input_freed(spec, setup, plan, t):
        return 0
    grad = FP32 if plan is not None else compute_bytes(setup)
    return grad * t * spec.intermediate_size + residual_bytes(setup) * t * spec.hidden_size


def _zero3_linear_inputs(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, t: int, *, input_grad: bool) -> int:
    """What DeepSpeed ZeRO-3's linear adds to a layer's saved tensors under LoRA.

    ZeRO-3 replaces F.linear process-wide (`partition_parameters.py::Init._enable_mem_efficient_linear`)
    with `zero/linear.py::LinearFunctionForZeroStage3`, whose `setup_context` saves (input, weight,
    bias) whenever the op joins the graph: a frozen linear whose input requires grad saves its input,
    which plain F.linear (addmm saves `mat1` only for the weight's gradient) does not. Nothing new where
    autograd keeps that tensor already: lora_A's uncast input (q/k/v share one, gate/up another), SDPA's
    output for o_proj. bitsandbytes 4-bit layers call `bnb.matmul_4bit`, not F.linear; Mixtral's fused
    experts are no F.linear either. Checked on the CPU ledger (tiny llama, ws 2): +274,432 bytes of
    forward activations under LoRA q,v, none under full fine-tuning. Ignores autocast (not measured)."""
    if setup.parallel != "zero3" or plan is None or spec.model_type not in GATED_FAMILIES or setup.autocast != "none":
        return 0
    if is_quantized(setup.quant):  # every layer linear is a bnb layer
        return 0
    e = compute_bytes(setup)
    h, a = spec.hidden_size, spec.num_heads * spec.head_dim
    # The input each group reads: the attention norm's output, the attention output (a fresh copy under
    # eager attention; SDPA's saved output otherwise), the MLP norm's output, the gated product.
    sizes = {0: e * t * h, 1: e * t * a if setup.attention == "eager" else 0, 2: e * t * h,
             3: 0 if spec.num_experts else e * t * spec.intermediate_size}
    adapted = {INPUT_GROUP[lin.name] for lin in plan.targets if lin.count == spec.num_layers and lin.name in INPUT_GROUP}
    first = min(adapted, default=len(sizes))
    total = 0
    for group, size in sizes.items():
        if not input_grad and group <= first:
            continue  # its input does not require grad: the op is not recorded
        if group in adapted and _uncast_input(setup):
            continue  # lora_A saves this very tensor
        total += size
    return total


def _zero3_head_input(spec: ModelSpec, setup: Setup, plan: LoraPlan | None) -> int:
    """ZeRO-3's linear saves a frozen lm_head's input (the final norm's output) under LoRA
    (`_zero3_linear_inputs`); bitsandbytes leaves lm_head unquantized, so QLoRA saves it too."""
    if setup.parallel != "zero3" or plan is None or spec.model_type not in GATED_FAMILIES or setup.autocast != "none":
        return 0
    if fused_lm_head(setup) or saved_copies(spec, setup).head_numel:
        return 0
    if any(lin.is_output for lin in plan.targets) and _uncast_input(setup):
        return 0
    return compute_bytes(setup) * setup.batch_size * setup.seq_len * spec.hidden_size


def _int8_kept_bytes(spec: ModelSpec, setup: Setup, t: int, *, input_grad: bool, inter: int, plan: LoraPlan | None = None) -> int:
    """bnb `MatMul8bitLt.forward` keeps its input `A` in `ctx.tensors` (a plain attribute,
    not `save_for_backward`) whenever A needs grad (`_grad_flow`): the attention norm output
    (unless the layer input needs no grad), the MLP norm output and down_proj's input; o_proj's input
    is SDPA's saved output, except under checkpointing, which frees saved tensors but
    cannot see ctx attributes."""
    if setup.quant != "int8" or spec.model_type not in GATED_FAMILIES:
        return 0
    e = compute_bytes(setup)
    h, a = spec.hidden_size, spec.num_heads * spec.head_dim
    g = _grad_flow(spec, setup, plan, input_grad=input_grad)
    kept = e * t * h * (int(input_grad) + int(g.mlp_in)) + (e * t * inter if g.gate or g.up else 0)
    if setup.grad_checkpointing and g.qkv:
        kept += e * t * a
    return kept


def _first_layer_input_grad(spec: ModelSpec, setup: Setup) -> bool:
    """Does layer 0's input require grad? For full fine-tuning yes; under LoRA only when
    PEFT calls `enable_input_require_grads`: with checkpointing on a non-quantized base
    (peft_model.py::_prepare_model_for_gradient_checkpointing) or with checkpointing under
    `prepare_model_for_kbit_training`; or when the input embedding is a trainable
    `modules_to_save` copy (memplan.training.modules_to_save)."""
    if setup.method == "full" or saved_copies(spec, setup).input_grad:
        return True
    if input_require_grads(setup):  # SFTTrainer calls it itself
        return True
    # prepare_model_for_kbit_training calls it only with use_gradient_checkpointing=True
    # (peft/utils/other.py): without checkpointing layer 0's input needs no grad (checked on the
    # profiler's model: the embedding output's requires_grad, tiny llama and BERT).
    return setup.grad_checkpointing and (setup.prepare_kbit_training or not is_quantized(setup.quant))


@dataclass(frozen=True)
class _GradFlow:
    """Which tensors of one gated decoder layer need a gradient. Every layer's do under full
    fine-tuning, or once its input does; layer 0's input under LoRA needs none without
    `enable_input_require_grads` (`_first_layer_input_grad`), and then only what flows from an
    adapted projection does (autograd saves a tensor for an op only where a gradient needs it)."""

    qkv: bool  # q, k, v (an adapted q/k/v projection, or a grad-requiring input)
    mlp_in: bool  # the residual after the attention, the MLP's input
    gate: bool  # the gate projection's output
    up: bool  # the up projection's output
    norms: int  # the RMSNorms that save their input


def _grad_flow(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, *, input_grad: bool) -> _GradFlow:
    names = {lin.name for lin in plan.targets if lin.count == spec.num_layers} if plan is not None else set()
    every = input_grad or setup.method == "full"
    qkv = every or bool(names & {"q_proj", "k_proj", "v_proj", "qkv_proj"})
    attn_out = qkv or "o_proj" in names
    mlp_in = every or attn_out
    gate = mlp_in or bool(names & {"gate_proj", "gate_up_proj"})
    up = mlp_in or bool(names & {"up_proj", "gate_up_proj"})
    mlp_out = gate or up or "down_proj" in names
    _, n_norms = _norm_bytes(spec, setup, 1)
    if every:
        norms = n_norms
    elif spec.model_type == "gemma2":  # input, post-attention, pre-feed-forward, post-feed-forward norms
        norms = attn_out + mlp_in + mlp_out
    else:  # input and post-attention norms
        norms = int(mlp_in)
    return _GradFlow(qkv=qkv, mlp_in=mlp_in, gate=gate, up=up, norms=norms)


def _frozen_input_masks(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, g: _GradFlow, t: int) -> int:
    """LoRA dropout masks `_lora_bytes` counts for o/gate/up/down adapters that dropout does not keep:
    their input needs no gradient (layer 0 before any adapted projection)."""
    if plan is None or setup.lora_dropout <= 0 or g.mlp_in:
        return 0
    needs = {"o_proj": g.qkv, "gate_proj": False, "up_proj": False, "gate_up_proj": False, "down_proj": g.gate or g.up}
    return sum(_mask_bytes(setup, FP32) * t * lin.in_features for lin in plan.targets
               if lin.count == spec.num_layers and lin.name in needs and not needs[lin.name])


def _norm_bytes(spec: ModelSpec, setup: Setup, t: int) -> tuple[int, int]:
    """(bytes one RMSNorm saves, norms per decoder layer) of a gated family: the fp32 input copy and
    rsqrt; a trainable weight also keeps the normalised tensor. Gemma2 has four norms per layer
    (pre/post attention and feed-forward), multiplies in fp32 and saves `1 + weight.float()`."""
    gemma2 = spec.model_type == "gemma2"
    h = spec.hidden_size
    normed = FP32 if gemma2 else compute_bytes(setup)
    per_norm = FP32 * t * h + FP32 * t + (normed * t * h if setup.method == "full" else 0) + (FP32 * h if gemma2 else 0)
    return per_norm, 4 if gemma2 else 2


def _layer_bytes(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, *, input_grad: bool) -> int:
    e = compute_bytes(setup)
    b, s = setup.batch_size, setup.seq_len
    t = b * s
    if setup.autocast != "none":
        masks = _lora_bytes(spec, plan, setup, t, input_grad=input_grad, masks_only=True)
        return autocast_layer_bytes(spec, setup, plan, input_grad=input_grad, lora_bytes=masks)
    h, a = spec.hidden_size, spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    full = setup.method == "full"
    inter = spec.intermediate_size
    total = _lora_bytes(spec, plan, setup, t, input_grad=input_grad)
    total += _zero3_linear_inputs(spec, setup, plan, t, input_grad=input_grad)
    if plan is not None and lora_under_autocast(setup):
        # The autocast cache's bf16 copies of this layer's fp32 adapter weights, saved by lora_A/lora_B.
        total += FLOAT_BYTES["bf16"] * sum(plan.rank * (lin.in_features + lin.out_features) for lin in plan.targets if lin.count == spec.num_layers)

    if spec.model_type in GATED_FAMILIES:
        g = _grad_flow(spec, setup, plan, input_grad=input_grad)
        per_norm, _ = _norm_bytes(spec, setup, t)
        total += per_norm * g.norms - _frozen_input_masks(spec, setup, plan, g, t)
        # Attention. Nothing in it needs a gradient when its input does not (layer 0 under LoRA) and
        # no q/k/v projection is adapted: autograd saves none of its tensors (o_proj's adapter keeps
        # its own input copy, counted with the LoRA bytes). Ledger: tiny gemma2 fp4 LoRA on up_proj,
        # eager s169 b3: two layers' softmax and softcap outputs alive at the loss, not three.
        if not g.qkv:
            pass
        elif setup.attention == "eager":
            # `q @ k.T` saves q for k's gradient and k for q's; the fp32 softmax output (and Gemma2's
            # tanh of the scores) is saved where the scores need a gradient; `probs @ v` saves the
            # compute-dtype probabilities for v's gradient and the expanded v for theirs. An fp32
            # stream makes `.to(query.dtype)` a no-op: the probabilities are the softmax output.
            # Ledger: tiny llama fp4 LoRA on v_proj and up_proj, eager s239 b3 (one layer): only
            # the bf16 probabilities are kept, +9.7% before.
            names = {lin.name for lin in plan.targets} if plan is not None else set()
            fused = "qkv_proj" in names
            q_grad, k_grad, v_grad = (input_grad or full or fused or n in names for n in ("q_proj", "k_proj", "v_proj"))
            scores_grad = q_grad or k_grad
            probs = b * spec.num_heads * s * s
            total += e * t * a * (int(k_grad) + int(q_grad) + int(scores_grad))  # q, expanded k, expanded v
            if scores_grad:
                total += FP32 * probs + (e * probs if spec.attn_logit_softcapping else 0)
            if v_grad and not (scores_grad and e == FP32):
                total += (e if e != FP32 else FP32) * probs
            total += e * t * a if full else 0  # o_proj input (a fresh contiguous copy)
        else:
            total += e * t * (a + kv) + e * t * kv + e * t * a + FP32 * b * spec.num_heads * s
            if spec.model_type == "phi3" and full:
                # v is a strided view of the fused qkv output; with a trainable qkv_proj one
                # more kv-sized tensor is kept (measured on the CPU ledger).
                total += e * t * kv
        if full:
            total += e * t * h  # q/k/v input (the norm output), shared by the three
        total += _int8_kept_bytes(spec, setup, t, input_grad=input_grad, inter=inter, plan=plan)
        # MLP.
        if spec.num_experts:
            # MixtralExperts: per routed token, gate_up output (2I), act output (I), down output (h).
            k = spec.experts_per_token
            total += e * t * k * (3 * inter + h) + FP32 * t * spec.num_experts
            if full:
                total += e * t * k * (h + inter)
        else:
            # SwiGLU `act(gate) * up`: the activation saves its input (the gate output) and the
            # multiply saves `up` for the gate branch's gradient and `act(gate)` for up's.
            total += e * t * inter * (2 * g.gate + g.up)
            if full:
                total += e * t * h + e * t * inter  # gate/up input, down input
        return total

    # GPT-2 / BERT (activations_classic.py).
    return classic_layer_bytes(spec, setup, plan, e=e, input_grad=input_grad, lora=total)


def activation_bytes(spec: ModelSpec, setup: Setup, plan: LoraPlan | None) -> ActivationBytes:
    e = compute_bytes(setup)
    b, s = setup.batch_size, setup.seq_len
    t = b * s
    h = spec.hidden_size
    full = setup.method == "full"
    r = residual_bytes(setup)
    first_grad = _first_layer_input_grad(spec, setup)
    per = _layer_bytes(spec, setup, plan, input_grad=True)
    first = per if first_grad else _layer_bytes(spec, setup, plan, input_grad=False)
    if setup.grad_checkpointing:
        # Each layer keeps its input, plus what bnb int8 keeps outside autograd's view (in
        # every layer, measured); the rebuilt layer's int8 inputs replace the kept ones.
        layers = spec.num_layers * (r * t * h + _int8_kept_bytes(spec, setup, t, input_grad=True, inter=spec.intermediate_size))
        recompute = per - _int8_kept_bytes(spec, setup, t, input_grad=True, inter=spec.intermediate_size)
        if r == FP32 and spec.model_type in GATED_FAMILIES:
            # An fp32 residual stream makes `.to(torch.float32)` a no-op: the rebuilt layer's
            # first norm saves the layer input itself, already kept by the checkpoint.
            recompute -= FP32 * t * h
    else:
        layers = first + (spec.num_layers - 1) * per
        recompute = 0

    # Head: rotary cos/sin (shared by all layers, batch-broadcast), final norm, lm_head input,
    # shifted labels (int64), token ids for the embedding's weight gradient.
    head = INT64 * t + FP32  # shifted labels, the 0-d loss
    rotary = 0
    if setup.autocast != "none":
        head, rotary = autocast_head_bytes(spec, setup)
    elif spec.model_type in GATED_FAMILIES:
        # cos/sin are saved by the rotary multiplies, or kept as checkpointed layers' inputs.
        rotary = 2 * e * s * spec.head_dim
        head += rotary + FP32 * t * h + FP32 * t
        if full:
            head += 2 * e * t * h + INT64 * t
    else:
        head = classic_head_bytes(spec, setup, e=e, lm_head_grad=full)
    if saved_copies(spec, setup).head_numel and not (fused_lm_head(setup) and spec.is_causal_lm):
        # A trainable `modules_to_save` copy of lm_head saves its input (the final norm's output,
        # cast to the low dtype under autocast) for its weight gradient, as full fine-tuning does.
        # TRL's fused LM head saves that input anyway (recipes.fused_head_bytes).
        head += (low_bytes(setup) if setup.autocast != "none" else e) * t * h
    head += _zero3_head_input(spec, setup, plan)

    logits = t * spec.vocab_size
    logits_saved = FP32 * logits + (e * logits if spec.final_logit_softcapping else 0)  # tanh output under softcapping
    logits_fwd = e * logits + (FP32 * logits if e != FP32 else 0)  # no upcast copy of fp32 logits
    logits_bwd = 2 * FP32 * logits
    if not spec.is_causal_lm:
        # BertForMaskedLM calls CrossEntropyLoss on the scores as they are (modeling_bert.py): its
        # log_softmax and both backward gradients stay in the compute dtype.
        logits_saved, logits_fwd, logits_bwd = e * logits, e * logits, 2 * e * logits
    inter = spec.intermediate_size * (spec.experts_per_token if spec.num_experts else 1)
    # Inside the last layer's MLP backward: the gradient of the down-proj input and both
    # SwiGLU branch gradients (MulBackward0), plus the hidden-size gradient flowing down
    # the residual stream.
    layer_bwd = 3 * e * t * inter + r * t * h
    return ActivationBytes(
        first_layer=first,
        per_layer=per,
        recompute_layer=recompute,
        layers=layers,
        head=head,
        logits_saved=logits_saved,
        logits_forward_extra=logits_fwd,
        logits_backward_extra=logits_bwd,
        layer_backward_extra=layer_bwd,
        rotary=rotary,
        down_input_freed=_down_input_freed(spec, setup, plan, t),
        down_backward=_down_backward(spec, setup, plan, t),
        # Observed on the CPU ledger (torch 2.13): one compute-dtype tokens x intermediate
        # tensor outlives the backward until the loss tensor is released.
        graph_residue=e * t * inter,
        **_eager_attention_backward(spec, setup, plan, t),
    )


def _eager_attention_backward(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, t: int) -> dict[str, int]:
    """The softmax backward of one layer's eager attention (`eager_attention_forward`:
    `softmax(scores, dtype=torch.float32).to(query.dtype)`, then `matmul(probs, value)`).

    Autograd reaches it after the layer's MLP and after the `probs @ value` matmul, whose node
    releases the compute-dtype probabilities it saved (`engine.cpp::call_function`). The `.to()`
    backward upcasts the probabilities' gradient to fp32 and `_softmax_backward_data` writes an
    fp32 gradient of the scores beside it while the saved fp32 softmax output is still held: two
    fp32 batch x heads x s x s transients. Released by then and subtracted: the compute-dtype
    probabilities, the norms after the attention (`_norm_bytes`), the SwiGLU MLP's saved outputs
    (gate, activation, up; with a trainable base also its two inputs) and a trainable o_proj's
    input. The MLP's LoRA inputs are released too and are not subtracted (a small over-count). Ledger: tiny gemma2 full bf16 eager
    s102 b3 (one layer, 44-token vocabulary) -14.7% at backward_loss before, +4.4% now (its q,
    counted here, was released too); tiny qwen2 LoRA bf16 eager s700 b1 -2.1% before, +0.3% now.
    Without autocast; GPT-2 and BERT: `activations_classic.classic_attention_backward`."""
    if setup.autocast != "none":
        return {}
    if spec.model_type not in GATED_FAMILIES:
        return classic_attention_backward(spec, setup, plan, e=compute_bytes(setup))
    if setup.attention != "eager":
        return {}
    names = {lin.name for lin in plan.targets} if plan is not None else set()
    if spec.num_layers == 1 and not _first_layer_input_grad(spec, setup) and not names & {"q_proj", "k_proj", "qkv_proj"}:
        return {}  # the only layer's scores need no gradient: no softmax backward runs
    e = compute_bytes(setup)
    probs = setup.batch_size * spec.num_heads * setup.seq_len * setup.seq_len
    per_norm, n_norms = _norm_bytes(spec, setup, t)
    # The compute-dtype probabilities (none on an fp32 stream) and every norm after the input norm.
    freed = (e * probs if e != FP32 else 0) + per_norm * (n_norms - 1)
    if not spec.num_experts:
        freed += 3 * e * t * spec.intermediate_size
        if setup.method == "full":
            freed += e * t * (spec.hidden_size + spec.intermediate_size)
    if setup.method == "full":
        freed += e * t * spec.num_heads * spec.head_dim  # o_proj's input, saved for its weight gradient
    return {"attention_backward": 2 * FP32 * probs, "attention_freed": freed}
