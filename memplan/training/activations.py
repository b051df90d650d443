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
- Phi-3 slices q, k, v out of one fused output: SDPA's saved v keeps all of it.
- The top layer inside an adapted MLP projection's LoRA forward (`_mlp_lora_moments`), in the
  forward and in the layer a checkpointed backward rebuilds (which stops at the layer's last
  saved tensor): the branch's fp32 output and its scaled copy beside the base result.
GPT-2 and BERT blocks: `activations_classic.py`; what the LoRA branches save: `activations_lora.py`.
Ignores: embedding/attention/residual dropout of the gated families (0.0 in every config of
theirs), allocator rounding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from memplan.training.activations_autocast import autocast_head_bytes, autocast_layer_bytes, low_bytes
from memplan.training.activations_classic import classic_attention_backward, classic_head_bytes, classic_layer_bytes
from memplan.training.activations_zero3 import zero3_head_input, zero3_linear_inputs
from memplan.training.activations_lora import (ATTENTION_INPUTS, FP32, GATED_FAMILIES, compute_bytes, expert_lora_bytes, kept_bytes,
                                               layer_lora_bytes, mask_bytes, mlp_forward_moment, mlp_saved, module_bytes, residual_bytes,
                                               swiglu_saved)
from memplan.training.activations_mask import eager_masks
from memplan.training.modules_to_save import saved_copies
from memplan.model.lora import LoraPlan
from memplan.training.recipes import adapter_bytes, fused_lm_head, input_require_grads, lora_under_autocast
from memplan.training.setup import Setup
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, is_quantized

__all__ = ["GATED_FAMILIES", "ActivationBytes", "activation_bytes", "compute_bytes", "residual_bytes"]

INT64 = 8


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
    # Inside the worst adapted MLP projection's LoRA forward (`_mlp_lora_moments`): the running top
    # layer's bytes then (its tensors before the MLP and what the MLP holds so far) and the branch's
    # transients; in the forward without checkpointing, and in the layer a checkpointed backward rebuilds
    # (its transients include the gradient that backward holds there). 0 without LoRA on the MLP.
    mlp_forward_layer: int = 0
    mlp_forward_transient: int = 0
    mlp_recompute_layer: int = 0
    mlp_recompute_transient: int = 0
    # Eager attention's masks (activations_mask.py): those checkpointed layers keep as arguments until
    # layer 0's backward, as they keep the rotary tables; the others, alive inside the layers' forward.
    kept_masks: int = 0
    forward_masks: int = 0

    @property
    def layer_inputs(self) -> int:
        """What every layer takes and the step keeps until layer 0's backward: the rotary tables, and
        eager attention's masks under checkpointing (both counted in `head` too)."""
        return self.rotary + self.kept_masks

    @property
    def saved(self) -> int:
        return self.layers + self.head + self.logits_saved


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
    # Checked on the ledger under prepare_model_for_kbit_training (tiny llama nf4 all-linear: +9.46% ->
    # +0.02%), under DeepSpeed, whose adapters are in the stream's dtype (recipes.adapter_dtype: tiny
    # llama bf16 all-linear r16 s128 b2 gc, ZeRO-2 ws 2: +4.27% -> +0.55%), and on a bf16 or 4-bit base,
    # once the rebuilt down_proj's forward is a moment of its own (`_mlp_lora_moments`; tiny llama nf4
    # LoRA down_proj gc: +2.0% before).
    down = [lin for lin in plan.targets if lin.name == "down_proj" and lin.count == spec.num_layers]
    if not down:
        return 0
    inter = down[0].in_features
    mask = mask_bytes(setup, FP32) * t * inter if setup.lora_dropout > 0 else 0
    # lora_A's saved input in the adapter dtype: the cast copy, the dropout's output, or the input itself.
    return adapter_bytes(setup) * t * inter + mask


def _down_backward(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, t: int) -> int:
    """Transients at down_proj's backward, when its input is released (`_down_input_freed`):
    the gradient of that input (fp32 through lora_A, the compute dtype through a trainable base
    matmul) and the residual-stream gradient."""
    if not _down_input_freed(spec, setup, plan, t):
        return 0
    grad = FP32 if plan is not None else compute_bytes(setup)
    return grad * t * spec.intermediate_size + residual_bytes(setup) * t * spec.hidden_size


def _int8_kept_bytes(spec: ModelSpec, setup: Setup, t: int, *, input_grad: bool, inter: int, plan: LoraPlan | None = None) -> int:
    """bnb `MatMul8bitLt.forward` keeps its input `A` in `ctx.tensors` (a plain attribute,
    not `save_for_backward`) whenever A needs grad (`_grad_flow`): the attention norm output
    (unless the layer input needs no grad), the MLP norm output and down_proj's input; o_proj's input
    is SDPA's saved output, except under checkpointing, which frees saved tensors but
    cannot see ctx attributes."""
    return sum(_int8_kept_parts(spec, setup, t, input_grad=input_grad, inter=inter, plan=plan))


def _int8_kept_parts(spec: ModelSpec, setup: Setup, t: int, *, input_grad: bool, inter: int, plan: LoraPlan | None) -> tuple[int, int]:
    """`_int8_kept_bytes` split at the MLP: (the attention's kept inputs, the MLP's)."""
    if setup.quant != "int8" or spec.model_type not in GATED_FAMILIES:
        return 0, 0
    e = compute_bytes(setup)
    h, a = spec.hidden_size, spec.num_heads * spec.head_dim
    g = _grad_flow(spec, setup, plan, input_grad=input_grad)
    attention = e * t * h * int(input_grad) + (e * t * a if setup.grad_checkpointing and g.qkv else 0)
    return attention, e * t * h * int(g.mlp_in) + (e * t * inter if g.gate or g.up else 0)


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

    q: bool  # the query projection's output (adapted, or a grad-requiring input)
    k: bool
    v: bool
    mlp_in: bool  # the residual after the attention, the MLP's input
    gate: bool  # the gate projection's output
    up: bool  # the up projection's output
    norms: int  # the RMSNorms that save their input
    input_grad: bool  # the layer's input

    @property
    def qkv(self) -> bool:
        """Does any of q, k, v (so the attention output) need a gradient?"""
        return self.q or self.k or self.v

    @functools.cached_property
    def lora_inputs(self) -> dict[str, bool]:
        """Whether each adapted module's input needs a gradient (which keeps its LoRA dropout mask)."""
        return {**dict.fromkeys(ATTENTION_INPUTS, self.input_grad), "o_proj": self.qkv, "gate_proj": self.mlp_in,
                "up_proj": self.mlp_in, "gate_up_proj": self.mlp_in, "down_proj": self.gate or self.up}


def _grad_flow(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, *, input_grad: bool) -> _GradFlow:
    key = (id(plan), id(spec), setup.method, input_grad)
    hit = _GRAD_FLOW.get(key)
    if hit is not None and hit[0] is plan and hit[1] is spec:
        return hit[2]
    if len(_GRAD_FLOW) >= 4096:
        _GRAD_FLOW.clear()
    flow = _grad_flow_of(spec, setup, plan, input_grad=input_grad)
    _GRAD_FLOW[key] = (plan, spec, flow)
    return flow


# Memo of `_grad_flow` (called a few times per estimate), keyed by identities; an entry keeps both alive.
_GRAD_FLOW: dict[tuple, tuple[LoraPlan | None, ModelSpec, _GradFlow]] = {}


def _grad_flow_of(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, *, input_grad: bool) -> _GradFlow:
    names = {lin.name for lin in plan.targets if lin.count == spec.num_layers} if plan is not None else set()
    every = input_grad or setup.method == "full"
    q, k, v = (every or "qkv_proj" in names or n in names for n in ("q_proj", "k_proj", "v_proj"))
    attn_out = q or k or v or "o_proj" in names
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
    return _GradFlow(q=q, k=k, v=v, mlp_in=mlp_in, gate=gate, up=up, norms=norms, input_grad=every)


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
        masks = layer_lora_bytes(spec, plan, setup, t, input_grad=dict.fromkeys(ATTENTION_INPUTS, input_grad), masks_only=True)
        return autocast_layer_bytes(spec, setup, plan, input_grad=input_grad, lora_bytes=masks)
    h, a = spec.hidden_size, spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    full = setup.method == "full"
    inter = spec.intermediate_size
    total = zero3_linear_inputs(spec, setup, plan, t, input_grad=input_grad)
    if plan is not None and lora_under_autocast(setup):
        # The autocast cache's bf16 copies of this layer's fp32 adapter weights, saved by lora_A/lora_B.
        total += FLOAT_BYTES["bf16"] * sum(plan.rank * (lin.in_features + lin.out_features) for lin in plan.targets if lin.count == spec.num_layers)

    if spec.model_type in GATED_FAMILIES:
        g = _grad_flow(spec, setup, plan, input_grad=input_grad)
        per_norm, _ = _norm_bytes(spec, setup, t)
        total += layer_lora_bytes(spec, plan, setup, t, input_grad=g.lora_inputs) + per_norm * g.norms
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
            scores_grad = g.q or g.k
            probs = b * spec.num_heads * s * s
            total += e * t * a * (int(g.k) + int(g.q) + int(scores_grad))  # q, expanded k, expanded v
            if scores_grad:
                total += FP32 * probs + (e * probs if spec.attn_logit_softcapping else 0)
            if g.v and not (scores_grad and e == FP32):
                total += (e if e != FP32 else FP32) * probs
            total += e * t * a if full else 0  # o_proj input (a fresh contiguous copy)
        else:
            # The roped q and k, v, the output and the fp32 logsumexp. Phi-3 slices v out of the fused
            # qkv output (`modeling_phi3.py::Phi3Attention.forward`), so SDPA's saved v keeps all of it
            # (ledger, tiny phi3 GQA 6/1 heads, full and LoRA: the whole qkv output alive, -7.4% before).
            v = e * t * (a + 2 * kv) if spec.fused_qkv else e * t * kv
            total += e * t * (a + kv) + v + e * t * a + FP32 * b * spec.num_heads * s
            if spec.rope_concatenates and full:
                # SDPA's output is head-major, and its `transpose(1, 2).contiguous()` a copy, which a
                # trainable o_proj saves. Ledger: tiny phi3 full bf16, `sdpa_attention.py` clone alive per layer.
                total += e * t * a
        if full:
            total += e * t * h  # q/k/v input (the norm output), shared by the three
        total += _int8_kept_bytes(spec, setup, t, input_grad=input_grad, inter=inter, plan=plan)
        # MLP.
        if spec.num_experts:
            # MixtralExperts: per routed token, gate_up output (2I) and act output (I) where the experts'
            # outputs need a gradient (their input does, or gate_up_proj is adapted); the down output (h)
            # and the fp32 router probabilities where the routing weights do (their input does, or the
            # router is adapted). Layer 0 under LoRA on down_proj or the router alone keeps neither pair.
            k = spec.experts_per_token
            adapted = {p.name for p in plan.param_targets} if plan is not None else set()
            routed = g.mlp_in or "gate.weight" in adapted
            total += (e * t * k * 3 * inter if g.mlp_in or "experts.gate_up_proj" in adapted else 0)
            total += (e * t * k * h + FP32 * t * spec.num_experts) if routed else 0
            if full:
                total += e * t * k * (h + inter)
            elif plan is not None and plan.param_targets:
                total += expert_lora_bytes(spec, setup, plan, t, mlp_in=g.mlp_in)
        else:
            total += swiglu_saved(setup, t, inter, gate=g.gate, up=g.up)
            if full:
                total += e * t * h + e * t * inter  # gate/up input, down input
        return total

    # GPT-2 / BERT (activations_classic.py).
    lora = layer_lora_bytes(spec, plan, setup, t, input_grad=dict.fromkeys(ATTENTION_INPUTS, input_grad))
    return classic_layer_bytes(spec, setup, plan, e=e, input_grad=input_grad, lora=total + lora)


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
    # Eager attention's masks: kept as checkpointed layers' arguments (with the rotary tables), or alive
    # only inside the layers' forward (activations_mask.py).
    masks_made, masks_taken = eager_masks(spec, setup)
    masks_kept = masks_taken if setup.grad_checkpointing else 0
    head += masks_kept
    if saved_copies(spec, setup).head_numel and not (fused_lm_head(setup) and spec.is_causal_lm):
        # A trainable `modules_to_save` copy of lm_head saves its input (the final norm's output,
        # cast to the low dtype under autocast) for its weight gradient, as full fine-tuning does.
        # TRL's fused LM head saves that input anyway (recipes.fused_head_bytes).
        head += (low_bytes(setup) if setup.autocast != "none" else e) * t * h
    head += zero3_head_input(spec, setup, plan)

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
        kept_masks=masks_kept,
        forward_masks=masks_made - masks_kept,
        down_input_freed=_down_input_freed(spec, setup, plan, t),
        down_backward=_down_backward(spec, setup, plan, t),
        # Observed on the CPU ledger (torch 2.13): one compute-dtype tokens x intermediate
        # tensor outlives the backward until the loss tensor is released.
        graph_residue=e * t * inter,
        **_eager_attention_backward(spec, setup, plan, t),
        **_mlp_lora_moments(spec, setup, plan, t, top=per if spec.num_layers > 1 else first, recompute=recompute,
                            input_grad=first_grad or spec.num_layers > 1),
    )


def _mlp_lora_moments(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, t: int, *, top: int, recompute: int,
                      input_grad: bool) -> dict[str, int]:
    """The top layer inside its worst adapted MLP projection's LoRA forward
    (`activations_lora.mlp_forward_moment`): without checkpointing in the forward, after the layers
    below saved their tensors (`top`: what the top layer saves once finished); with checkpointing in
    the backward, when the rebuilt layer (`recompute`) runs that forward again. There the backward
    holds, beside the residual gradient, what the layer's backward made before its first unpack of a
    saved tensor, which is when non-reentrant checkpointing rebuilds it: the scaled gradient of an adapted
    down_proj's lora_B output (ledger: tiny phi3 nf4 LoRA all-linear s153 b2 gc, -19.4% before).
    Dense gated MLPs without autocast. Every term is linear in the tokens: `_mlp_lora_per_token`."""
    if plan is None or setup.autocast != "none" or spec.model_type not in GATED_FAMILIES or spec.num_experts:
        return {}
    held, transient, mlp, grad = (t * x for x in _mlp_lora_per_token(spec, setup, plan, input_grad=input_grad))
    if not transient:
        return {}
    # int8 keeps the MLP input and down_proj's input in ctx (`_int8_kept_parts`): `held` counts them.
    int8_attention, int8_mlp = _int8_kept_parts(spec, setup, t, input_grad=input_grad, inter=spec.intermediate_size, plan=plan)
    if not setup.grad_checkpointing:
        # The model's forward holds the embedding output (`inputs_embeds`) and the running layer's input
        # (its loop variable) until the layer returns: one tensor when the top layer is layer 0.
        inputs = residual_bytes(setup) * t * spec.hidden_size * (2 if spec.num_layers > 1 else 1)
        return {"mlp_forward_layer": top - mlp - int8_mlp + held + inputs, "mlp_forward_transient": transient}
    # The rebuilt layer's int8 matmuls keep their inputs before the MLP too (`recompute` leaves them out, and
    # `held` counts the MLP's). Ledger: tiny phi3 int8 LoRA qkv,gate_up gc, -2.9% before.
    return {"mlp_recompute_layer": recompute - mlp + held + int8_attention, "mlp_recompute_transient": transient + grad}


def _mlp_lora_per_token(spec: ModelSpec, setup: Setup, plan: LoraPlan, *, input_grad: bool) -> tuple[int, int, int, int]:
    """Per token: (held, transient) of `mlp_forward_moment`, what the finished MLP saves, and the gradient
    a checkpointed backward holds when it rebuilds the layer. Memoized (the sweep's hot path)."""
    key = (id(plan), id(spec), input_grad, setup.method, setup.quant, setup.grad_checkpointing, setup.lora_dropout > 0,
           setup.device, compute_bytes(setup), residual_bytes(setup), adapter_bytes(setup), lora_under_autocast(setup))
    hit = _MLP_PER_TOKEN.get(key)
    if hit is not None and hit[0] is plan and hit[1] is spec:
        return hit[2]
    g = _grad_flow(spec, setup, plan, input_grad=input_grad)
    flags = g.lora_inputs
    held, transient = mlp_forward_moment(spec, setup, plan, 1, gate=g.gate, up=g.up, input_grad=flags, rebuilt=setup.grad_checkpointing)
    mlp = mlp_saved(spec, setup, plan, 1, gate=g.gate, up=g.up, input_grad=flags)
    e = compute_bytes(setup)
    if any(m.name == "down_proj" for m in module_bytes(spec, plan, setup)):
        grad = adapter_bytes(setup) * spec.hidden_size  # lora_B's output gradient, scaled
        if not is_quantized(setup.quant) and adapter_bytes(setup) != e:
            # `lora/layer.py::Linear.forward` adds the adapter-dtype branch to the base result (promoted),
            # so the add's backward casts the gradient back for the base result too (ledger: tiny qwen2
            # bf16 LoRA all-linear gc, two compute-dtype gradients; bnb's branches cast before the add).
            grad += e * spec.hidden_size
    elif is_quantized(setup.quant) and (g.gate or g.up):
        # bitsandbytes' MatMul4Bit/MatMul8bitLt keep their weight in ctx, not `save_for_backward`: the frozen
        # down_proj's backward runs before any unpack, and its input gradient (the compute dtype) is held
        # while the SwiGLU multiply's unpack rebuilds the layer (ledger: tiny phi3 nf4 LoRA qkv,gate_up gc).
        grad = e * spec.intermediate_size
    else:
        grad = 0  # a frozen nn.Linear saves its weight: unpacking it rebuilds the layer first
    if len(_MLP_PER_TOKEN) >= 4096:
        _MLP_PER_TOKEN.clear()
    _MLP_PER_TOKEN[key] = (plan, spec, (held, transient, mlp, grad))
    return held, transient, mlp, grad


# Keyed by the plan's and spec's identities and the setup fields read; an entry keeps both alive.
_MLP_PER_TOKEN: dict[tuple, tuple[LoraPlan, ModelSpec, tuple[int, int, int, int]]] = {}


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
    input, and the LoRA branches of o_proj and the MLP. Ledger: tiny gemma2 full bf16 eager
    s102 b3 (one layer, 44-token vocabulary) -14.7% at backward_loss before, +4.4% now (its q,
    counted here, was released too); tiny qwen2 LoRA bf16 eager s700 b1 -2.1% before, +0.3% now.
    Without autocast; GPT-2 and BERT: `activations_classic.classic_attention_backward`."""
    if setup.autocast != "none":
        return {}
    if spec.model_type not in GATED_FAMILIES:
        return classic_attention_backward(spec, setup, plan, e=compute_bytes(setup))
    if setup.attention != "eager":
        return {}
    only = _grad_flow(spec, setup, plan, input_grad=_first_layer_input_grad(spec, setup))
    if spec.num_layers == 1 and not (only.q or only.k):
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
    if plan is not None:
        # The LoRA branches whose backward has run (o_proj's, the MLP's): what they saved of their own
        # (A's output, a cast or dropped input, the dropout mask), not an uncast module input, which the
        # layer may hold for more than the branch. Ledger: random gemma2 fp32 LoRA all-linear dropout 0.05,
        # eager s185 b4 gc (one layer): the four fp32 score-sized tensors and none of those branches' own
        # tensors at the peak.
        flags = only.lora_inputs
        freed += t * sum(kept_bytes(m, flags) - m.input_part for m in module_bytes(spec, plan, setup) if m.name not in ATTENTION_INPUTS)
    return {"attention_backward": 2 * FP32 * probs, "attention_freed": freed}
