"""What the training recipe (who runs the step) changes in memory: `Setup.recipe`.

Read from the installed code (transformers 5.24, TRL 1.16.0, PEFT 0.21.2); checked on the
CPU ledger with real `Trainer` / `SFTTrainer` steps (memplan.measure.profiler.trainer).

- `plain`: memplan's own loop (`loss = model(input_ids, labels).loss`, backward, step).
- `trainer` (transformers `trainer.py::Trainer`): `compute_loss` is `model(**inputs)` with the
  model's own `ForCausalLMLoss` (same tensors as `plain`); `training_step` drops the inputs
  and outputs before the optimizer step. Checkpointing through
  `Trainer.__init__` -> `activation_checkpointing_enable` (use_reentrant=False by default,
  `modeling_utils.py::PreTrainedModel.activation_checkpointing_enable`); for a PEFT model
  that also calls `enable_input_require_grads` (peft_model.py::_prepare_model_for_gradient_checkpointing).
  Trainer calls no `prepare_model_for_kbit_training`: the user's script decides.
- `trl-sft` (trl/trainer/sft_trainer.py::SFTTrainer.__init__ / compute_loss):
  * no `prepare_model_for_kbit_training`;
  * `gradient_checkpointing=True` by default (trl/trainer/sft_config.py::SFTConfig) and
    `model.enable_input_require_grads()` for PEFT models under checkpointing;
  * on a quantized base (`is_loaded_in_4bit/8bit`) every trainable parameter is cast to bf16
    after `get_peft_model`: adapters, their gradients and Adam states are 2 bytes, not 4;
  * the loss runs through the fused LM head (trl/trainer/utils.py::add_fused_lm_head,
    trl/kernels/chunked_logprob.py::ChunkedLogProbFunction): no b x s x V logits; tiles of
    [min(N, 4096), 32768] in the compute dtype (`mm_buf`, allocated at the full 32768 columns
    even for a smaller vocabulary), per-token entropy and top-1 (token accuracy) computed in the
    same pass, and the backward recomputes each tile.
- `axolotl` (not run here; from its documented config semantics): `load_in_4bit/8bit` bases go
  through `prepare_model_for_kbit_training`; otherwise Trainer's behaviour.
"""

from __future__ import annotations

from memplan.model.storage import FLOAT_BYTES, is_quantized
from memplan.training.parallel import is_zero
from memplan.training.setup import Setup

__all__ = ["adapter_dtype", "fused_lm_head", "lora_under_autocast", "fused_head_bytes", "FusedHeadBytes", "input_require_grads",
           "FUSED_TOKEN_CHUNK", "FUSED_VOCAB_CHUNK"]

# trl/kernels/chunked_logprob.py::TOKEN_CHUNK_SIZE and trl/trainer/utils.py::_CHUNKED_LOGPROB_CHUNK_SIZE
FUSED_TOKEN_CHUNK = 4096
FUSED_VOCAB_CHUNK = 32768
FP32 = 4
INT64 = 8


def adapter_dtype(setup: Setup) -> str:
    """dtype of the trainable LoRA parameters: PEFT's `autocast_adapter_dtype=True` makes them fp32;
    SFTTrainer then casts them to bf16 when the base is quantized (`SFTTrainer.__init__`)."""
    if setup.recipe == "trl-sft" and is_quantized(setup.quant):
        return "bf16"
    if is_zero(setup.parallel) and setup.quant != "fp32":
        # DeepSpeed's bf16/fp16 engine (enabled in the compute dtype whenever the base is not fp32,
        # as Trainer's bf16/fp16 flags fill the config) casts every float parameter of the module,
        # PEFT's fp32 adapters included, to the engine dtype at initialize
        # (deepspeed/runtime/engine.py::_cast_module_mixed_precision): adapters, their gradients and
        # the LoRA-path activations are in the compute dtype.
        return setup.compute_dtype
    return "fp32"


def lora_under_autocast(setup: Setup) -> bool:
    """SFTTrainer's default mixed precision over fp32 LoRA adapters on a bf16 base.

    `SFTConfig.bf16` defaults to True (trl/trainer/base_config.py::_BaseConfig.__post_init__:
    `self.bf16 = not (self.fp16) if self.bf16 is None`), so accelerate runs the forward under `torch.autocast(bf16)`
    (accelerate/accelerator.py::Accelerator.prepare_model). Over a bf16 model that changes nothing
    (CPU ledger, tiny llama, bf16=True vs False: full bf16 and nf4 QLoRA byte-identical), except in
    the LoRA branches while their adapters are fp32 (PEFT's autocast_adapter_dtype, bf16 and fp16
    bases; TRL casts QLoRA adapters to bf16 itself): PEFT casts the input to fp32
    (`_cast_input_dtype`), then autocast casts it back to bf16 for `lora_A`, which saves that bf16
    copy instead of the fp32 one; A's output is bf16; both adapter weights are cast to bf16 (the
    autocast cache) and saved. Ledger, tiny llama bf16 all-linear r8 s128 b2, no checkpointing:
    activations -2,190,848 bytes (-5.7% of the peak) with bf16=True."""
    return setup.recipe == "trl-sft" and setup.method == "lora" and setup.autocast == "none" and setup.quant == "bf16"


def fused_lm_head(setup: Setup) -> bool:
    """SFTTrainer computes the loss (and entropy, token accuracy) through TRL's fused LM head."""
    return setup.recipe == "trl-sft"


def input_require_grads(setup: Setup) -> bool:
    """`enable_input_require_grads` under checkpointing with LoRA: SFTTrainer calls it itself;
    Trainer through PEFT's `_prepare_model_for_gradient_checkpointing` (non-quantized bases)."""
    return setup.method == "lora" and bool(setup.grad_checkpointing) and setup.recipe == "trl-sft"


class FusedHeadBytes:
    """Bytes of TRL's chunked log-prob loss for one step (N = b·(s-1) scored tokens)."""

    __slots__ = ("saved", "forward_extra", "backward_extra")

    def __init__(self, saved: int, forward_extra: int, backward_extra: int) -> None:
        self.saved, self.forward_extra, self.backward_extra = saved, forward_extra, backward_extra


def fused_head_bytes(setup: Setup, *, hidden: int, vocab: int, compute: int, head_trainable: int) -> FusedHeadBytes:
    """trl/kernels/chunked_logprob.py::ChunkedLogProbFunction, CPU (torch-op tiles) and CUDA (Triton).

    N = b·(s-1): `add_fused_lm_head._fused_forward` scores `last_hidden_state[:, :-1]` (every
    position off Triton; on Triton only labelled ones, all of them for plain SFT data).
    - saved for backward: the hidden states (`reshape` of the non-contiguous slice: a copy,
      N x H in the compute dtype), the clamped int64 targets, fp32 log_z and entropy; plus the
      per-token outputs the trainer keeps to the end of the step (log_probs, entropy, is_top1, mask).
    - forward: `mm_buf` [n, 32768] in the compute dtype (n = min(N, 4096)); on the CPU
      `_forward_tile` holds three fp32 copies of a tile (`tile.float()`, the logit-scale and
      temperature products in `_torch_transform`); the final norm's output is alive beside them.
    - backward: `mm_buf` again, the fp32 `grad_hidden` (N x H) and, for a trainable untied head,
      the fp32 `grad_weight` (V x H); on the CPU `_backward_tile` holds 7 fp32 tiles (y, z, log_p,
      p, grad, the target-minus-p difference and its product) plus the bool `is_target`.
    `head_trainable` is the numel of a trainable lm_head weight (0 under LoRA).
    Ignores: the per-chunk fp32 casts inside `_addmm_fp32` (smaller than the tile temporaries).
    """
    t = setup.batch_size * (setup.seq_len - 1)
    n = min(t, FUSED_TOKEN_CHUNK)
    cols = min(vocab, FUSED_VOCAB_CHUNK)
    mm_buf = compute * n * FUSED_VOCAB_CHUNK
    tile = FP32 * n * cols
    saved = compute * t * hidden + INT64 * t + 2 * FP32 * t + (2 * FP32 + 2) * t
    cpu = setup.device == "cpu"
    forward_extra = mm_buf + (3 * tile if cpu else 0) + compute * setup.batch_size * setup.seq_len * hidden
    backward_extra = mm_buf + FP32 * t * hidden + FP32 * head_trainable + ((7 * tile + n * cols) if cpu else 0)
    return FusedHeadBytes(saved, forward_extra, backward_extra)


def adapter_bytes(setup: Setup) -> int:
    return FLOAT_BYTES[adapter_dtype(setup)]
