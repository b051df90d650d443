"""Activation memory under mixed precision: fp32 master weights, bf16/fp16 autocast.

What a training step keeps when an fp32 model runs its forward inside
`torch.autocast` (as transformers' Trainer does with `bf16=True`/`fp16=True`:
accelerate wraps `model.forward` in autocast and converts the outputs to fp32,
`accelerate/accelerator.py::prepare_model`). Checked tensor by tensor against the
CPU ledger (saved-tensor hooks over a real step, torch 2.13, transformers 5.23,
peft 0.21) on llama, mistral (GQA), qwen2 (biases) and phi3 (fused projections):

- The residual stream stays fp32 (embeddings and norms are not autocast ops), so
  `LlamaRMSNorm`'s `.to(torch.float32)` is a no-op: `pow` saves the residual tensor
  itself (4 bytes/element) and the per-token fp32 `rsqrt`; a trainable norm weight
  also keeps the fp32 normalised tensor.
- Every matmul casts its inputs to the low-precision dtype
  (`aten/src/ATen/autocast_mode.cpp::cached_cast`). A weight that is a leaf needing
  grad is cast once and cached until autocast exits; a frozen weight is cast per call.
  Either way `mm` saves the low-precision *weight copy* whenever its input needs a
  gradient, so a frozen fp32 base under LoRA keeps a half-size copy of every linear
  whose input needs grad until that linear's backward: the largest autocast term.
- A trainable linear also saves its own cast of the input (q, k and v each cast the
  same norm output separately; a fused projection casts once).
- Rotary runs in fp32 (`apply_rotary_pos_emb` multiplies the low-precision q/k by fp32
  cos/sin); SDPA casts q and k back down and saves q, k, v, its output and the fp32
  logsumexp. Eager attention's softmax is already fp32 (`.to(query.dtype)` is a no-op),
  and the second matmul saves its low-precision cast.
- PEFT: the input is fp32 already (no `_cast_input_dtype` copy); `lora_A` saves its
  low-precision cast of the input and `lora_B` A's output and B's cached weight copy;
  A's copy is saved only where the module's input needs a gradient.
- Logits: `lm_head` returns low-precision logits; the loss upcasts them (as without
  autocast), and accelerate's `convert_outputs_to_fp32` makes one more fp32 copy after the
  upcast is freed, so the forward's logits peak is the same.
Ignores: GradScaler's scale and found-inf scalars (fp16), allocator rounding.
Mixtral, Gemma-2, GPT-2 and BERT under autocast were not checked on the ledger, and the
estimator refuses them (`memplan.training.estimate`).
"""

from __future__ import annotations

from memplan.model.lora import LoraPlan
from memplan.training.setup import Setup
from memplan.model.spec import Linear, ModelSpec
from memplan.model.storage import FLOAT_BYTES

__all__ = ["AUTOCAST_FAMILIES", "low_bytes", "autocast_layer_bytes", "autocast_head_bytes", "layer_weight_copies"]

FP32 = 4
INT64 = 8
AUTOCAST_FAMILIES = ("llama", "mistral", "qwen2", "phi3")
_QKV = ("q_proj", "k_proj", "v_proj", "qkv_proj")
_GATE_UP = ("gate_proj", "up_proj", "gate_up_proj")


def low_bytes(setup: Setup) -> int:
    """Element size of autocast's low-precision dtype."""
    return FLOAT_BYTES[setup.autocast]


def _grad_flow(names: set[str], *, input_grad: bool) -> dict[str, bool]:
    """Whether each linear's input needs a gradient inside one decoder layer. Frozen linears
    pass gradients only from their input; an adapted one also starts them (its B output)."""
    qkv = input_grad
    attn_out = qkv or bool(names & set(_QKV))
    mlp_in = attn_out or "o_proj" in names
    down_in = mlp_in or bool(names & set(_GATE_UP))
    return {"q_proj": qkv, "k_proj": qkv, "v_proj": qkv, "qkv_proj": qkv, "o_proj": attn_out,
            "gate_proj": mlp_in, "up_proj": mlp_in, "gate_up_proj": mlp_in, "down_proj": down_in}


def _layer_linears(spec: ModelSpec) -> list[Linear]:
    return [lin for lin in spec.linears if lin.count == spec.num_layers]


def layer_weight_copies(spec: ModelSpec, setup: Setup) -> int:
    """Low-precision copies of one layer's trainable weights, held by autocast's cache until the
    forward ends (full fine-tuning; LoRA's adapter copies are counted in the layer)."""
    if setup.method != "full" or setup.autocast == "none":
        return 0
    return low_bytes(setup) * sum(lin.weight_numel for lin in _layer_linears(spec))


def autocast_layer_bytes(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, *, input_grad: bool, lora_bytes: int) -> int:
    """Bytes one decoder layer saves for backward under autocast (dense gated families).
    `lora_bytes` is the dropout-mask part computed with the pure-precision rules."""
    lo = low_bytes(setup)
    b, s = setup.batch_size, setup.seq_len
    t = b * s
    h, a = spec.hidden_size, spec.num_heads * spec.head_dim
    kv = spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    full = setup.method == "full"
    layer_lins = _layer_linears(spec)
    targets = {lin.name for lin in plan.targets if lin.count == spec.num_layers} if plan is not None else set()
    flow = _grad_flow({lin.name for lin in layer_lins} if full else targets, input_grad=input_grad)
    total = lora_bytes

    # Norms: the fp32 residual itself and rsqrt; a trainable weight also keeps the normalised tensor.
    per_norm = FP32 * t * h + FP32 * t + (FP32 * t * h if full else 0)
    total += per_norm * (2 - (0 if input_grad else 1))

    # Weight copies, and (trainable linears only) the cast input.
    for lin in layer_lins:
        if full or flow.get(lin.name, True):
            total += lo * lin.weight_numel
        if full and lin.name not in ("o_proj", "down_proj"):
            total += lo * t * lin.in_features  # o_proj/down_proj inputs are already low precision
    if full:
        total += lo * t * inter  # down_proj's input (the SwiGLU product)
    # LoRA branches: A's cast input, A's output, both adapter weights' cached copies.
    if plan is not None:
        for lin in plan.targets:
            if lin.count != spec.num_layers:
                continue
            total += lo * t * lin.in_features + lo * t * plan.rank + lo * plan.rank * lin.out_features  # B's copy
            if flow.get(lin.name, True):
                total += lo * plan.rank * lin.in_features  # A's copy: saved for its input's gradient

    # Attention.
    if setup.attention == "eager":
        k_grad = input_grad or bool(targets & {"k_proj", "qkv_proj"}) or full
        total += (3 if k_grad else 2) * lo * t * a + (FP32 + lo) * b * spec.num_heads * s * s
        total += lo * t * a if full else 0  # o_proj input (a fresh contiguous copy)
    else:
        total += lo * t * (2 * a + 2 * kv) + FP32 * b * spec.num_heads * s
        if spec.fused_qkv:
            # Phi-3: SDPA saves v as a strided view of the fused qkv output, keeping all of it alive
            # (measured on the CPU ledger).
            total += lo * t * (a + kv)
        if spec.rope_concatenates and full:
            # A head-major SDPA output: o_proj saves its fresh contiguous copy (llama-style layers
            # share SDPA's output storage).
            total += lo * t * a
    # SwiGLU: gate output, activation output, up output.
    total += 3 * lo * t * inter
    return total


def autocast_head_bytes(spec: ModelSpec, setup: Setup) -> tuple[int, int]:
    """(head bytes, rotary bytes): rotary tables (fp32), the final norm, lm_head's weight copy
    and (full) its cast input, the token ids, the shifted labels and the 0-d loss."""
    lo = low_bytes(setup)
    t = setup.batch_size * setup.seq_len
    h = spec.hidden_size
    rotary = 2 * FP32 * setup.seq_len * spec.head_dim
    head = INT64 * t + FP32 + rotary + FP32 * t * h + FP32 * t
    out = [lin for lin in spec.linears if lin.is_output]
    head += lo * sum(lin.weight_numel for lin in out)  # saved: lm_head's input needs grad in both methods
    if setup.method == "full":
        head += FP32 * t * h + lo * t * h + INT64 * t  # normalised tensor, lm_head's cast input, ids
    return head, rotary
