"""memplan.training.config_files (`--from`): the three examples/ files and a PEFT adapter config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.errors import SetupError
from memplan.training.config_files import read_config
from memplan.training.setup import Setup

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_trl_sft_qlora_yaml_maps_every_memory_field_and_lists_the_rest() -> None:
    plan = read_config(EXAMPLES / "trl-sft-qlora.yaml")
    f = plan.fields
    assert f["recipe"] == "trl-sft" and f["model"] == "llama2-7b"
    assert (f["quant"], f["double_quant"], f["lora_rank"], f["lora_targets"]) == ("nf4", True, 16, ("all-linear",))
    assert (f["seq_len"], f["batch_size"], f["optimizer"], f["grad_checkpointing"]) == (1024, 2, "paged_adamw_8bit", True)
    assert plan.shown["gradient_accumulation_steps"] == 8
    assert set(plan.ignored) == {"dataset_name", "logging_steps", "report_to"}
    Setup(**f)  # a valid setup


def test_axolotl_yaml_is_the_axolotl_recipe_with_kbit_preparation() -> None:
    plan = read_config(EXAMPLES / "axolotl-qlora.yaml")
    s = Setup(**plan.fields)
    assert s.recipe == "axolotl" and s.prepare_kbit_training and s.lora_targets == ("all-linear",)
    assert (s.seq_len, s.batch_size, s.attention) == (4096, 1, "flash")
    assert "datasets" in plan.ignored


def test_trainer_json_is_the_trainer_recipe() -> None:
    plan = read_config(EXAMPLES / "trainer-lora.json")
    assert plan.fields["recipe"] == "trainer" and plan.fields["batch_size"] == 4 and plan.fields["lora_targets"] == ("q_proj", "v_proj")


def test_adapter_config_json(tmp_path: Path) -> None:
    p = tmp_path / "adapter_config.json"
    p.write_text(json.dumps({"peft_type": "LORA", "r": 64, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                             "base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "lora_alpha": 16, "fan_in_fan_out": False}))
    plan = read_config(p)
    assert plan.fields == {"method": "lora", "model": "llama2-7b", "lora_rank": 64, "lora_dropout": 0.1, "lora_targets": ("q_proj", "v_proj")}
    assert "fan_in_fan_out" in plan.ignored


def test_unmodelled_optimizer_is_refused_by_name(tmp_path: Path) -> None:
    p = tmp_path / "cfg.yaml"
    p.write_text("model_name_or_path: llama2-7b\noptim: adafactor\n")
    with pytest.raises(SetupError, match="'adafactor'.*not modelled"):
        read_config(p)


def test_cli_flags_override_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    from memplan.cli import main

    assert main(["estimate", "--from", str(EXAMPLES / "trl-sft-qlora.yaml"), "--seq-len", "256", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "recipe trl-sft" in captured.err and "ignored (memplan does not model them): dataset_name" in captured.err
    setup = json.loads(captured.out)["setup"]
    assert setup["seq_len"] == 256 and setup["recipe"] == "trl-sft" and setup["lora_rank"] == 16


def test_modules_to_save_and_trainable_tokens_are_read(tmp_path: Path) -> None:
    """TRL ModelConfig / axolotl `lora_modules_to_save`, PEFT `modules_to_save` map to the Setup field
    (modelled: memplan.training.modules_to_save); `trainable_token_indices` is said to be unmodelled."""
    trl = tmp_path / "sft.yaml"
    trl.write_text("model_name_or_path: llama2-7b\nuse_peft: true\nlora_modules_to_save: [embed_tokens, lm_head]\noptim: adamw_torch\n")
    assert read_config(trl).fields["modules_to_save"] == ("embed_tokens", "lm_head")
    axolotl = tmp_path / "axolotl.yaml"
    axolotl.write_text("base_model: meta-llama/Llama-2-7b-hf\nadapter: lora\nlora_modules_to_save:\n  - embed_tokens\n  - lm_head\n")
    plan = read_config(axolotl)
    assert plan.fields["modules_to_save"] == ("embed_tokens", "lm_head") and "lora_modules_to_save" not in plan.ignored
    Setup(**plan.fields)
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text(json.dumps({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"],
                                   "trainable_token_indices": {"embed_tokens": [32000, 32001]}}))
    plan = read_config(adapter)
    assert plan.fields["modules_to_save"] == ("lm_head",)
    assert any("trainable_token_indices (2 rows)" in n and "not modelled" in n for n in plan.notes)


def test_fused_adamw_is_read_and_is_the_trainer_default(tmp_path: Path) -> None:
    """TrainingArguments optim `adamw_torch_fused` (its default from torch 2.8: transformers
    training_args.py `default_optim`) is memplan's adamw_fused."""
    p = tmp_path / "args.json"
    p.write_text(json.dumps({"model_name_or_path": "llama2-7b", "optim": "adamw_torch_fused"}))
    assert read_config(p).fields["optimizer"] == "adamw_fused"
    p.write_text(json.dumps({"model_name_or_path": "llama2-7b"}))
    plan = read_config(p)
    assert plan.fields["optimizer"] == "adamw_fused" and any("adamw_torch_fused" in n for n in plan.notes)
    assert Setup(model="llama2-7b", optimizer="adamw_torch_fused").optimizer == "adamw_fused"


def test_sft_bf16_false_is_said_to_be_unmodelled(tmp_path: Path) -> None:
    p = tmp_path / "sft.yaml"
    p.write_text("model_name_or_path: llama2-7b\nuse_peft: true\nbf16: false\n")
    assert any("bf16: false is not modelled" in n for n in read_config(p).notes)
