"""LoRA adapter accounting, with PEFT 0.21's semantics.

- Targets match a module when its leaf name equals a target
  (peft/tuners/tuners_utils.py::check_target_module_exists, list form).
- `all-linear` is every nn.Linear / Conv1D except the output layer
  (tuners_utils.py::_maybe_include_all_linear_layers); `lm_head` can be added.
- A LoRA layer adds A (r x in) and B (out x r): r * (in + out) parameters
  (peft/tuners/lora/layer.py::update_layer).
- MoE models whose experts are no longer nn.Linear in transformers 5 (Mixtral) are
  handled by PEFT's v4->v5 conversion (peft/utils/transformers_weight_conversion.py):
  the v4 names `gate`, `w1`+`w3`, `w2` (and `all-linear`, which includes them) become
  `target_parameters` wrapped by `lora.ParamWrapper`, whose A is (r*experts x in) and
  B (out x r*experts); the fused `gate_up_proj` gets rank 2r.
- `autocast_adapter_dtype=True` (the default) keeps adapters in fp32 on a
  fp16/bf16 or quantized base (peft/tuners/tuners_utils.py::_cast_adapter_dtype).
"""

from __future__ import annotations

import json
from functools import lru_cache
from dataclasses import dataclass
from typing import Sequence

from memplan.errors import SetupError
from memplan.model.spec import Component, Linear, ModelSpec

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGETS_WORDS",
    "parse_lora_targets",
    "lora_targets_text",
    "LoraPlan",
    "ParamTarget",
    "resolve_targets",
    "resolve_param_targets",
    "plan_lora",
    "rank_above_capacity",
    "adapter_file_bytes",
    "SAFETENSORS_DTYPE",
]

ALL_LINEAR = "all-linear"
# Words that mean "PEFT's per-family default" (`target_modules=None`) wherever targets are typed.
DEFAULT_TARGETS_WORDS = ("default", "peft-default")
_EMPTY_TARGETS = "--lora-targets is empty; give module names (e.g. q_proj,v_proj) or all-linear"
SAFETENSORS_DTYPE = {"fp32": ("F32", 4), "fp16": ("F16", 2), "bf16": ("BF16", 2)}

# peft/utils/transformers_weight_conversion.py: _MOE_TARGET_MODULE_MAPPING["mixtral"] and
# _MOE_FUSED_TARGETS["mixtral"] (w1 and w3 are fused into gate_up_proj: both or neither).
_MOE_V4_NAMES = ("gate", "w1", "w3", "w2")


@dataclass(frozen=True)
class ParamTarget:
    """A parameter PEFT wraps directly (`lora.ParamWrapper`): A is
    (rank * rank_factor * experts) x in_features, B is out_features x (same)."""

    name: str  # the parameter's name in transformers 5 (`gate.weight`, `experts.gate_up_proj`)
    path: str  # key stem PEFT saves, `{i}` for the layer
    in_features: int
    out_features: int
    experts: int  # 1 for a 2D parameter
    rank_factor: int  # 2 for a fused pair (gate_up_proj), else 1
    count: int
    component: Component

    def adapter_rank(self, rank: int) -> int:
        return rank * self.rank_factor * self.experts


@dataclass(frozen=True)
class LoraPlan:
    """Which linears (and MoE parameters) get adapters, and how big the adapters are."""

    rank: int
    targets: tuple[Linear, ...]
    param_targets: tuple[ParamTarget, ...] = ()

    @property
    def trainable_parameters(self) -> int:
        linears = sum(self.rank * (lin.in_features + lin.out_features) * lin.count for lin in self.targets)
        params = sum(p.adapter_rank(self.rank) * (p.in_features + p.out_features) * p.count for p in self.param_targets)
        return linears + params

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([lin.name for lin in self.targets] + [p.name for p in self.param_targets]))

    def tensor_numels(self) -> list[int]:
        """Numel of every adapter tensor (A and B of every instance), for optimizer rules."""
        out: list[int] = []
        for lin in self.targets:
            out += [self.rank * lin.in_features, lin.out_features * self.rank] * lin.count
        for p in self.param_targets:
            r = p.adapter_rank(self.rank)
            out += [r * p.in_features, p.out_features * r] * p.count
        return out


def parse_lora_targets(targets: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """ONE target set as typed anywhere (flag, grid, app, record) -> names, or None for PEFT's default.

    A comma string (`"q_proj,v_proj"`), a list of names, `all-linear`, or None /
    `default` (PEFT's per-family default, peft/utils/constants.py
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING). Names are stripped and blanks
    dropped; nothing left raises SetupError. Whether a name exists is `resolve_targets`' job.
    """
    if targets is None:
        return None
    if isinstance(targets, str):
        if targets.strip().lower() in DEFAULT_TARGETS_WORDS:
            return None
        names = tuple(t.strip() for t in targets.split(",") if t.strip())
    else:
        names = tuple(str(t).strip() for t in targets if str(t).strip())
    if not names:
        raise SetupError(_EMPTY_TARGETS)
    return names


def lora_targets_text(targets: Sequence[str] | None) -> str:
    """A target set as one word for labels and tables: the comma list, or `default`."""
    return ",".join(targets) if targets else DEFAULT_TARGETS_WORDS[0]


def _target_names(spec: ModelSpec, targets: str | Sequence[str] | None) -> list[str]:
    from memplan.model.architectures import DEFAULT_LORA_TARGETS

    names = parse_lora_targets(targets)
    return list(DEFAULT_LORA_TARGETS[spec.model_type] if names is None else names)


def _moe_names(spec: ModelSpec) -> tuple[str, ...]:
    return _MOE_V4_NAMES if spec.model_type == "mixtral" else ()


def resolve_targets(spec: ModelSpec, targets: str | Sequence[str] | None) -> tuple[Linear, ...]:
    """Target names (or `all-linear`, or None for PEFT's per-family default) -> linears."""
    names = _target_names(spec, targets)
    chosen: dict[str, Linear] = {}
    available = spec.linear_names + _moe_names(spec)
    for name in names:
        if name == ALL_LINEAR:
            for lin in spec.linears:
                if not lin.is_output:
                    chosen[lin.path] = lin
            continue
        if name in _moe_names(spec):
            continue  # a parameter target, see resolve_param_targets
        hits = [lin for lin in spec.linears if lin.name == name]
        if not hits:
            raise SetupError(
                f"LoRA target '{name}' is not a linear module of {spec.name}; choose from {', '.join(available)} or all-linear"
            )
        for lin in hits:
            chosen[lin.path] = lin
    return tuple(chosen.values())


def resolve_param_targets(spec: ModelSpec, targets: str | Sequence[str] | None) -> tuple[ParamTarget, ...]:
    """The MoE parameters PEFT wraps for these targets (Mixtral only; empty otherwise)."""
    if not _moe_names(spec):
        return ()
    names = set(_target_names(spec, targets))
    if ALL_LINEAR in names:
        names |= set(_MOE_V4_NAMES)
    if ("w1" in names) != ("w3" in names):
        raise SetupError("LoRA targets w1 and w3 are fused into gate_up_proj in transformers 5; target both or neither")
    h, inter, e, L = spec.hidden_size, spec.intermediate_size, spec.num_experts, spec.num_layers
    mlp = "model.layers.{i}.mlp."
    out: list[ParamTarget] = []
    if "gate" in names:  # router weight (experts x hidden), a 2D parameter
        out.append(ParamTarget("gate.weight", mlp + "gate", h, e, 1, 1, L, "router"))
    both = "w1" in names and "w2" in names
    if "w1" in names:  # (experts, 2*inter, hidden); PEFT nests it under down_proj's wrapper when both are targeted
        path = mlp + ("experts.base_layer" if both else "experts")
        out.append(ParamTarget("experts.gate_up_proj", path, h, 2 * inter, e, 2, L, "experts"))
    if "w2" in names:  # (experts, hidden, inter)
        out.append(ParamTarget("experts.down_proj", mlp + "experts", inter, h, e, 1, L, "experts"))
    return tuple(out)


def plan_lora(spec: ModelSpec, rank: int, targets: str | Sequence[str] | None) -> LoraPlan:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SetupError(f"--lora-rank must be a positive integer, got {rank!r}")
    lins = resolve_targets(spec, targets)
    params = resolve_param_targets(spec, targets)
    # A rank above a linear's min(in, out) is accepted, as PEFT accepts it
    # (peft/tuners/lora/layer.py::LoraLayer.update_layer checks only r > 0): rank(B @ A) <=
    # min(in, out), so the extra parameters add memory but no capacity; `rank_above_capacity`
    # names those linears for the estimate's notes.
    for p in params:
        # Mixtral's router (hidden x 8) is targeted by every `all-linear` recipe at r = 16-64;
        # PEFT accepts it, so only a rank beyond both of its sides is refused.
        if rank > max(p.in_features, p.out_features):
            raise SetupError(
                f"--lora-rank {rank} exceeds {p.name} ({p.in_features}x{p.out_features}); "
                f"use a rank <= {max(p.in_features, p.out_features)}"
            )
    return LoraPlan(rank=rank, targets=lins, param_targets=params)


def rank_above_capacity(plan: LoraPlan) -> tuple[Linear, ...]:
    """The target linears whose min(in, out) is below the plan's rank (one per name)."""
    out: dict[str, Linear] = {}
    for lin in plan.targets:
        if plan.rank > min(lin.in_features, lin.out_features) and lin.name not in out:
            out[lin.name] = lin
    return tuple(out.values())


# peft/utils/constants.py::EMBEDDING_LAYER_NAMES: targeting one of these makes
# `save_pretrained(save_embedding_layers="auto")` store the wrapped layer's base weight too.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# safetensors `Dtype` declaration order (F16 < BF16 < F32); `prepare` sorts larger first.
_DTYPE_ORDER = {"F16": 1, "BF16": 2, "F32": 3}


@lru_cache(maxsize=4096)
def adapter_file_bytes(plan: LoraPlan, save_dtype: str, *, base_dtype: str | None = None) -> int:
    """Size of PEFT's `adapter_model.safetensors` with adapters in `save_dtype`.

    safetensors layout: 8-byte header length, a compact JSON header padded with
    spaces to a multiple of 8, then the raw data; tensors are ordered by dtype
    (larger first), then name (huggingface/safetensors `safetensors/src/tensor.rs::prepare`).
    PEFT saves keys as `base_model.model.<path>.lora_A.weight` (peft/utils/save_and_load.py).
    When `lm_head` is a target, PEFT 0.21 `get_peft_model_state_dict` also saves the
    full `lm_head.base_layer.weight`, in the base model's dtype (`base_dtype`,
    default `save_dtype`); measured in tests/model/test_lora.py.
    """
    code, itemsize = SAFETENSORS_DTYPE[save_dtype]
    base_code, base_itemsize = SAFETENSORS_DTYPE[base_dtype or save_dtype]
    entries: list[tuple[str, str, int, list[int]]] = []
    for lin in plan.targets:
        for i in range(lin.count):
            base = "base_model.model." + lin.path.replace("{i}", str(i))
            entries.append((base + ".lora_A.weight", code, itemsize, [plan.rank, lin.in_features]))
            entries.append((base + ".lora_B.weight", code, itemsize, [lin.out_features, plan.rank]))
            if lin.name in EMBEDDING_LAYER_NAMES:
                entries.append((base + ".base_layer.weight", base_code, base_itemsize, [lin.out_features, lin.in_features]))
                if lin.bias:
                    entries.append((base + ".base_layer.bias", base_code, base_itemsize, [lin.out_features]))
    for p in plan.param_targets:
        r = p.adapter_rank(plan.rank)
        for i in range(p.count):
            base = "base_model.model." + p.path.replace("{i}", str(i))
            entries.append((base + ".lora_A.weight", code, itemsize, [r, p.in_features]))
            entries.append((base + ".lora_B.weight", code, itemsize, [p.out_features, r]))
    entries.sort(key=lambda e: (-_DTYPE_ORDER[e[1]], e[0]))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype_code, size, shape in entries:
        nbytes = size
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": dtype_code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    padded = -(-len(text) // 8) * 8
    return 8 + padded + offset
