"""LoRA adapter accounting, with PEFT 0.21's semantics.

- Targets match a module when its leaf name equals a target
  (peft/tuners/tuners_utils.py::check_target_module_exists, list form).
- `all-linear` is every nn.Linear / Conv1D except the output layer
  (tuners_utils.py::_maybe_include_all_linear_layers); `lm_head` can be added.
- A LoRA layer adds A (r x in) and B (out x r): r * (in + out) parameters
  (peft/tuners/lora/layer.py::update_layer).
- `autocast_adapter_dtype=True` (the default) keeps adapters in fp32 on a
  fp16/bf16 or quantized base (peft/tuners/tuners_utils.py::_cast_adapter_dtype).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from memplan.errors import SetupError
from memplan.spec import Linear, ModelSpec

__all__ = ["ALL_LINEAR", "LoraPlan", "resolve_targets", "plan_lora", "adapter_file_bytes", "SAFETENSORS_DTYPE"]

ALL_LINEAR = "all-linear"
SAFETENSORS_DTYPE = {"fp32": ("F32", 4), "fp16": ("F16", 2), "bf16": ("BF16", 2)}


@dataclass(frozen=True)
class LoraPlan:
    """Which linears get adapters, and how big the adapters are."""

    rank: int
    targets: tuple[Linear, ...]

    @property
    def trainable_parameters(self) -> int:
        return sum(self.rank * (lin.in_features + lin.out_features) * lin.count for lin in self.targets)

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(lin.name for lin in self.targets))

    def tensor_numels(self) -> list[int]:
        """Numel of every adapter tensor (A and B of every instance), for optimizer rules."""
        out: list[int] = []
        for lin in self.targets:
            out += [self.rank * lin.in_features, lin.out_features * self.rank] * lin.count
        return out


def resolve_targets(spec: ModelSpec, targets: str | Sequence[str] | None) -> tuple[Linear, ...]:
    """Target names (or `all-linear`, or None for PEFT's per-family default) -> linears."""
    from memplan.architectures import DEFAULT_LORA_TARGETS

    if targets is None:
        names: list[str] = list(DEFAULT_LORA_TARGETS[spec.model_type])
    elif isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in targets if str(t).strip()]
    if not names:
        raise SetupError("--lora-targets is empty; give module names (e.g. q_proj,v_proj) or all-linear")
    chosen: dict[str, Linear] = {}
    available = spec.linear_names
    for name in names:
        if name == ALL_LINEAR:
            for lin in spec.linears:
                if not lin.is_output:
                    chosen[lin.path] = lin
            continue
        hits = [lin for lin in spec.linears if lin.name == name]
        if not hits:
            raise SetupError(
                f"LoRA target '{name}' is not a linear module of {spec.name}; choose from {', '.join(available)} or all-linear"
            )
        for lin in hits:
            chosen[lin.path] = lin
    return tuple(chosen.values())


def plan_lora(spec: ModelSpec, rank: int, targets: str | Sequence[str] | None) -> LoraPlan:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SetupError(f"--lora-rank must be a positive integer, got {rank!r}")
    lins = resolve_targets(spec, targets)
    for lin in lins:
        # rank(B @ A) <= min(in, out): a larger r only adds parameters that cannot help.
        if rank > min(lin.in_features, lin.out_features):
            raise SetupError(
                f"--lora-rank {rank} exceeds {lin.name} ({lin.in_features}x{lin.out_features}); "
                f"use a rank <= {min(lin.in_features, lin.out_features)} or drop {lin.name} from --lora-targets"
            )
    return LoraPlan(rank=rank, targets=lins)


def adapter_file_bytes(plan: LoraPlan, save_dtype: str) -> int:
    """Size of PEFT's `adapter_model.safetensors` in `save_dtype`.

    safetensors layout: 8-byte header length, a compact JSON header padded with
    spaces to a multiple of 8, then the raw data (huggingface/safetensors
    `safetensors/src/tensor.rs::prepare`). PEFT saves keys as
    `base_model.model.<path>.lora_A.weight` (peft/utils/save_and_load.py).
    """
    code, itemsize = SAFETENSORS_DTYPE[save_dtype]
    entries: list[tuple[str, list[int]]] = []
    for lin in plan.targets:
        for i in range(lin.count):
            base = "base_model.model." + lin.path.replace("{i}", str(i))
            entries.append((base + ".lora_A.weight", [plan.rank, lin.in_features]))
            entries.append((base + ".lora_B.weight", [lin.out_features, plan.rank]))
    entries.sort()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = shape[0] * shape[1] * itemsize
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    padded = -(-len(text) // 8) * 8
    return 8 + padded + offset
