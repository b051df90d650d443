"""memplan.training.recipes: what `--recipe` changes (sources in the module docstring);
the numbers themselves are checked against real Trainer/SFTTrainer steps in
tests/measure/test_recipes_cpu.py."""

from __future__ import annotations

import pytest

from memplan.errors import SetupError
from memplan.training.estimate import estimate
from memplan.training.recipes import FUSED_VOCAB_CHUNK, adapter_dtype, fused_lm_head
from memplan.training.setup import Setup

LLAMA = "tests/data/tiny/tiny-llama"


def test_plain_is_the_default_and_unknown_recipes_are_refused() -> None:
    assert Setup(model=LLAMA).recipe == "plain"
    with pytest.raises(SetupError, match="--recipe must be one of"):
        Setup(model=LLAMA, recipe="deepspeed-chat")


def test_trl_sft_checkpoints_by_default_and_honours_an_explicit_false() -> None:
    assert Setup(model=LLAMA, recipe="trl-sft").grad_checkpointing is True  # SFTConfig default
    assert Setup(model=LLAMA, recipe="trl-sft", grad_checkpointing=False).grad_checkpointing is False
    assert Setup(model=LLAMA, recipe="trainer").grad_checkpointing is False


def test_axolotl_prepares_quantized_bases_only() -> None:
    assert Setup(model=LLAMA, recipe="axolotl", quant="nf4").prepare_kbit_training is True
    assert Setup(model=LLAMA, recipe="axolotl", quant="bf16").prepare_kbit_training is False


def test_trl_casts_qlora_adapters_to_bf16_halving_adapter_grad_and_adam_bytes() -> None:
    plain = estimate(Setup(model=LLAMA, quant="nf4", device="cpu"))
    trl = estimate(Setup(model=LLAMA, quant="nf4", device="cpu", recipe="trl-sft"))
    assert adapter_dtype(trl.setup) == "bf16" and trl.adapter_dtype == "bf16"
    assert trl.memory.adapters * 2 == plain.memory.adapters
    assert trl.memory.optimizer_states < plain.memory.optimizer_states
    # A bf16 base keeps PEFT's fp32 adapters under SFTTrainer (the cast is for quantized bases).
    assert adapter_dtype(Setup(model=LLAMA, quant="bf16", recipe="trl-sft")) == "fp32"


def test_fused_lm_head_saves_no_logits_but_allocates_full_width_tiles() -> None:
    s = Setup(model=LLAMA, quant="bf16", device="cpu", recipe="trl-sft", seq_len=128, batch_size=2)
    assert fused_lm_head(s)
    est = estimate(s)
    assert est.memory.logits == 0
    # mm_buf is [min(N, 4096), 32768] bf16 even for tiny-llama's 1,000-token vocabulary.
    assert est.peak_parts["transients"] >= 2 * (2 * 127) * FUSED_VOCAB_CHUNK
    assert any("fused LM head" in n for n in est.notes)


def test_trainer_recipe_matches_the_plain_loop() -> None:
    a = estimate(Setup(model=LLAMA, quant="nf4", device="cpu"))
    b = estimate(Setup(model=LLAMA, quant="nf4", device="cpu", recipe="trainer"))
    assert a.memory.peak == b.memory.peak
    assert "recipe" not in a.setup.label() and "trainer" in b.setup.label()


def test_sft_bf16_autocast_is_modelled_over_fp32_adapters_only() -> None:
    """SFTConfig.bf16 defaults to True (trl/trainer/base_config.py::_BaseConfig.__post_init__). Ledger, tiny llama s128 b2, SFTTrainer
    bf16=True vs False: full bf16 and nf4 QLoRA byte-identical; bf16 LoRA all-linear without checkpointing
    -2,190,848 bytes of activations (lora_A saves autocast's bf16 input copy, not PEFT's fp32 one)."""
    from memplan.training.recipes import lora_under_autocast

    base = dict(model="x", recipe="trl-sft", grad_checkpointing=False)
    assert lora_under_autocast(Setup(**base))
    assert not lora_under_autocast(Setup(**base, quant="nf4"))  # TRL casts QLoRA adapters to bf16 itself
    assert not lora_under_autocast(Setup(**base, method="full"))
    assert not lora_under_autocast(Setup(model="x", recipe="trainer"))
