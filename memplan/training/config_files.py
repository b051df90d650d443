"""`--from FILE`: a trainer's own config read into `Setup` fields.

Reads (no torch import; YAML through pyyaml):
- an axolotl YAML (`base_model`, `adapter`, `sequence_len`, `micro_batch_size`, ...): recipe `axolotl`;
- a TRL `SFTConfig` / transformers `TrainingArguments` file as `trl sft --config` takes it, YAML or
  JSON, with TRL's `ModelConfig` fields (`model_name_or_path`, `load_in_4bit`, `use_peft`, `lora_r`,
  ...): recipe `trl-sft` when it has SFT fields (`max_length`, `packing`, `dataset_*`, `use_peft`),
  else `trainer`;
- a PEFT `adapter_config.json` (`peft_type`);
- a model folder (or its config.json) whose `config.json` carries a `quantization_config`.
Every field that changes memory is mapped; every other field is listed as ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memplan.errors import SetupError
from memplan.training.config_parallel import PARALLEL_KEYS, read_parallel

__all__ = ["ConfigPlan", "read_config"]

# TrainingArguments.optim / axolotl `optimizer` -> memplan's optimizer (None: refused by name).
_OPTIMIZERS: dict[str, str | None] = {
    "adamw_torch": "adamw", "adamw_hf": "adamw", "adamw": "adamw", "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit", "paged_adamw_8bit": "paged_adamw_8bit", "sgd": "sgd",
    "adamw_torch_fused": "adamw_fused", "adafactor": None, "lion_8bit": None, "paged_lion_8bit": None, "galore_adamw": None,
}
# Fields read but with no effect on one step's peak (shown, not ignored).
_SHOWN = ("gradient_accumulation_steps", "num_train_epochs", "max_steps", "learning_rate", "lora_alpha", "output_dir")


@dataclass
class ConfigPlan:
    """Setup fields from a config file, the recipe it implies, and what was not modelled."""

    path: str
    kind: str
    fields: dict[str, Any]
    shown: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        out = [f"from {self.path} ({self.kind}): recipe {self.fields.get('recipe', 'plain')}"]
        if "gradient_accumulation_steps" in self.shown:
            out.append(f"gradient_accumulation_steps {self.shown['gradient_accumulation_steps']}: "
                       "does not change the peak (one micro-batch is alive at a time)")
        out += self.notes
        if self.ignored:
            out.append("ignored (memplan does not model them): " + ", ".join(sorted(self.ignored)))
        return out


def _load(path: Path) -> tuple[dict[str, Any], Path]:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SetupError(f"--from {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise SetupError(f"--from {path}: expected a mapping of fields at the top level")
    return raw, path


def _model_name(name: Any) -> str:
    """A hub id is looked up in memplan's catalog (`hf_id`); a local path or catalog name passes through."""
    from memplan.model.catalog import catalog

    for entry in catalog():
        if entry.hf_id and entry.hf_id.lower() == str(name).lower():
            return entry.name
    return str(name)


def _quant(q: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if q.get("load_in_8bit"):
        out["quant"] = "int8"
    elif q.get("load_in_4bit"):
        out["quant"] = q.get("bnb_4bit_quant_type", "nf4")
        out["double_quant"] = bool(q.get("bnb_4bit_use_double_quant", q.get("use_bnb_nested_quant", False)))
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "uint8": "uint8"}
    dt = q.get("bnb_4bit_compute_dtype")
    if dt:
        out["compute_dtype"] = names.get(str(dt).replace("torch.", ""), str(dt))
    storage = q.get("bnb_4bit_quant_storage")
    if storage:
        out["quant_storage"] = names.get(str(storage).replace("torch.", ""), str(storage))
    return out


def _optimizer(name: Any, plan: ConfigPlan) -> None:
    key = str(name).lower()
    if key not in _OPTIMIZERS:
        raise SetupError(f"optimizer {name!r} in {plan.path} is not one memplan knows; use one of "
                         + ", ".join(k for k, v in _OPTIMIZERS.items() if v))
    if _OPTIMIZERS[key] is None:
        raise SetupError(f"optimizer {name!r} in {plan.path} is not modelled by memplan; estimate with --optimizer adamw "
                         "(or adamw_8bit / paged_adamw_8bit) instead")
    plan.fields["optimizer"] = _OPTIMIZERS[key]


def _precision(raw: dict[str, Any], plan: ConfigPlan) -> None:
    base = plan.fields.get("quant")
    if raw.get("bf16") in (True, "auto") or raw.get("fp16"):
        if base in (None, "bf16", "fp16") and "quant" not in plan.fields:
            plan.fields["quant"] = "fp16" if raw.get("fp16") else "bf16"
        plan.notes.append("bf16/fp16=True is read as the model's load dtype (memplan's --autocast models fp32 master weights only)")
        if plan.fields.get("recipe") == "trainer" and plan.fields.get("method") == "lora" and plan.fields.get("quant") == "bf16":
            # memplan.training.recipes.lora_under_autocast: measured for SFTTrainer, the same mechanism in Trainer.
            plan.notes.append("Trainer's bf16=True autocasts the fp32 LoRA branches (their saved inputs become bf16); "
                              "memplan models that for trl-sft only, so this estimate is high (a tiny llama: 5.7% without checkpointing)")
    elif raw.get("tf32") or raw.get("fp32"):
        plan.fields.setdefault("quant", "fp32")
    if plan.fields.get("recipe") == "trl-sft" and raw.get("bf16") is False and not raw.get("fp16"):
        plan.notes.append("bf16: false is not modelled: memplan assumes SFTConfig's default bf16=True, whose autocast saves "
                          "the LoRA branches' inputs in bf16 on a bf16 base (the estimate may be low by a few %)")


def _checkpointing(raw: dict[str, Any], plan: ConfigPlan) -> None:
    if "gradient_checkpointing" in raw:
        plan.fields["grad_checkpointing"] = bool(raw["gradient_checkpointing"])
    kw = raw.get("gradient_checkpointing_kwargs") or {}
    if isinstance(kw, dict) and kw.get("use_reentrant"):
        plan.notes.append("use_reentrant=True is modelled as non-reentrant checkpointing (same saved tensors per layer)")


def _axolotl(raw: dict[str, Any], plan: ConfigPlan, base: Path) -> None:
    f = plan.fields
    f["recipe"] = "axolotl"
    f["model"] = _model_name(raw["base_model"])
    f.update(_quant(raw))
    adapter = raw.get("adapter")
    f["method"] = "lora" if adapter in ("lora", "qlora") else "full"
    if "lora_r" in raw:
        f["lora_rank"] = int(raw["lora_r"])
    if "lora_dropout" in raw:
        f["lora_dropout"] = float(raw["lora_dropout"])
    if raw.get("lora_target_linear"):
        f["lora_targets"] = ("all-linear",)
    elif raw.get("lora_target_modules"):
        f["lora_targets"] = tuple(raw["lora_target_modules"])
    if "sequence_len" in raw:
        f["seq_len"] = int(raw["sequence_len"])
    if "micro_batch_size" in raw:
        f["batch_size"] = int(raw["micro_batch_size"])
    if raw.get("flash_attention"):
        f["attention"] = "flash"
    elif raw.get("sdp_attention"):
        f["attention"] = "sdpa"
    elif raw.get("eager_attention"):
        f["attention"] = "eager"
    if "optimizer" in raw:
        _optimizer(raw["optimizer"], plan)
    _precision(raw, plan)
    _checkpointing(raw, plan)
    if raw.get("sample_packing"):
        plan.notes.append(f"sample_packing fills each row to sequence_len ({f.get('seq_len')}): the estimate is for full rows")
    _modules_to_save(raw.get("lora_modules_to_save"), raw.get("peft_trainable_token_indices"), plan)
    read_parallel(raw, plan, base)
    used = {*PARALLEL_KEYS, "bnb_4bit_quant_storage", "base_model", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
            "adapter", "lora_r", "lora_dropout", "lora_target_linear", "lora_target_modules", "sequence_len", "micro_batch_size",
            "flash_attention", "sdp_attention", "eager_attention", "optimizer", "bf16", "fp16", "tf32", "gradient_checkpointing",
            "gradient_checkpointing_kwargs", "sample_packing", "lora_modules_to_save", "peft_trainable_token_indices"}
    _rest(raw, used, plan)


def _trainer(raw: dict[str, Any], plan: ConfigPlan, base: Path) -> None:
    f = plan.fields
    sft = any(k in raw for k in ("max_length", "packing", "dataset_name", "dataset_text_field", "use_peft", "completion_only_loss",
                                 "assistant_only_loss", "padding_free", "max_seq_length"))
    f["recipe"] = "trl-sft" if sft else "trainer"
    plan.kind = "TRL SFTConfig" if sft else "transformers TrainingArguments"
    name = raw.get("model_name_or_path") or raw.get("model")
    if name:
        f["model"] = _model_name(name)
    f.update(_quant(raw))
    if raw.get("quantization_config"):
        f.update(_quant(raw["quantization_config"]))
    peft = raw.get("use_peft") or "lora_r" in raw or "lora_target_modules" in raw
    f["method"] = "lora" if peft or "quant" in f and f["quant"] in ("int8", "nf4", "fp4") else "full"
    if "lora_r" in raw:
        f["lora_rank"] = int(raw["lora_r"])
    if "lora_dropout" in raw:
        f["lora_dropout"] = float(raw["lora_dropout"])
    targets = raw.get("lora_target_modules")
    if targets:
        f["lora_targets"] = ("all-linear",) if targets in ("all-linear", ["all-linear"]) else tuple(targets)
    length = raw.get("max_length", raw.get("max_seq_length"))
    if length:
        f["seq_len"] = int(length)
    elif sft:
        f["seq_len"] = 1024  # SFTConfig.max_length's default
    if "per_device_train_batch_size" in raw:
        f["batch_size"] = int(raw["per_device_train_batch_size"])
    else:
        f["batch_size"] = 8  # TrainingArguments.per_device_train_batch_size's default
    attn = raw.get("attn_implementation")
    if attn:
        f["attention"] = {"flash_attention_2": "flash", "sdpa": "sdpa", "eager": "eager"}.get(attn, attn)
    if "optim" in raw:
        _optimizer(raw["optim"], plan)
    else:
        # transformers training_args.py: `default_optim = "adamw_torch_fused"` for torch >= 2.8.
        plan.fields["optimizer"] = "adamw_fused"
        plan.notes.append("no optim given: TrainingArguments' default, adamw_torch_fused (torch >= 2.8)")
    _precision({**({"bf16": True} if sft and "bf16" not in raw and not raw.get("fp16") else {}), **raw}, plan)
    _checkpointing(raw, plan)
    if raw.get("packing"):
        plan.notes.append(f"packing fills each row to max_length ({f['seq_len']}): the estimate is for full rows")
    _modules_to_save(raw.get("lora_modules_to_save"), None, plan)
    read_parallel(raw, plan, base)
    used = {*PARALLEL_KEYS, "bnb_4bit_quant_storage", "model_name_or_path", "model", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
            "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "quantization_config", "use_peft", "lora_r", "lora_dropout",
            "lora_target_modules", "max_length", "max_seq_length", "per_device_train_batch_size", "attn_implementation", "optim",
            "bf16", "fp16", "tf32", "gradient_checkpointing", "gradient_checkpointing_kwargs", "packing", "lora_modules_to_save"}
    _rest(raw, used, plan)


def _adapter_config(raw: dict[str, Any], plan: ConfigPlan) -> None:
    f = plan.fields
    if raw.get("peft_type", "LORA") != "LORA":
        raise SetupError(f"{plan.path}: peft_type {raw['peft_type']} is not LoRA; memplan models LoRA adapters")
    f["method"] = "lora"
    if raw.get("base_model_name_or_path"):
        f["model"] = _model_name(raw["base_model_name_or_path"])
    f["lora_rank"] = int(raw.get("r", 8))
    f["lora_dropout"] = float(raw.get("lora_dropout", 0.0))
    targets = raw.get("target_modules")
    if targets:
        f["lora_targets"] = ("all-linear",) if targets == "all-linear" else tuple(targets)
    _modules_to_save(raw.get("modules_to_save"), raw.get("trainable_token_indices"), plan)
    _rest(raw, {"peft_type", "base_model_name_or_path", "r", "lora_dropout", "target_modules", "modules_to_save",
                "trainable_token_indices"}, plan)


def _modules_to_save(names: Any, token_indices: Any, plan: ConfigPlan) -> None:
    """PEFT `modules_to_save` (TRL ModelConfig / axolotl `lora_modules_to_save`): trainable full
    copies, modelled (memplan.training.modules_to_save). `trainable_token_indices` (PEFT
    TrainableTokensWrapper, which TRL sets itself for tokens a chat template adds) is read and
    said to be unmodelled: k fp32 rows trained, a k-row fp32 copy of the originals, and a full
    V x H embedding rebuilt by `index_copy` in every forward."""
    if names:
        plan.fields["modules_to_save"] = (names,) if isinstance(names, str) else tuple(str(n) for n in names)
    if token_indices:
        rows = (sum(len(v) for v in token_indices.values()) if isinstance(token_indices, dict)
                else len(token_indices) if isinstance(token_indices, list) else token_indices)
        plan.notes.append(f"trainable_token_indices ({rows} rows): PEFT's TrainableTokensWrapper trains those rows in fp32 and "
                          "rebuilds the whole embedding each forward; not modelled, the estimate is low by about one "
                          "embedding matrix")


def _rest(raw: dict[str, Any], used: set[str], plan: ConfigPlan) -> None:
    for k, v in raw.items():
        if k in used:
            continue
        if k in _SHOWN:
            plan.shown[k] = v
        else:
            plan.ignored.append(k)


def read_config(path: str | Path) -> ConfigPlan:
    """Read a trainer/PEFT/model config into Setup fields (memplan.training.setup.Setup)."""
    raw, real = _load(Path(path))
    plan = ConfigPlan(path=str(path), kind="", fields={})
    if "base_model" in raw:
        plan.kind = "axolotl config"
        _axolotl(raw, plan, real.parent)
    elif "peft_type" in raw or ("r" in raw and "target_modules" in raw):
        plan.kind = "PEFT adapter_config.json"
        _adapter_config(raw, plan)
    elif "model_type" in raw:
        plan.kind = "model config.json"
        plan.fields["model"] = str(real)
        plan.fields.update(_quant(raw.get("quantization_config") or {}))
        if plan.fields.get("quant") in ("int8", "nf4", "fp4"):
            plan.fields["method"] = "lora"
    else:
        _trainer(raw, plan, real.parent)
    return plan
