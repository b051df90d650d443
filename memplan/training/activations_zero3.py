"""What DeepSpeed ZeRO-3 adds to a layer's saved tensors under LoRA: its linear replaces F.linear
process-wide and saves a frozen linear's input (`zero3_linear_inputs`, `zero3_head_input`)."""

from __future__ import annotations

from memplan.model.lora import LoraPlan
from memplan.model.spec import ModelSpec
from memplan.model.storage import is_quantized
from memplan.training.activations_lora import GATED_FAMILIES, compute_bytes, uncast_input
from memplan.training.modules_to_save import saved_copies
from memplan.training.recipes import fused_lm_head
from memplan.training.setup import Setup
from memplan.training.zero_gather import INPUT_GROUP

__all__ = ["zero3_head_input", "zero3_linear_inputs"]

def zero3_linear_inputs(spec: ModelSpec, setup: Setup, plan: LoraPlan | None, t: int, *, input_grad: bool) -> int:
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
        if group in adapted and uncast_input(setup):
            continue  # lora_A saves this very tensor
        total += size
    return total


def zero3_head_input(spec: ModelSpec, setup: Setup, plan: LoraPlan | None) -> int:
    """ZeRO-3's linear saves a frozen lm_head's input (the final norm's output) under LoRA
    (`zero3_linear_inputs`); bitsandbytes leaves lm_head unquantized, so QLoRA saves it too."""
    if setup.parallel != "zero3" or plan is None or spec.model_type not in GATED_FAMILIES or setup.autocast != "none":
        return 0
    if fused_lm_head(setup) or saved_copies(spec, setup).head_numel:
        return 0
    if any(lin.is_output for lin in plan.targets) and uncast_input(setup):
        return 0
    return compute_bytes(setup) * setup.batch_size * setup.seq_len * spec.hidden_size
