"""Activation memory of one training step, from what the modeling code saves.

Sources (transformers 5.x, torch 2.x autograd):
- `LlamaRMSNorm.forward` upcasts its input to fp32 (`hidden_states.to(torch.float32)`),
  which `pow` saves, plus a per-token fp32 `rsqrt`; the bf16 output is saved by the
  next op only when that op needs it for a weight gradient.
- `nn.Linear` saves its input only when its weight needs a gradient: a frozen base
  linear saves nothing (autograd's `addmm` saves `mat1` only if `mat2` requires grad).
- PEFT `lora.Linear.forward` casts the input to the adapter dtype (fp32) and runs it
  through dropout (a copy plus a bool mask when p > 0); `lora_A` saves that input and
  `lora_B` saves lora_A's (T x r) output.
- `apply_rotary_pos_emb` builds new q and k; SDPA/flash save q, k, v, the output and a
  fp32 logsumexp per head; `eager_attention_forward` also keeps fp32 softmax scores and
  their compute-dtype copy (b x heads x s x s each). Without native GQA in SDPA,
  `repeat_kv` expands k and v to every head (`integrations/sdpa_attention.py`).
- SwiGLU MLP (`act_fn(gate_proj(x)) * up_proj(x)`) saves the gate output, the activation
  output and the up output; GELU MLPs save the pre-activation and the activation.
- `loss/loss_utils.py::ForCausalLMLoss` upcasts the logits to fp32 and `cross_entropy`
  saves the fp32 `log_softmax`; its backward materialises fp32 gradients of the same size.
- Gradient checkpointing (`GradientCheckpointingLayer`) keeps each layer's input and
  recomputes one layer at a time during backward.
Ignores: attention/hidden dropout (off in every supported config), allocator rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.lora import LoraPlan
from memplan.setup import Setup
from memplan.spec import ModelSpec
from memplan.storage import FLOAT_BYTES

__all__ = ["ActivationBytes", "activation_bytes"]

FP32 = 4


@dataclass(frozen=True)
class ActivationBytes:
    """Saved-for-backward bytes and the transient peaks around them."""

    per_layer: int  # saved by one transformer layer (no checkpointing)
    layers: int  # saved by all layers as configured (checkpointing included)
    recompute: int  # one layer's activations rebuilt during a checkpointed backward
    embeddings_and_head: int  # embedding output, final norm, lm_head input
    logits_saved: int  # compute-dtype logits + fp32 log_softmax kept for backward
    logits_backward_peak: int  # logits memory at the height of the loss backward

    @property
    def saved(self) -> int:
        return self.layers + self.embeddings_and_head + self.logits_saved


def _lora_input_bytes(spec: ModelSpec, plan: LoraPlan | None, setup: Setup, tokens: int) -> int:
    """Per-layer bytes the LoRA branches save: fp32 input copy (+ dropout copy/mask), A's output."""
    if plan is None:
        return 0
    total = 0
    for lin in plan.targets:
        if lin.component in ("lm_head", "head"):
            continue
        per = FP32 * tokens * lin.in_features + FP32 * tokens * plan.rank
        if setup.lora_dropout > 0:
            per += FP32 * tokens * lin.in_features + tokens * lin.in_features  # dropout output + bool mask
        total += per * lin.count // max(spec.num_layers, 1)
    return total


def _layer_bytes(spec: ModelSpec, setup: Setup, plan: LoraPlan | None) -> int:
    e = FLOAT_BYTES[setup.compute_dtype if setup.quant in ("int8", "nf4", "fp4") else setup.quant]
    b, s = setup.batch_size, setup.seq_len
    t = b * s
    h, a = spec.hidden_size, spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    full = setup.method == "full"
    norms = 2 if spec.model_type != "gemma2" else 4
    # RMSNorm / LayerNorm: fp32 input copy + per-token statistics (+ bf16 output kept for weight grads).
    norm_bytes = norms * (FP32 * t * h + FP32 * t + (e * t * h if full else 0))
    # q, k, v after rotary, attention output, fp32 logsumexp per head.
    expand = spec.num_heads != spec.num_kv_heads and setup.attention != "flash"
    kv_saved = 2 * (a if expand else kv)
    attn = e * t * (a + kv_saved + a) + FP32 * b * spec.num_heads * s
    if setup.attention == "eager":
        attn += (FP32 + e) * b * spec.num_heads * s * s
    if full:
        attn += e * t * (h + a)  # inputs of qkv and o_proj, saved for weight gradients
    inter = spec.intermediate_size
    if spec.num_experts:
        inter = spec.intermediate_size * spec.experts_per_token
    gated = spec.model_type not in ("gpt2", "bert")
    mlp = e * t * inter * (3 if gated else 2)
    if full:
        mlp += e * t * (h + inter)
    return norm_bytes + attn + mlp + _lora_input_bytes(spec, plan, setup, t)


def activation_bytes(spec: ModelSpec, setup: Setup, plan: LoraPlan | None) -> ActivationBytes:
    e = FLOAT_BYTES[setup.param_dtype]
    t = setup.batch_size * setup.seq_len
    per_layer = _layer_bytes(spec, setup, plan)
    layer_input = e * t * spec.hidden_size
    if setup.grad_checkpointing:
        layers = spec.num_layers * layer_input
        recompute = per_layer
    else:
        layers = spec.num_layers * per_layer
        recompute = 0
    # Embedding output + final norm's fp32 copy + the lm_head input.
    head = e * t * spec.hidden_size + FP32 * t * spec.hidden_size + e * t * spec.hidden_size
    logits = t * spec.vocab_size
    logits_saved = (e + FP32) * logits
    # log_softmax backward: grad_output and grad_input in fp32 while the saved output is alive.
    logits_bwd = (e + 3 * FP32) * logits
    return ActivationBytes(
        per_layer=per_layer,
        layers=layers,
        recompute=recompute,
        embeddings_and_head=head,
        logits_saved=logits_saved,
        logits_backward_peak=logits_bwd,
    )
