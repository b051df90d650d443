"""LoRA accounting (`memplan.model.lora`) against published counts and PEFT itself.

References: the published Llama-2 counts in /work/shared/REFERENCE.md (through
the estimator, no torch); PEFT 0.21's `get_nb_trainable_parameters()`, the
adapter dtype and the real `adapter_model.safetensors` size on tiny models of
several families. Tolerance: none (exact).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import TINY_CONFIGS, build_model
from memplan.model.architectures import spec_from_config
from memplan.errors import SetupError
from memplan.training.estimate import estimate
from memplan.model.lora import adapter_file_bytes, plan_lora, rank_above_capacity
from memplan.training.setup import Setup

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- published counts (REFERENCE.md, "Exact counts that tests can pin") -------------------------------
@pytest.mark.parametrize(
    ("model", "rank", "targets", "published"),
    [
        ("llama2-7b", 8, ("q_proj", "v_proj"), 4_194_304),
        ("llama2-7b", 8, ALL7 + ("lm_head",), 20_277_248),
        ("llama2-7b", 16, ALL7 + ("lm_head",), 40_554_496),
        ("llama2-7b", 256, ALL7 + ("lm_head",), 648_871_936),
        ("llama2-13b", 8, ("q_proj", "v_proj"), 6_553_600),
    ],
)
def test_published_llama2_counts(model: str, rank: int, targets: tuple[str, ...], published: int) -> None:
    est = estimate(Setup(model=model, lora_rank=rank, lora_targets=targets))
    assert est.trainable_parameters == published


def test_default_targets_are_peft_defaults_and_all_linear_skips_lm_head() -> None:
    base = estimate(Setup(model="llama2-7b", lora_rank=8)).trainable_parameters
    assert base == 4_194_304  # PEFT's llama default is q_proj, v_proj
    all_linear = estimate(Setup(model="llama2-7b", lora_rank=8, lora_targets=("all-linear",))).trainable_parameters
    assert all_linear == 20_277_248 - 8 * (4096 + 32000)  # everything but lm_head


def test_bad_targets_and_ranks() -> None:
    spec = spec_from_config(TINY_CONFIGS["llama"], name="tiny")
    with pytest.raises(SetupError, match="'c_attn' is not a linear module.*choose from q_proj"):
        plan_lora(spec, 8, ["q_proj", "c_attn"])
    # PEFT trains a rank above min(in, out) (lora/layer.py::update_layer checks only r > 0): accepted,
    # with r * (in + out) parameters, and named for the estimate's notes.
    wide = plan_lora(spec, 73, ["q_proj"])  # q_proj is 72 x 72
    assert wide.trainable_parameters == 73 * (72 + 72) * spec.num_layers
    assert [lin.name for lin in rank_above_capacity(wide)] == ["q_proj"]
    assert rank_above_capacity(plan_lora(spec, 72, ["q_proj"])) == ()
    for rank in (0, -1, 2.5, True):
        with pytest.raises(SetupError, match="positive integer"):
            plan_lora(spec, rank, ["q_proj"])  # type: ignore[arg-type]
    with pytest.raises(SetupError, match="empty"):
        plan_lora(spec, 8, " , ")
    mixtral = spec_from_config(TINY_CONFIGS["mixtral"], name="tiny-mixtral")
    with pytest.raises(SetupError, match="w1 and w3"):
        plan_lora(mixtral, 2, ["w1"])


@pytest.mark.slow
def test_peft_has_no_phi3_default_so_memplan_documents_its_own() -> None:
    pytest.importorskip("peft")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    from memplan.model.architectures import DEFAULT_LORA_TARGETS

    assert "phi3" not in defaults  # if PEFT adds one, memplan's default must follow it
    for family, names in DEFAULT_LORA_TARGETS.items():
        if family != "phi3":
            assert tuple(defaults[family]) == names


# ---- PEFT on real tiny models ----------------------------------------------------------------------------
# (family, memplan targets, PEFT target_modules); None = PEFT's per-family default.
CASES = [
    ("llama", None, None),
    ("llama", "all-linear", "all-linear"),
    ("llama", ALL7 + ("lm_head",), list(ALL7) + ["lm_head"]),
    ("qwen2", ("q_proj", "o_proj", "lm_head"), ["q_proj", "o_proj", "lm_head"]),  # tied lm_head, biased q
    ("gemma2", "all-linear", "all-linear"),
    ("phi3", None, ["qkv_proj"]),  # PEFT has no phi3 default; memplan's is qkv_proj
    ("phi3", ("qkv_proj", "gate_up_proj", "lm_head"), ["qkv_proj", "gate_up_proj", "lm_head"]),
    ("gpt2", None, None),
    ("gpt2", "all-linear", "all-linear"),  # Conv1D; c_proj names two modules per layer
    ("gpt2", ("c_proj", "lm_head"), ["c_proj", "lm_head"]),
    ("bert", None, None),
    ("bert", "all-linear", "all-linear"),  # includes the MLM head's transform.dense, not the decoder
    ("bert", ("dense", "decoder"), ["dense", "decoder"]),
    ("mixtral", ("q_proj", "v_proj"), ["q_proj", "v_proj"]),
    ("mixtral", "all-linear", "all-linear"),  # PEFT adds the router and the 3D experts (ParamWrapper)
    ("mixtral", ("gate", "w2", "lm_head"), ["gate", "w2", "lm_head"]),
]


def peft_model(family: str, peft_targets, rank: int, dtype: str = "bf16"):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    extra = {} if peft_targets is None else {"target_modules": peft_targets}
    return get_peft_model(build_model(TINY_CONFIGS[family], dtype=dtype), LoraConfig(r=rank, lora_alpha=16, **extra))


def _ranks(family: str, targets) -> list[int]:
    # memplan refuses a rank above a target's smaller side: the 4-expert router (out = 4)
    # caps Mixtral's all-linear/gate, and tiny llama's k/v_proj are 72 x 36.
    if family == "mixtral" and targets != ("q_proj", "v_proj"):
        return [1, 4]
    return [1, 7, 32] if family in ("llama", "mixtral") else [1, 7, 64]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "targets", "peft_targets", "rank"),
                         [(f, t, p, r) for f, t, p in CASES for r in _ranks(f, t)])
def test_trainable_count_equals_peft(family, targets, peft_targets, rank) -> None:
    model = peft_model(family, peft_targets, rank)
    trainable, _ = model.get_nb_trainable_parameters()
    plan = plan_lora(spec_from_config(TINY_CONFIGS[family], name=family), rank, targets)
    assert plan.trainable_parameters == trainable
    # per-tensor numels (used by the optimizer rules) match PEFT's trainable tensors
    real = sorted(p.numel() for p in model.parameters() if p.requires_grad)
    assert sorted(plan.tensor_numels()) == real


@pytest.mark.slow
def test_peft_keeps_fp32_adapters_on_a_bf16_base() -> None:
    model = peft_model("llama", None, 8, dtype="bf16")
    import torch

    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    est = estimate(Setup(model="llama2-7b", lora_rank=8))
    assert est.adapter_dtype == "fp32"
    assert est.memory.adapters == 4 * 4_194_304


@pytest.mark.slow
@pytest.mark.parametrize(("family", "targets", "peft_targets"), CASES)
@pytest.mark.parametrize("cast", [None, "fp16", "bf16"])
def test_adapter_file_size_equals_safetensors(tmp_path: Path, family, targets, peft_targets, cast) -> None:
    """As saved: fp32 adapters (and a targeted lm_head's bf16 base weight, which PEFT
    saves too); or the whole PEFT model cast to fp16/bf16 first."""
    rank = 3
    model = peft_model(family, peft_targets, rank)
    import torch

    if cast is not None:
        model = model.to({"fp16": torch.float16, "bf16": torch.bfloat16}[cast])
    model.save_pretrained(tmp_path)
    real = os.path.getsize(tmp_path / "adapter_model.safetensors")
    plan = plan_lora(spec_from_config(TINY_CONFIGS[family], name=family), rank, targets)
    expected = adapter_file_bytes(plan, cast or "fp32", base_dtype=cast or "bf16")
    assert expected == real
