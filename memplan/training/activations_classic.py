"""Activation memory of GPT-2 and BERT blocks (LayerNorm, GELU, dropout everywhere).

Read from transformers 5 (`models/gpt2/modeling_gpt2.py`, `models/bert/modeling_bert.py`) and
checked tensor by tensor on the CPU ledger (`memplan.measure.profiler.ledger`). What autograd keeps:
- `nn.LayerNorm` saves its input and the per-token mean and rstd (fp32 on CUDA; in the input
  dtype on the CPU, measured), when its input or its weight needs a gradient.
- `nn.Linear` / GPT-2's `Conv1D` (`addmm`) save their input only for a trainable weight.
- Dropout keeps its mask (bool on CUDA, the input dtype on the CPU) where its input needs a
  gradient. The probabilities default to 0.1 everywhere (`GPT2Config`: attn/resid/embd_pdrop;
  `BertConfig`: attention_probs/hidden_dropout_prob).
- Eager attention (`eager_attention_forward`, both files): `matmul(q, k^T)` saves q and k,
  `softmax` (in the compute dtype, no fp32 upcast) saves its output, dropout its mask, and
  `matmul(probs, v)` the dropped probabilities and v: with dropout, three batch x heads x s x s
  tensors. GPT-2's q, k and v are views of the one `c_attn` output; BERT's are three tensors.
- SDPA with dropout in training: CUDA's flash / memory-efficient kernels take the dropout
  themselves and save q, k, v, the output and a logsumexp. On the CPU the flash kernel has no
  dropout, so torch runs `_scaled_dot_product_attention_math`, in fp32 (bf16/fp16 inputs are
  upcast): q and k scaled by sqrt(scale) (two copies), v, `_safe_softmax`, its dropout mask and
  output (the same three s x s tensors, fp32).
- GELU: `gelu_new`/`gelu_fast` (`NewGELUActivation`'s tanh chain) keep four tensors of
  tokens x intermediate (x, 0.5x, tanh, 1 + tanh); the exact `gelu` keeps its input.
Ignores: the per-layer backward transients (modelled with the shared layer terms).
"""

from __future__ import annotations

from memplan.model.lora import LoraPlan
from memplan.model.spec import ModelSpec
from memplan.training.setup import Setup

__all__ = ["classic_layer_bytes", "classic_attention_backward", "classic_head_bytes", "dropouts"]

FP32 = 4
INT64 = 8


def dropouts(spec: ModelSpec) -> tuple[float, float, float]:
    """(attention, residual/hidden, embedding) dropout probabilities, with transformers' defaults
    (configuration_gpt2.py: 0.1 each; configuration_bert.py: 0.1 each) where the config leaves
    them out."""
    c = spec.config
    if spec.model_type == "gpt2":
        keys = ("attn_pdrop", "resid_pdrop", "embd_pdrop")
    else:
        keys = ("attention_probs_dropout_prob", "hidden_dropout_prob", "hidden_dropout_prob")
    return tuple(float(c[k]) if c.get(k) is not None else 0.1 for k in keys)  # type: ignore[return-value]


def _mask(setup: Setup, e: int) -> int:
    return 1 if setup.device == "cuda" else e


def _stats(setup: Setup, e: int) -> int:
    """Bytes of LayerNorm's mean and rstd per token."""
    return 2 * (FP32 if setup.device == "cuda" else e)


def _targets(spec: ModelSpec, plan: LoraPlan | None) -> set[str]:
    """Adapted per-layer modules, by role: q, k, v, attn_out, fc, mlp_out."""
    if plan is None:
        return set()
    roles = set()
    for lin in plan.targets:
        if lin.count != spec.num_layers:
            continue
        p = lin.path
        if lin.name == "c_attn":
            roles |= {"q", "k", "v"}
        elif lin.name in ("query", "key", "value"):
            roles.add(lin.name[0])
        elif p.endswith("attn.c_proj") or p.endswith("attention.output.dense"):
            roles.add("attn_out")
        elif lin.name == "c_fc" or p.endswith("intermediate.dense"):
            roles.add("fc")
        else:
            roles.add("mlp_out")
    return roles


def classic_layer_bytes(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, *, e: int, input_grad: bool, lora: int) -> int:
    """Bytes one GPT-2 or BERT block saves for backward, its LoRA branches (`lora`) included."""
    upto, after, _ = _block(spec, setup, plan, e=e, input_grad=input_grad)
    return lora + upto + after


def classic_attention_backward(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, *, e: int) -> dict[str, int]:
    """Inside the top (or rebuilt) block's attention backward, where the probabilities are s x s:
    the `probs @ v` matmul's backward allocates the probabilities' gradient while its saved
    dropped probabilities, the mask and the softmax output are still held; the dropout and softmax
    backwards then swap one s x s tensor for another, so one more is alive at most. Released by
    then: what the block saved after its attention (`_block`'s second part; its LoRA inputs are
    not subtracted, a small over-count). Ledger, tiny BERT LoRA bf16 eager gc s123 b2 (one layer):
    -10.9% at layer 0's backward before. No such moment under CUDA's SDPA kernels."""
    _, after, s2 = _block(spec, setup, plan, e=e, input_grad=True)
    return {"attention_backward": s2, "attention_freed": after} if s2 else {}


def _block(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, *, e: int, input_grad: bool) -> tuple[int, int, int]:
    """(bytes saved up to and in the attention, bytes saved after it, the s x s gradient's bytes in
    the attention backward: 0 where no s x s tensor exists)."""
    b, s = setup.batch_size, setup.seq_len
    t, h, inter = b * s, spec.hidden_size, spec.intermediate_size
    full = setup.method == "full"
    roles = _targets(spec, plan)
    p_attn, p_res, _ = dropouts(spec)
    m, st = _mask(setup, e), _stats(setup, e)
    probs = b * spec.num_heads * s * s
    gpt2 = spec.model_type == "gpt2"

    every = input_grad or full
    q_grad, k_grad, v_grad = (every or r in roles for r in ("q", "k", "v"))
    scores = q_grad or k_grad  # the attention scores need a gradient
    attn_grad = q_grad or k_grad or v_grad
    out_grad = attn_grad or "attn_out" in roles  # the attention block's output does
    mlp_grad = every or out_grad or "fc" in roles  # the MLP's activation does
    upto = after = s2 = 0
    # GPT-2 (pre-LN): ln_1 saves the block input; BERT (post-LN): q/k/v save it when trainable.
    if gpt2 and every:
        upto += e * t * h + st * t
    if full:
        upto += e * t * h  # the q/k/v input (GPT-2: ln_1's output; BERT: the block input)
    # `q @ k^T` saves q for k's gradient and k for q's; the softmax output, its dropout mask and v
    # are kept where the scores need a gradient; the (dropped) probabilities where v needs one.
    # GPT-2's q, k and v are views of the one c_attn output: any of them keeps it whole.
    def qkv(width: int) -> int:
        return 3 * width * t * h if gpt2 and scores else width * t * h * (int(k_grad) + int(q_grad) + int(scores))

    if setup.attention == "eager" and attn_grad:
        upto += qkv(e) + (e * probs if scores else 0)
        if p_attn > 0:
            upto += (m * probs if scores else 0) + (e * probs if v_grad else 0)
        elif v_grad and not scores:
            upto += e * probs  # the probabilities, for v's gradient
        s2 = e * probs if scores else 0
    elif setup.device != "cuda" and p_attn > 0 and attn_grad:
        # The math kernel computes in fp32 on the CPU (bf16/fp16 inputs are upcast): it saves
        # its scaled q and k, v (an fp32 copy, or the input itself when already fp32: a view
        # keeping GPT-2's c_attn output whole), the softmax, the mask and the dropped
        # probabilities, all fp32. Ledger, tiny BERT LoRA on key only (layer 0 keeps its scaled
        # q, the softmax, the mask and v, not the dropped probabilities): +8.7% before.
        upto += FP32 * t * h * (int(k_grad) + int(q_grad))
        if scores:
            v = (3 * e * t * h if gpt2 else e * t * h) if e == FP32 else FP32 * t * h
            upto += v + 2 * FP32 * probs
        upto += FP32 * probs if v_grad else 0
        s2 = FP32 * probs if scores else 0
    elif attn_grad:
        upto += 4 * e * t * h + FP32 * b * spec.num_heads * s  # q, k, v, output, logsumexp
    if setup.quant == "int8":
        # bnb `MatMul8bitLt.forward` keeps its input `A` on the context (`ctx.tensors`) wherever A
        # needs a gradient: the q/k/v input, the attention output, the fc input and the GELU output.
        # Ledger, tiny BERT int8 LoRA eager (one layer): -4.4% / -5.3% before.
        upto += e * t * h if every else 0
        after += (e * t * h if attn_grad else 0) + (e * t * h if out_grad else 0) + (e * t * inter if mlp_grad else 0)
    if full:
        after += e * t * h  # the attention output, the out-projection's input
    if p_res > 0 and out_grad:
        after += m * t * h  # the out-projection's dropout
    if out_grad or full:
        after += e * t * h + st * t  # GPT-2's ln_2 / BERT's attention LayerNorm input
    if full:
        after += e * t * h  # the fc input (a LayerNorm's output)
    if mlp_grad:
        after += (4 if spec.hidden_act in ("gelu_new", "gelu_fast") else 1) * e * t * inter
    if full:
        after += e * t * inter  # the GELU output, the mlp out-projection's input
    if p_res > 0 and (mlp_grad or "mlp_out" in roles):
        after += m * t * h  # the mlp out-projection's dropout
    if not gpt2 and (mlp_grad or "mlp_out" in roles):
        after += e * t * h + st * t  # BERT's output LayerNorm input
    return upto, after, s2


def classic_head_bytes(spec: ModelSpec, setup: Setup, *, e: int, lm_head_grad: bool) -> int:
    """Bytes saved outside the blocks: embeddings (with their dropout) and the output head."""
    t, h = setup.batch_size * setup.seq_len, spec.hidden_size
    full = setup.method == "full"
    _, _, p_emb = dropouts(spec)
    m, st = _mask(setup, e), _stats(setup, e)
    total = INT64 * t + FP32  # the labels, the 0-d loss
    if full:
        total += INT64 * t  # token ids, for the embedding's weight gradient
        if p_emb > 0:
            total += m * t * h
        if spec.model_type == "bert":
            total += e * t * h + st * t  # the embeddings' LayerNorm input
    # GPT-2: ln_f; BERT's MLM transform: dense, GELU (input), LayerNorm.
    total += e * t * h + st * t
    if spec.model_type == "bert":
        total += e * t * h + (e * t * h if full else 0)  # the GELU input; the dense input
        total += e * t * h if setup.quant == "int8" else 0  # an int8 transform dense keeps its input
    if lm_head_grad:
        total += e * t * h  # the last LayerNorm's output, for the output layer's weight gradient
    return total
