"""What PEFT's LoRA branches save and hold in one decoder layer (peft 0.21, `tuners/lora/layer.py`,
`tuners/lora/bnb.py`).

Saved for backward, per adapted module and token (`module_bytes`):
- `lora_B` saves A's output (tokens x r, adapter dtype);
- `lora_A` saves its input: the dropout's output (a new tensor per module) when dropout > 0, else
  `_cast_input_dtype`'s copy in the adapter dtype, or, when the input already has that dtype
  (`uncast_input`), the module input itself, which q/k/v (and gate/up) share;
- dropout p > 0 keeps its mask where the module input needs a gradient (`native_dropout` saves it
  only then): bool on CUDA, the input dtype on the CPU.

Held inside one adapted MLP projection's LoRA forward (`mlp_forward_moment`): the base result
(4-bit layers also clone it), `lora_B`'s output and its product with `scaling`, then the sum with the
result; the layer's MLP input and residual stay alive beside them. Without autocast.

LoRA on Mixtral's expert and router parameters (`expert_lora_bytes`): PEFT's merged copies and what the
grouped matmuls save for them. Also here, as the lowest of the activation modules: the element sizes
they all share (`compute_bytes`, `residual_bytes`) and `GATED_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from memplan.model.lora import LoraPlan
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES
from memplan.training.activations_autocast import low_bytes
from memplan.training.recipes import adapter_bytes, lora_under_autocast
from memplan.training.setup import Setup

__all__ = ["ATTENTION_INPUTS", "FP32", "GATED_FAMILIES", "LoraModule", "compute_bytes", "expert_lora_bytes", "layer_lora_bytes",
           "kept_bytes", "mask_bytes", "mlp_forward_moment", "mlp_saved", "module_bytes", "residual_bytes", "swiglu_saved", "uncast_input"]

FP32 = 4
# Llama-style decoders: RMSNorm, rotary attention, a gated (SwiGLU) MLP or Mixtral's experts.
GATED_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3")
# Modules that read the layer's (or block's) input: their input needs a gradient exactly when it does.
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value")
# Modules that read one shared input: PEFT's uncast lora_A saves that tensor once per group.
_SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


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


def mask_bytes(setup: Setup, e: int) -> int:
    # torch native_dropout keeps a bool mask on CUDA; on the CPU the mask has the input dtype.
    return 1 if setup.device == "cuda" else e


def uncast_input(setup: Setup) -> bool:
    """Is the adapted modules' input fp32 already, so that PEFT's `_cast_input_dtype` returns it
    uncopied (`x.dtype == dtype`): under prepare_model_for_kbit_training, or on an fp32 base
    without autocast; or bf16 adapters (SFTTrainer on a quantized base, memplan.training.recipes)
    over a bf16 stream."""
    return setup.autocast == "none" and compute_bytes(setup) == adapter_bytes(setup)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a decoder layer: what its LoRA branch saves per token."""

    name: str
    in_features: int
    out_features: int
    saved: int  # A's output and lora_A's input (0 for the input where a shared uncast input is counted already)
    mask: int  # the dropout mask, kept only where the module input needs a gradient
    input_part: int  # bytes per token of `saved` that are the module input itself (uncast, no dropout), else 0

    @property
    def input_saved(self) -> bool:
        """`saved` includes the module input itself."""
        return self.input_part > 0


def module_bytes(spec: ModelSpec, plan: LoraPlan, setup: Setup) -> tuple[LoraModule, ...]:
    """Per-token bytes each layer target's LoRA branch saves (module docstring), memoized: the loop
    over targets is the sweep's hot spot."""
    key = (id(plan), spec.num_layers, uncast_input(setup), setup.lora_dropout > 0, mask_bytes(setup, FP32),
           adapter_bytes(setup), lora_under_autocast(setup))
    hit = _MODULES.get(key)
    if hit is None or hit[0] is not plan:
        if len(_MODULES) >= 4096:
            _MODULES.clear()
        hit = (plan, _module_bytes(spec, plan, setup))
        _MODULES[key] = hit
    return hit[1]


# Keyed by the plan's identity and the setup fields `_module_bytes` reads; the entry keeps the plan
# alive so its id stays its own.
_MODULES: dict[tuple, tuple[LoraPlan, tuple[LoraModule, ...]]] = {}


def _module_bytes(spec: ModelSpec, plan: LoraPlan, setup: Setup) -> tuple[LoraModule, ...]:
    ab = adapter_bytes(setup)  # fp32 (PEFT's autocast_adapter_dtype), bf16 under SFTTrainer's QLoRA cast
    if lora_under_autocast(setup):
        ab = FLOAT_BYTES["bf16"]  # autocast's bf16 casts are what lora_A / lora_B save (recipes.lora_under_autocast)
    dropout = setup.lora_dropout > 0
    shared_inputs: set[str] = set()
    out = []
    for lin in plan.targets:
        if lin.count != spec.num_layers:  # lm_head / MLM head: counted in the head
            continue
        saved, input_part = ab * plan.rank, 0
        if dropout or not uncast_input(setup):
            # Ledger: tiny qwen2 fp4 kbit-prep q,v dropout 0.1: v_proj's dropout output was missing.
            saved += ab * lin.in_features
        else:
            # SDPA already keeps o_proj's input (its output); q/k/v and gate/up share theirs.
            group = _SHARED_INPUT.get(lin.name, lin.name)
            if group not in shared_inputs and lin.name != "o_proj":
                shared_inputs.add(group)
                input_part = ab * lin.in_features
                saved += input_part
        mask = mask_bytes(setup, FP32) * lin.in_features if dropout else 0
        out.append(LoraModule(lin.name, lin.in_features, lin.out_features, saved, mask, input_part))
    return tuple(out)


def layer_lora_bytes(spec: ModelSpec, plan: LoraPlan | None, setup: Setup, t: int, *, input_grad: Mapping[str, bool],
                     masks_only: bool = False) -> int:
    """Bytes one layer's LoRA branches save for `t` tokens; `input_grad[name]` says whether that
    module's input needs a gradient (missing: yes), which decides whether its dropout mask is kept."""
    if plan is None:
        return 0
    mods = module_bytes(spec, plan, setup)
    if setup.lora_dropout <= 0:  # no masks (the sweep's common case)
        return 0 if masks_only else t * sum(m.saved for m in mods)
    return t * sum(kept_bytes(m, input_grad) - (m.saved if masks_only else 0) for m in mods)


def kept_bytes(m: LoraModule, input_grad: Mapping[str, bool]) -> int:
    """Per-token bytes module `m`'s branch saves, its dropout mask where its input needs a gradient."""
    return m.saved + (m.mask if input_grad.get(m.name, True) else 0)


def _branch_transient(setup: Setup, e: int, out_features: int, t: int) -> int:
    """Held at an adapted module's `result + lora_B(lora_A(x)) * scaling`: the base result (compute
    dtype), lora_B's output and its scaled copy (adapter dtype); the sum is promoted to the wider of the
    two while the scaled copy is alive (`lora/layer.py::Linear.forward`). bnb's 4-bit and 8-bit
    branches (`lora/bnb.py`) cast the scaled output back first: never more than this."""
    ab = adapter_bytes(setup)
    return (e + ab + max(e, ab)) * t * out_features


def mlp_forward_moment(spec: ModelSpec, setup: Setup, plan: LoraPlan, t: int, *, gate: bool, up: bool,
                       input_grad: Mapping[str, bool], rebuilt: bool) -> tuple[int, int]:
    """(held, transient) at the worst adapted projection's LoRA forward in a running SwiGLU MLP
    (`LlamaMLP.forward`: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`; Phi-3 chunks one
    `gate_up_proj` output). `held` is what the MLP keeps beyond the layer's tensors before it: the
    saved LoRA tensors of its modules so far, the saved SwiGLU tensors, the live MLP input and the
    residual beside it, the product entering down_proj. `gate`/`up`: do those outputs need a gradient
    (`activations._GradFlow`). Ledger: tiny phi3 nf4 LoRA all-linear s153 b2 gc, the rebuilt layer's
    gate_up_proj branch (base result clone, fp32 lora_B output and its scaled copy): -19.4% before.

    `rebuilt`: the layer is rebuilt by non-reentrant checkpointing, which stops once the last tensor
    the layer saved is packed again (`torch/utils/checkpoint.py`, early stop). An adapted down_proj's
    lora_B packs A's output before its matmul runs, so that branch ends with the base result beside
    lora_A's saved input (ledger: tiny llama nf4 LoRA down_proj gc, the fp32 input copy the peak)."""
    e, r = compute_bytes(setup), residual_bytes(setup)
    h, inter = spec.hidden_size, spec.intermediate_size
    mods = {m.name: m for m in module_bytes(spec, plan, setup)}
    lora = {n: kept_bytes(m, input_grad) * t for n, m in mods.items()}
    # The MLP input (the post-attention norm's output) is lora_A's saved input when it is uncast.
    x = 0 if any(mods[n].input_saved for n in ("gate_proj", "up_proj", "gate_up_proj") if n in mods) else e * t * h
    # The residual: saved by the post-attention norm itself when the stream is fp32 (`.to(float32)` is a no-op).
    res = 0 if r == FP32 else r * t * h
    swiglu = swiglu_saved(setup, t, inter, gate=gate, up=up)
    product = 0 if "down_proj" in mods and mods["down_proj"].input_saved else e * t * inter
    moments = {
        "gate_proj": (lora.get("gate_proj", 0), inter),
        "gate_up_proj": (lora.get("gate_up_proj", 0), 2 * inter),
        # act_fn's output, and the gate output where SiLU saves it.
        "up_proj": (lora.get("gate_proj", 0) + lora.get("up_proj", 0) + e * t * inter * (1 + gate), inter),
        "down_proj": (sum(lora.get(n, 0) for n in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")) + swiglu + product, h),
    }
    # With dropout, PEFT rebinds `x` to the cast copy (`_cast_input_dtype`), which lives until the module returns.
    cast = setup.lora_dropout > 0 and not uncast_input(setup)
    best = (0, 0)
    for name, (kept, out_features) in moments.items():
        if name not in mods:
            continue
        copy = adapter_bytes(setup) * t * mods[name].in_features if cast else 0
        if rebuilt and name == "down_proj":
            branch = e * t * out_features  # the base result (4-bit: its clone) only
        else:
            branch = _branch_transient(setup, e, out_features, t)
        best = max(best, (x + res + kept, branch + copy), key=sum)
    return best


def expert_lora_bytes(spec: ModelSpec, setup: Setup, plan: LoraPlan, t: int, *, mlp_in: bool) -> int:
    """What LoRA on Mixtral's expert (and router) parameters adds to a layer's saved tensors.

    PEFT 0.21 wraps a targeted parameter (`lora/layer.py::ParamWrapper`, `_LoraFactorsProxy`): every
    forward folds `W + scaling * lhs @ rhs` into one `torch.baddbmm`, a merged copy of the whole
    parameter (all experts) in W's dtype, from copies of the factors cast to that dtype
    (`get_delta_factors`). The merged weight then needs a gradient, so transformers'
    `integrations/moe.py::grouped_mm_experts_forward` grouped matmuls save their input for it (the
    gathered tokens for gate_up_proj, the gated product for down_proj), the merged weight where that
    input needs a gradient (down_proj's always does once gate_up_proj is adapted), and baddbmm the cast
    factors. Ledger: tiny mixtral bf16 LoRA w1,w3,w2 s128 b1 (E=2), both layers' merged weights and
    cast factors by name (-15.7% before). Experts stay in the compute dtype: bitsandbytes quantizes
    nn.Linear only."""
    e, ab = compute_bytes(setup), adapter_bytes(setup)
    k, inter, h = spec.experts_per_token, spec.intermediate_size, spec.hidden_size
    names = {p.name for p in plan.param_targets}
    total = 0
    for p in plan.param_targets:
        merged = e * p.experts * p.in_features * p.out_features
        copies = e * plan.rank * p.rank_factor * p.experts * (p.in_features + p.out_features) if ab != e else 0
        if p.name == "experts.gate_up_proj":
            total += e * t * k * h + (merged if mlp_in else 0) + copies
        elif p.name == "experts.down_proj":
            total += e * t * k * inter + (merged if mlp_in or "experts.gate_up_proj" in names else 0) + copies
        else:  # the router (experts x hidden): its input, the post-attention norm's output
            total += e * t * h + (merged if mlp_in else 0) + copies
    return total


def mlp_saved(spec: ModelSpec, setup: Setup, plan: LoraPlan, t: int, *, gate: bool, up: bool, input_grad: Mapping[str, bool]) -> int:
    """What a finished SwiGLU MLP saves under LoRA: its modules' LoRA tensors and the SwiGLU outputs."""
    mlp = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
    lora = sum(kept_bytes(m, input_grad) * t for m in module_bytes(spec, plan, setup) if m.name in mlp)
    return lora + swiglu_saved(setup, t, spec.intermediate_size, gate=gate, up=up)


def swiglu_saved(setup: Setup, t: int, inter: int, *, gate: bool, up: bool) -> int:
    """SwiGLU `act(gate) * up`: the activation saves its input (the gate output) and the multiply saves
    `up` for the gate branch's gradient and `act(gate)` for up's (where each branch needs one). Phi-3's
    fused gate_up output is kept whole by the two views saved on it: the same bytes."""
    return compute_bytes(setup) * t * inter * (2 * gate + up)
