"""memplan.training.modules_to_save: PEFT's trainable module copies, against the CPU ledger.

Reference values are ledger measurements of real PEFT 0.21.2 runs (`memplan profile --device cpu`,
tiny configs in tests/data/tiny, s128 b2 for llama, s64 b2 for qwen2; `trainable_parameters`,
`trainable_bytes` and `optimizer_state_bytes` of the record), minus the LoRA adapters' own share
(PEFT's count: llama q,v r8 = 16,384 parameters, 65,536 bytes in fp32, 131,104 optimizer bytes).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from memplan.errors import SetupError
from memplan.model.catalog import load_model
from memplan.training.modules_to_save import copies_dtype, saved_copies
from memplan.training.setup import Setup

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
LLAMA = str(TINY / "tiny-llama")
QWEN2 = str(TINY / "tiny-qwen2")
LORA_PARAMS, LORA_BYTES, LORA_OPT = 16_384, 65_536, 131_104


def _copies(model: str, **fields):
    setup = Setup(model=model, device="cpu", **fields)
    return setup, saved_copies(load_model(model), setup)


def test_embedding_and_head_copies_are_bf16_deepcopies_with_bf16_adam_states() -> None:
    # Ledger, tiny llama bf16 LoRA + modules_to_save=[embed_tokens, lm_head]: 528,384 trainable
    # parameters, 1,089,536 trainable bytes, 2,179,112 optimizer bytes (PEFT does not upcast the copies).
    setup, c = _copies(LLAMA, modules_to_save=("embed_tokens", "lm_head"))
    assert c.dtype == "bf16" and c.input_grad
    assert c.parameters == 528_384 - LORA_PARAMS
    assert c.weight_bytes == 1_089_536 - LORA_BYTES
    assert c.optimizer(setup).total == 2_179_112 - LORA_OPT


def test_head_only() -> None:
    # Ledger: 272,384 trainable parameters, 577,536 bytes, 1,155,108 optimizer bytes.
    setup, c = _copies(LLAMA, modules_to_save=("lm_head",))
    assert (c.parameters, c.weight_bytes, c.optimizer(setup).total) == (272_384 - LORA_PARAMS, 577_536 - LORA_BYTES, 1_155_108 - LORA_OPT)
    assert not c.input_grad and c.head_numel == 256_000


def test_tied_embeddings_get_two_separate_copies() -> None:
    # Ledger, tiny qwen2 (tie_word_embeddings): 38,902,784 trainable parameters, of which PEFT's
    # q,v r8 LoRA is 8 x 2 layers x (128+128 + 128+64) = 7,168: both copies are their own V x H tensors.
    _, c = _copies(QWEN2, modules_to_save=("embed_tokens", "lm_head"))
    assert c.parameters == 38_902_784 - 7_168 == 2 * 151_936 * 128


def test_copy_dtype_follows_prepare_kbit_and_sfttrainer() -> None:
    # Ledger: nf4 + prepare_model_for_kbit_training all-linear: 590,080 parameters in 2,360,320 bytes
    # (all fp32); TRL SFTTrainer nf4: 528,384 parameters in 1,056,768 bytes (all bf16, TRL's cast).
    base = Setup(model=LLAMA, device="cpu", quant="nf4", modules_to_save=("embed_tokens", "lm_head"))
    assert copies_dtype(replace(base, prepare_kbit_training=True)) == "fp32"
    assert copies_dtype(replace(base, recipe="trl-sft")) == "bf16"
    assert copies_dtype(replace(base, quant="fp32", autocast="bf16")) == "fp32"


def test_8bit_optimizer_shares_its_qmaps_once() -> None:
    # Ledger, bf16 LoRA + both copies with adamw_8bit: 1,173,120 optimizer bytes in all, of which the
    # eight LoRA tensors (2,048 values each, under min_8bit_size) keep 131,072 bytes of fp32 states.
    setup, c = _copies(LLAMA, modules_to_save=("embed_tokens", "lm_head"), optimizer="adamw_8bit")
    assert c.optimizer(setup).total == 1_173_120 - 131_072


def test_a_name_that_is_no_embedding_or_head_is_refused() -> None:
    with pytest.raises(SetupError, match="--modules-to-save norm: memplan models the copies of .*embed_tokens, lm_head"):
        _copies(LLAMA, modules_to_save=("norm",))


def test_full_fine_tuning_has_no_copies() -> None:
    _, c = _copies(LLAMA)
    assert c.numels == () and c.weight_bytes == 0
