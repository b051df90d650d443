"""`--from` reads the multi-GPU sections of trainer configs (memplan.training.config_parallel).

Field names are transformers' TrainingArguments (`fsdp`, `fsdp_config`, `deepspeed`), DeepSpeed's
config schema (`zero_optimization.stage`, `offload_optimizer.device`, `offload_param.device`) and
axolotl's (`fsdp_config.fsdp_version`, `reshard_after_forward`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from memplan.errors import SetupError
from memplan.training.config_files import read_config
from memplan.training.setup import Setup

QLORA = {"model_name_or_path": "meta-llama/Llama-2-7b-hf", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
         "bnb_4bit_compute_dtype": "bfloat16", "lora_r": 8, "per_device_train_batch_size": 1, "optim": "adamw_torch"}


def _write(tmp_path: Path, raw: dict, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_trainer_fsdp_qlora_gets_the_compute_dtype_storage(tmp_path: Path) -> None:
    plan = read_config(_write(tmp_path, {**QLORA, "fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2}}))
    f = plan.fields
    assert (f["parallel"], f["fsdp_version"], f["quant_storage"]) == ("fsdp", 2, "bf16")
    assert not {"fsdp", "fsdp_config"} & set(plan.ignored)
    assert any("--gpus N" in n for n in plan.notes)
    # The fields make a valid setup once the world size is given.
    Setup(**{**f, "gpus": 2})


def test_deepspeed_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                                                               "offload_optimizer": {"device": "cpu"},
                                                                               "reduce_bucket_size": 12345}}))
    plan = read_config(_write(tmp_path, {**QLORA, "deepspeed": "ds/z3.json"}))
    assert (plan.fields["parallel"], plan.fields["offload"]) == ("zero3", "params_and_optimizer")
    assert any("reduce_bucket_size=12345 not modelled" in n for n in plan.notes)


def test_zero2_optimizer_offload_keeps_uint8_storage(tmp_path: Path) -> None:
    plan = read_config(_write(tmp_path, {**QLORA, "deepspeed": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}}))
    assert (plan.fields["parallel"], plan.fields["offload"]) == ("zero2", "optimizer")
    assert "quant_storage" not in plan.fields  # ZeRO-2 does not flatten the frozen 4-bit base


def test_missing_deepspeed_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="no such file"):
        read_config(_write(tmp_path, {**QLORA, "deepspeed": "nowhere.json"}))


def test_axolotl_fsdp2_without_resharding_is_shard_grad_op(tmp_path: Path) -> None:
    raw = {"base_model": "meta-llama/Llama-2-7b-hf", "adapter": "qlora", "load_in_4bit": True, "lora_r": 16,
           "fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": False}}
    plan = read_config(_write(tmp_path, raw))
    assert (plan.fields["parallel"], plan.fields["fsdp_version"]) == ("fsdp_shard_grad_op", 2)


def test_quant_storage_from_the_quantization_config(tmp_path: Path) -> None:
    raw = {**QLORA, "bnb_4bit_quant_storage": "bfloat16", "fsdp": "full_shard"}
    assert read_config(_write(tmp_path, raw)).fields["quant_storage"] == "bf16"
