"""memplan.training.setup: which options apply to which base, and the one label of a run.

Rules from bitsandbytes/transformers: int8/nf4/fp4 weights are frozen (full fine-tuning
needs bf16/fp16/fp32); bnb_4bit_use_double_quant exists for nf4/fp4 only.
"""

from __future__ import annotations

import pytest

from memplan.errors import SetupError
from memplan.training.setup import Setup, autocast_applies, double_quant_applies, prepare_kbit_applies, quants_for_method


def test_quants_for_method() -> None:
    assert quants_for_method("lora") == ("bf16", "fp16", "fp32", "int8", "nf4", "fp4")
    assert quants_for_method("full") == ("bf16", "fp16", "fp32")


@pytest.mark.parametrize("quant", ["bf16", "fp16", "fp32", "int8", "nf4", "fp4"])
def test_setup_obeys_the_rules(quant: str) -> None:
    full_ok = quant in ("bf16", "fp16", "fp32")
    assert (quant in quants_for_method("full")) is full_ok
    if not full_ok:
        with pytest.raises(SetupError, match="full fine-tuning cannot train"):
            Setup(model="x", method="full", quant=quant)
    assert double_quant_applies(quant) is (quant in ("nf4", "fp4"))
    assert prepare_kbit_applies(quant) is (quant in ("int8", "nf4", "fp4"))
    assert autocast_applies(quant) is (quant == "fp32")
    if quant not in ("nf4", "fp4"):
        with pytest.raises(SetupError, match="--double-quant only applies"):
            Setup(model="x", quant=quant, double_quant=True)


@pytest.mark.parametrize(("setup", "layers", "label"), [
    (Setup(model="llama2-7b", quant="nf4", double_quant=True, lora_targets="q_proj,v_proj", seq_len=256, batch_size=2,
           grad_checkpointing=True), None, "llama2-7b lora nf4+dq r8:q_proj,v_proj s256 b2 gc adamw"),
    (Setup(model="mixtral-8x7b", quant="nf4"), 2, "mixtral-8x7b L2 lora nf4 r8:default s512 b1 adamw"),
    (Setup(model="gpt2", method="full", quant="fp32", autocast="bf16", attention="eager", optimizer="adamw_8bit"), None,
     "gpt2 full fp32+bf16-autocast s512 b1 adamw_8bit eager"),
    (Setup(model="/very/long/path/to/models/tiny-llama-for-tests/config.json"), None,
     "tiny-llama-for-tests lora bf16 r8:default s512 b1 adamw"),
])
def test_label(setup: Setup, layers: int | None, label: str) -> None:
    assert setup.label(layers=layers) == label
