"""Bytes of the model's weights in every storage format memplan supports.

Layouts follow bitsandbytes 0.50 `functional.py` and `nn/modules.py`, and
which modules get quantized follows transformers 5.x
`integrations/bitsandbytes.py::replace_with_bnb_linear` and
`quantizers/base.py::get_keys_to_not_convert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from memplan.model.spec import Linear, ModelSpec

__all__ = [
    "Quant",
    "FloatDtype",
    "QUANTS",
    "FLOAT_BYTES",
    "is_quantized",
    "is_four_bit",
    "QUANT_STORAGE_BYTES",
    "WeightBytes",
    "weight_bytes",
    "linear_quantized_bytes",
    "is_quantized_linear",
    "NF4_BLOCKSIZE",
]

Quant = Literal["bf16", "fp16", "fp32", "int8", "nf4", "fp4"]
FloatDtype = Literal["bf16", "fp16", "fp32"]
QUANTS: tuple[str, ...] = get_args(Quant)
FLOAT_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
# BitsAndBytesConfig(bnb_4bit_quant_storage=...): element size of the packed 4-bit storage.
QUANT_STORAGE_BYTES: dict[str, int] = {"uint8": 1, **FLOAT_BYTES}

# bitsandbytes/functional.py::quantize_4bit: blocksize defaults to 64.
NF4_BLOCKSIZE = 64
# functional.py::quantize_4bit with compress_statistics: absmax re-quantized with blocksize 256.
NESTED_BLOCKSIZE = 256
# functional.py::get_4bit_type: a 16-entry fp32 code table built per quantized tensor.
FOUR_BIT_CODE_BYTES = 16 * 4
# functional.py::quantize_blockwise: the nested state's code is name2qmap["dynamic"] (256 fp32
# values) copied per tensor (`code.to(A.device, copy=True)`), so every double-quantized
# linear holds its own 1 KiB copy (measured: tests/model/test_storage.py).
DYNAMIC_CODE_BYTES = 256 * 4


def is_quantized(quant: str) -> bool:
    """A bitsandbytes base (int8 `Linear8bitLt`, nf4/fp4 `Linear4bit`) rather than a float dtype."""
    return quant in ("int8", "nf4", "fp4")


def is_four_bit(quant: str) -> bool:
    """A `quantize_4bit` format (bitsandbytes/functional.py): nf4 or fp4."""
    return quant in ("nf4", "fp4")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def is_quantized_linear(lin: Linear) -> bool:
    """transformers' bnb integration replaces every nn.Linear/Conv1D except the
    output embedding (untied lm_head) and tied weights (quantizers/base.py)."""
    return not (lin.is_output or lin.tied)


def linear_quantized_bytes(lin: Linear, quant: Quant, *, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, quant-state bytes) of ONE instance of a quantized linear.

    - nf4/fp4 (`quantize_4bit`): ceil(n/2) uint8 (two codes per byte), one fp32
      absmax per 64-value block, and the 16-value fp32 code table. With double
      quantization the absmax become uint8 (`quantize_blockwise`, block 256) with one
      fp32 absmax per 256 blocks, a 0-d fp32 offset (`_absmax.mean()`) and its own
      copy of the 256-value fp32 dynamic code table.
    - int8 (`Int8Params._quantize` -> `int8_vectorwise_quant`): n int8 plus one fp32
      scale (SCB) per output row. Outliers are decomposed at run time, not stored.
    The bias is not quantized and is counted with the unquantized tensors.
    """
    n = lin.weight_numel
    if quant == "int8":
        return n, 4 * lin.out_features
    if is_four_bit(quant):
        packed = _ceil_div(n, 2)
        blocks = _ceil_div(n, NF4_BLOCKSIZE)
        if double_quant:
            nested = 4 * _ceil_div(blocks, NESTED_BLOCKSIZE) + 4 + DYNAMIC_CODE_BYTES
            state = blocks + nested + FOUR_BIT_CODE_BYTES
        else:
            state = 4 * blocks + FOUR_BIT_CODE_BYTES
        return packed, state
    raise ValueError(f"{quant} is not a quantized format")


@dataclass(frozen=True)
class WeightBytes:
    """Weight storage of a loaded model. Parts sum to `total`."""

    quantized: int  # packed int8 / 4-bit weights
    quant_state: int  # absmax, nested absmax, offsets, code tables, SCB
    unquantized: int  # embeddings, norms, biases, lm_head, experts... in the load dtype
    buffers: int  # rotary inv_freq, BERT position_ids, ...
    by_component: dict[str, int]  # sums to `total`

    @property
    def total(self) -> int:
        return self.quantized + self.quant_state + self.unquantized + self.buffers


def weight_bytes(spec: ModelSpec, quant: Quant, *, double_quant: bool = False, compute_dtype: FloatDtype = "bf16") -> WeightBytes:
    """Exact bytes of every storage the model holds after `from_pretrained`.

    For int8/nf4/fp4 the non-quantized parameters load in `compute_dtype`
    (the `dtype=` passed to `from_pretrained`); otherwise everything is `quant`.
    Ignores: allocator rounding (device terms add it) and `_keep_in_fp32_modules`,
    which is empty for every supported family in transformers 5.x.
    """
    float_bytes = FLOAT_BYTES[compute_dtype] if is_quantized(quant) else FLOAT_BYTES[quant]
    by: dict[str, int] = {}
    quantized = state = unq = 0
    for lin in spec.linears:
        bias = lin.out_features * float_bytes if lin.bias else 0
        if is_quantized(quant) and is_quantized_linear(lin):
            packed, st = linear_quantized_bytes(lin, quant, double_quant=double_quant)
            quantized += packed * lin.count
            state += st * lin.count
            unq += bias * lin.count
            part = (packed + st + bias) * lin.count
        else:
            own = (0 if lin.tied else lin.weight_numel * float_bytes) + bias
            unq += own * lin.count
            part = own * lin.count
        by[lin.component] = by.get(lin.component, 0) + part
    for t in spec.tensors:
        b = t.numel * t.count * float_bytes
        unq += b
        by[t.component] = by.get(t.component, 0) + b
    buffers = sum(b.loaded_bytes(float_bytes) for b in spec.buffers)
    if buffers:
        by["buffers"] = buffers
    return WeightBytes(quantized=quantized, quant_state=state, unquantized=unq, buffers=buffers, by_component=by)
