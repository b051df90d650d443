"""The estimator's inputs: one frozen, validated `Setup` per training run.

Field names are the `memplan estimate` flag names in snake_case; profile
records store exactly these fields, so a record can be re-estimated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, Literal, get_args

from memplan.errors import SetupError
from memplan.model.lora import lora_targets_text, parse_lora_targets
from memplan.units import with_article
from memplan.model.storage import FLOAT_BYTES, QUANTS, Quant, FloatDtype, is_four_bit, is_quantized
from memplan.training.parallel import Offload, Parallel, QuantStorage, check_layout

__all__ = ["Setup", "Method", "Optimizer", "Attention", "Device", "OPTIMIZERS", "ATTENTIONS", "METHODS", "DEVICES", "Autocast", "AUTOCASTS",
           "Recipe", "RECIPES", "quants_for_method", "double_quant_applies", "prepare_kbit_applies", "autocast_applies"]

Method = Literal["full", "lora"]
# Names follow transformers' TrainingArguments.optim where one exists.
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "sgd", "sgd_momentum", "adamw_fused"]
Attention = Literal["sdpa", "eager", "flash"]
Device = Literal["cuda", "cpu"]
Autocast = Literal["none", "bf16", "fp16"]
# Who runs the step: memplan's own loop, transformers' Trainer, TRL's SFTTrainer, axolotl
# (memplan.training.recipes says what each one changes).
Recipe = Literal["plain", "trainer", "trl-sft", "axolotl"]
RECIPES: tuple[str, ...] = get_args(Recipe)
METHODS: tuple[str, ...] = get_args(Method)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
DEVICES: tuple[str, ...] = get_args(Device)
AUTOCASTS: tuple[str, ...] = get_args(Autocast)
_OPTIMIZER_ALIASES = {"adamw_torch": "adamw", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw": "paged_adamw_32bit", "adamw_torch_fused": "adamw_fused"}

# Hard ceilings that catch typos (seq 10**9) before they reach arithmetic.
MAX_SEQ_LEN = 10_000_000
MAX_BATCH = 1_000_000
# Above every model width memplan knows (the widest hidden size is ~25k). A rank wider than an
# adapted layer is accepted, as PEFT accepts it, with a note (memplan.model.lora.rank_above_capacity).
MAX_LORA_RANK = 65_536


def quants_for_method(method: str) -> tuple[str, ...]:
    """Base formats a method can train: bitsandbytes int8/nf4/fp4 weights are frozen
    (`Params4bit`/`Int8Params` have requires_grad=False), so full fine-tuning needs a float base."""
    return QUANTS if method == "lora" else tuple(q for q in QUANTS if not is_quantized(q))


def double_quant_applies(quant: str) -> bool:
    """`bnb_4bit_use_double_quant` only exists for the 4-bit formats (transformers BitsAndBytesConfig)."""
    return is_four_bit(quant)


def prepare_kbit_applies(quant: str) -> bool:
    """PEFT's `prepare_model_for_kbit_training` prepares a quantized base only."""
    return is_quantized(quant)


def autocast_applies(quant: str) -> bool:
    """Mixed precision here means fp32 master weights under torch.autocast (Trainer's bf16=True)."""
    return quant == "fp32"


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise SetupError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _positive(name: str, value: Any, ceiling: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SetupError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if value > ceiling:
        raise SetupError(f"--{name.replace('_', '-')} {value} is larger than {ceiling:,}; check the value")
    return value


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One fine-tuning run. `lora_targets=None` means PEFT's default for the family."""

    model: str
    method: Method = "lora"
    quant: Quant = "bf16"
    double_quant: bool = False
    compute_dtype: FloatDtype = "bf16"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    seq_len: int = 512
    batch_size: int = 1
    # None: PEFT's default, on with prepare_kbit_training (`prepare_model_for_kbit_training(
    # use_gradient_checkpointing=True)`, peft/utils/other.py), off otherwise. Resolved to a bool.
    grad_checkpointing: bool | None = None
    optimizer: Optimizer = "adamw"
    attention: Attention = "sdpa"
    device: Device = "cuda"
    prepare_kbit_training: bool = False
    # Mixed precision: fp32 master weights (`--quant fp32`) with the forward under
    # torch.autocast in this dtype, as Trainer's bf16=True / fp16=True runs it.
    autocast: Autocast = "none"
    recipe: Recipe = "plain"
    # PEFT LoraConfig(modules_to_save=[...]): trainable full copies of these modules (embed_tokens, lm_head).
    modules_to_save: tuple[str, ...] | None = None
    # The parallel layout (memplan.training.parallel); batch_size stays per GPU.
    gpus: int = 1
    gpus_per_node: int | None = None  # None: min(gpus, data/gpus.json's gpus_per_node), resolved
    parallel: Parallel = "none"
    fsdp_version: int = 1
    offload: Offload = "none"
    quant_storage: QuantStorage = "uint8"  # bnb_4bit_quant_storage

    def __post_init__(self) -> None:
        _choice("recipe", self.recipe, RECIPES)
        _choice("method", self.method, METHODS)
        _choice("quant", self.quant, QUANTS)
        _choice("compute_dtype", self.compute_dtype, tuple(FLOAT_BYTES))
        opt = _OPTIMIZER_ALIASES.get(self.optimizer, self.optimizer)
        object.__setattr__(self, "optimizer", _choice("optimizer", opt, OPTIMIZERS))
        _choice("attention", self.attention, ATTENTIONS)
        _choice("device", self.device, DEVICES)
        _positive("seq_len", self.seq_len, MAX_SEQ_LEN)
        _positive("batch_size", self.batch_size, MAX_BATCH)
        _positive("lora_rank", self.lora_rank, MAX_LORA_RANK)
        object.__setattr__(self, "lora_targets", parse_lora_targets(self.lora_targets))
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise SetupError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.quant not in quants_for_method(self.method):
            raise SetupError(
                f"full fine-tuning cannot train {with_article(self.quant)} base (bitsandbytes weights are frozen); "
                "use --method lora, or --quant bf16/fp16/fp32"
            )
        if self.prepare_kbit_training and not prepare_kbit_applies(self.quant):
            raise SetupError("--prepare-kbit-training only applies to int8/nf4/fp4 bases; drop it or pick a quantized --quant")
        if self.recipe == "axolotl" and prepare_kbit_applies(self.quant):
            # axolotl prepares every 8/4-bit base (memplan.training.recipes.RECIPE_BEHAVIOURS).
            object.__setattr__(self, "prepare_kbit_training", True)
        if self.grad_checkpointing is None:
            # prepare_model_for_kbit_training(use_gradient_checkpointing=True) is PEFT's default;
            # TRL's SFTConfig turns checkpointing on by default (trl/trainer/sft_config.py::SFTConfig);
            # an explicit False is honoured (the profiler passes it on to PEFT / the trainer).
            object.__setattr__(self, "grad_checkpointing", bool(self.prepare_kbit_training) or self.recipe == "trl-sft")
        elif not isinstance(self.grad_checkpointing, bool):
            raise SetupError(f"--grad-checkpointing must be true or false, got {self.grad_checkpointing!r}")
        if self.double_quant and not double_quant_applies(self.quant):
            raise SetupError(f"--double-quant only applies to nf4/fp4, not {self.quant}; drop it or use --quant nf4")
        _choice("autocast", self.autocast, AUTOCASTS)
        if self.autocast != "none" and not autocast_applies(self.quant):
            raise SetupError(
                f"--autocast {self.autocast} models fp32 master weights; use --quant fp32 with it, "
                f"or drop --autocast ({with_article(self.quant)} model already computes in {self.quant})"
            )
        if self.attention == "flash" and self.device == "cpu":
            raise SetupError("--attention flash needs --device cuda (flash-attn has no CPU kernel); use sdpa")
        if self.modules_to_save is not None:
            names = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else self.modules_to_save
            names = tuple(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
            if self.method != "lora" and names:
                raise SetupError("--modules-to-save adds trainable copies beside LoRA adapters; use it with --method lora")
            object.__setattr__(self, "modules_to_save", names or None)
        object.__setattr__(self, "gpus_per_node", check_layout(self))

    @cached_property  # read several times per estimate; a frozen dataclass still has a __dict__
    def param_dtype(self) -> str:
        """dtype of the non-quantized weights as loaded."""
        return self.compute_dtype if is_quantized(self.quant) else self.quant

    def label(self, *, layers: int | None = None) -> str:
        """One line naming the run, e.g. `llama2-7b L4 lora nf4+dq r8:q_proj,v_proj s512 b1 gc adamw`:
        model (a long config path shortened to its folder), truncation, method, format (+dq, +autocast),
        LoRA rank:targets, sequence, batch, gc (checkpointing), optimizer, attention when not sdpa."""
        from pathlib import Path

        parts = [self.model if len(self.model) < 40 else Path(self.model).parent.name or self.model[-30:]]
        if layers:
            parts.append(f"L{layers}")
        parts.append(self.method)
        parts.append(self.quant + ("+dq" if self.double_quant else "") + (f"+{self.autocast}-autocast" if self.autocast != "none" else ""))
        if self.method == "lora":
            parts.append(f"r{self.lora_rank}:{lora_targets_text(self.lora_targets)}")
        parts += [f"s{self.seq_len}", f"b{self.batch_size}"]
        if self.grad_checkpointing:
            parts.append("gc")
        parts.append(self.optimizer)
        if self.attention != "sdpa":
            parts.append(self.attention)
        if self.recipe != "plain":
            parts.append(self.recipe)
        if self.parallel != "none":
            layout = f"{self.parallel}{'2' if self.fsdp_version == 2 else ''}x{self.gpus}"
            if self.gpus_per_node != self.gpus:
                layout += f"/{self.gpus_per_node}pn"
            if self.offload != "none":
                layout += f"+offload-{self.offload}"
            parts.append(layout)
        if self.quant_storage != "uint8":
            parts.append(f"storage-{self.quant_storage}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets is not None else None
        d["modules_to_save"] = list(self.modules_to_save) if self.modules_to_save is not None else None
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Setup":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise SetupError(f"unknown setup field(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**raw)
