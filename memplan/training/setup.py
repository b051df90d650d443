"""The estimator's inputs: one frozen, validated `Setup` per training run.

Field names are the `memplan estimate` flag names in snake_case; profile
records store exactly these fields, so a record can be re-estimated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any, Literal, get_args

from memplan.errors import SetupError
from memplan.model.storage import FLOAT_BYTES, QUANTS, Quant, FloatDtype, is_quantized

__all__ = ["Setup", "Method", "Optimizer", "Attention", "Device", "OPTIMIZERS", "ATTENTIONS", "METHODS", "DEVICES", "Autocast", "AUTOCASTS"]

Method = Literal["full", "lora"]
# Names follow transformers' TrainingArguments.optim where one exists.
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "sgd", "sgd_momentum"]
Attention = Literal["sdpa", "eager", "flash"]
Device = Literal["cuda", "cpu"]
Autocast = Literal["none", "bf16", "fp16"]
METHODS: tuple[str, ...] = get_args(Method)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
DEVICES: tuple[str, ...] = get_args(Device)
AUTOCASTS: tuple[str, ...] = get_args(Autocast)
_OPTIMIZER_ALIASES = {"adamw_torch": "adamw", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw": "paged_adamw_32bit"}

# Hard ceilings that catch typos (seq 10**9) before they reach arithmetic.
MAX_SEQ_LEN = 10_000_000
MAX_BATCH = 1_000_000


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
    grad_checkpointing: bool = False
    optimizer: Optimizer = "adamw"
    attention: Attention = "sdpa"
    device: Device = "cuda"
    prepare_kbit_training: bool = False
    # Mixed precision: fp32 master weights (`--quant fp32`) with the forward under
    # torch.autocast in this dtype, as Trainer's bf16=True / fp16=True runs it.
    autocast: Autocast = "none"

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("quant", self.quant, QUANTS)
        _choice("compute_dtype", self.compute_dtype, tuple(FLOAT_BYTES))
        opt = _OPTIMIZER_ALIASES.get(self.optimizer, self.optimizer)
        object.__setattr__(self, "optimizer", _choice("optimizer", opt, OPTIMIZERS))
        _choice("attention", self.attention, ATTENTIONS)
        _choice("device", self.device, DEVICES)
        _positive("seq_len", self.seq_len, MAX_SEQ_LEN)
        _positive("batch_size", self.batch_size, MAX_BATCH)
        _positive("lora_rank", self.lora_rank, 1_000_000)
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        elif self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not (0.0 <= float(self.lora_dropout) < 1.0):
            raise SetupError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.method == "full" and is_quantized(self.quant):
            raise SetupError(
                f"full fine-tuning cannot train a {self.quant} base (bitsandbytes weights are frozen); "
                "use --method lora, or --quant bf16/fp16/fp32"
            )
        if self.prepare_kbit_training and not is_quantized(self.quant):
            raise SetupError("--prepare-kbit-training only applies to int8/nf4/fp4 bases; drop it or pick a quantized --quant")
        if self.prepare_kbit_training and not self.grad_checkpointing:
            # prepare_model_for_kbit_training(use_gradient_checkpointing=True) is PEFT's default.
            object.__setattr__(self, "grad_checkpointing", True)
        if self.double_quant and self.quant not in ("nf4", "fp4"):
            raise SetupError(f"--double-quant only applies to nf4/fp4, not {self.quant}; drop it or use --quant nf4")
        _choice("autocast", self.autocast, AUTOCASTS)
        if self.autocast != "none" and self.quant != "fp32":
            raise SetupError(
                f"--autocast {self.autocast} models fp32 master weights; use --quant fp32 with it, "
                f"or drop --autocast (a {self.quant} model already computes in {self.quant})"
            )
        if self.attention == "flash" and self.device == "cpu":
            raise SetupError("--attention flash needs --device cuda (flash-attn has no CPU kernel); use sdpa")

    @cached_property  # read several times per estimate; a frozen dataclass still has a __dict__
    def param_dtype(self) -> str:
        """dtype of the non-quantized weights as loaded."""
        return self.compute_dtype if is_quantized(self.quant) else self.quant

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets is not None else None
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Setup":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise SetupError(f"unknown setup field(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**raw)
