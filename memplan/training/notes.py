"""Notes that explain an estimate: the library behaviours that drive its number non-obviously.

`estimate_notes(est)` is computed on demand (`Estimate.notes`), never by the sweep, and
only reads the estimate and its spec. Each note names the behaviour and its size; a note
never replaces an error (the estimator refuses what it cannot model before any note exists).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.model.lora import plan_lora, rank_above_capacity
from memplan.model.storage import FLOAT_BYTES, is_quantized, weight_bytes
from memplan.training.recipes import FUSED_TOKEN_CHUNK, FUSED_VOCAB_CHUNK
from memplan.training.notes_sharding import sharding_notes
from memplan.units import format_bytes

if TYPE_CHECKING:
    from memplan.training.estimate import Estimate

__all__ = ["estimate_notes"]

FP32 = 4


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 // 10 else format_bytes(n)


def _fused_experts(est: "Estimate") -> str | None:
    # transformers 5 stores Mixtral's experts as 3-D parameters (`MixtralExperts.gate_up_proj`,
    # `.down_proj`), which bitsandbytes' `replace_with_bnb_linear` skips (it swaps nn.Linear only):
    # they stay in the load dtype (REFERENCE.md, checked with transformers 5.24 + bnb 0.50.2).
    spec, s = est.model, est.setup
    if not (is_quantized(s.quant) and spec.num_experts):
        return None
    experts = [t for t in spec.tensors if t.component == "experts"]
    if not experts:
        return None
    unquantized = sum(t.numel * t.count for t in experts) * FLOAT_BYTES["fp32" if s.prepare_kbit_training else s.param_dtype]
    total = est.weight_storage.by_component.get("experts", unquantized)
    dtype = "fp32" if s.prepare_kbit_training else s.param_dtype
    return (f"transformers 5 keeps {spec.name}'s fused experts in {dtype} under bitsandbytes: "
            f"{_gib(unquantized)} of {_gib(total)} of expert weights stay unquantized (not {s.quant})")


def _prepare_kbit(est: "Estimate") -> str | None:
    # peft/utils/other.py::prepare_model_for_kbit_training casts every fp16/bf16 parameter to fp32.
    s = est.setup
    if not s.prepare_kbit_training:
        return None
    before = weight_bytes(est.model, s.quant, double_quant=s.double_quant, compute_dtype=s.compute_dtype).unquantized
    upcast = est.weight_storage.unquantized  # the same parameters, now fp32
    if upcast <= before:
        return None
    gc = "turns on gradient checkpointing (its default)" if s.grad_checkpointing else "leaves checkpointing off (use_gradient_checkpointing=False)"
    what = "embeddings/norms/experts" if est.model.num_experts else "embeddings/norms"
    return (f"prepare_model_for_kbit_training upcasts {_gib(upcast)} of {what} to fp32 "
            f"(+{_gib(upcast - before)}), runs the residual stream in fp32, and {gc}")


def _rank(est: "Estimate") -> list[str]:
    s = est.setup
    if s.method != "lora":
        return []
    plan = plan_lora(est.model, s.lora_rank, s.lora_targets)
    return [f"rank {s.lora_rank} exceeds min(in, out) of {lin.name} ({lin.in_features}×{lin.out_features}): "
            f"PEFT trains it, but it adds no capacity" for lin in rank_above_capacity(plan)]


def _adapters(est: "Estimate") -> str | None:
    # peft/tuners/tuners_utils.py::_cast_adapter_dtype (autocast_adapter_dtype=True).
    s = est.setup
    if s.method != "lora" or s.param_dtype == "fp32" or est.adapter_dtype != "fp32":
        return None
    return (f"PEFT's autocast_adapter_dtype=True keeps the adapters in fp32 on a {s.quant} base: "
            f"16 bytes per trainable parameter with Adam ({_gib(est.memory.adapters)} of adapters)")


def _copies(est: "Estimate") -> str | None:
    # peft/utils/other.py::ModulesToSaveWrapper.update: a trainable deepcopy, not upcast (modules_to_save.py).
    from memplan.training.modules_to_save import saved_copies

    c = saved_copies(est.model, est.setup)
    if not c.numels:
        return None
    opt = c.optimizer(est.setup).total
    return (f"modules_to_save keeps a trainable {c.dtype} copy of {', '.join(c.names)} beside the frozen original "
            f"(PEFT's ModulesToSaveWrapper): {_gib(c.weight_bytes)} of copies, {_gib(c.gradient_bytes)} of gradients and "
            f"{_gib(opt)} of {est.setup.optimizer} state")


def _fused_adamw(est: "Estimate") -> str | None:
    if est.setup.optimizer != "adamw_fused":
        return None
    return ("adamw_fused (TrainingArguments' default adamw_torch_fused): the fused kernel updates in place, so the "
            "optimizer step adds no temporaries; its step counters live on the device (4 bytes per tensor)")


def _sft_autocast(est: "Estimate") -> str | None:
    from memplan.training.recipes import lora_under_autocast

    if not lora_under_autocast(est.setup):
        return None
    return ("SFTConfig's default bf16=True runs the forward under bf16 autocast: the fp32 LoRA branches save bf16 "
            "copies of their inputs and weights (modelled); on the bf16 base itself autocast changes nothing")


def _paged(est: "Estimate") -> str | None:
    m = est.memory
    if not m.optimizer_paged or est.setup.device != "cuda":
        return None
    return (f"{est.setup.optimizer} keeps {_gib(m.optimizer_paged)} of optimizer state in CUDA unified memory, "
            "outside torch's allocator (evictable; max_memory_allocated does not show it)")


def _eager(est: "Estimate") -> str | None:
    # modeling_*.py::eager_attention_forward: fp32 softmax and its compute-dtype copy, b x heads x s x s.
    s, spec = est.setup, est.model
    if s.attention != "eager":
        return None
    e = FP32 if s.prepare_kbit_training else FLOAT_BYTES[s.param_dtype if s.autocast == "none" else s.autocast]
    per_layer = (FP32 + e) * s.batch_size * spec.num_heads * s.seq_len * s.seq_len
    layers = 1 if s.grad_checkpointing else spec.num_layers
    return (f"eager attention keeps b×heads×s×s scores (fp32 softmax + a copy): {_gib(per_layer)} per layer, "
            f"{_gib(per_layer * layers)} alive at once{' (one rebuilt layer)' if s.grad_checkpointing else ''}")


def _recipe(est: "Estimate") -> list[str]:
    # memplan.training.recipes: trl/trainer/sft_trainer.py::SFTTrainer.__init__ / compute_loss,
    # transformers trainer.py::Trainer.__init__ (checkpointing), axolotl's documented load path.
    s, out = est.setup, []
    if s.recipe == "plain":
        return out
    if s.recipe == "trl-sft":
        if est.adapter_dtype == "bf16":
            out.append(f"SFTTrainer casts the trainable LoRA parameters to bf16 on a quantized base: adapters, gradients and "
                       f"Adam states take 2 bytes each ({_gib(est.memory.adapters)} of adapters)")
        out.append("SFTTrainer computes the loss, entropy and token accuracy through TRL's fused LM head: no b×s×vocab logits; "
                   f"[min(b·s, {FUSED_TOKEN_CHUNK}) × {FUSED_VOCAB_CHUNK}] compute-dtype tiles (trl/kernels/chunked_logprob.py), "
                   "recomputed in backward")
        if s.grad_checkpointing:
            out.append("SFTConfig turns gradient checkpointing on by default (use_reentrant=False), and SFTTrainer calls "
                       "enable_input_require_grads for PEFT models" if s.method == "lora" else
                       "SFTConfig turns gradient checkpointing on by default (use_reentrant=False)")
        if is_quantized(s.quant) and not s.prepare_kbit_training:
            out.append("SFTTrainer does not call prepare_model_for_kbit_training: norms and embeddings stay in the compute dtype")
    elif s.recipe == "trainer":
        out.append("transformers Trainer: the model's own loss (logits upcast to fp32), no prepare_model_for_kbit_training "
                   "unless your script calls it; gradient_checkpointing=True uses use_reentrant=False")
    elif s.recipe == "axolotl":
        out.append("axolotl (modelled from its config semantics, not run): quantized bases go through "
                   "prepare_model_for_kbit_training; otherwise Trainer's behaviour")
    return out


def _logits(est: "Estimate") -> str | None:
    m = est.memory
    if est.setup.recipe == "trl-sft":
        return None
    at_peak = est.peak_parts.get("logits", 0) + (est.peak_parts.get("transients", 0) if m.peak_phase in ("forward", "backward_loss") else 0)
    if at_peak * 2 < m.allocated_peak - m.weights - m.adapters - m.optimizer_states or m.peak_phase not in ("forward", "backward_loss"):
        return None
    return (f"the {est.model.vocab_size:,}-token vocabulary's logits dominate: {_gib(at_peak)} of logits and their fp32 "
            "loss buffers at the peak (the loss upcasts them; transformers loss_utils.py::ForCausalLMLoss)")


def _classic_on_cuda(est: "Estimate") -> str | None:
    """GPT-2/BERT activations are checked on the CPU ledger, where SDPA with dropout runs torch's math
    kernel; on CUDA the flash / memory-efficient kernels take the dropout themselves."""
    if est.model.model_type in ("gpt2", "bert") and est.setup.device == "cuda":
        return (f"{est.model.model_type} activations are checked on the CPU ledger (activations_classic.py); on CUDA, SDPA keeps "
                "the attention dropout inside its kernel (no batch x heads x s x s tensors) and dropout masks are bool: "
                "modelled from torch, not yet measured")
    return None


def estimate_notes(est: "Estimate") -> tuple[str, ...]:
    """Every note that applies to `est`, most memory-relevant first."""
    notes = [_fused_experts(est), _prepare_kbit(est), *_rank(est), _adapters(est), _copies(est), *_recipe(est), _sft_autocast(est),
             _fused_adamw(est), _paged(est), _eager(est), _logits(est), _classic_on_cuda(est), *sharding_notes(est)]
    return tuple(n for n in notes if n)
