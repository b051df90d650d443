"""Gradients and optimizer states for the trainable tensors.

Rules, by the library code they mirror:
- torch.optim.AdamW (`torch/optim/adamw.py::_init_group`): `exp_avg` and
  `exp_avg_sq` are `zeros_like(p)` (the parameter's dtype); `step` is a 0-d fp32
  tensor kept on the CPU unless `capturable`/`fused`, so it costs device memory
  only when training on the CPU.
- torch.optim.AdamW(fused=True) (`adamw_fused`, TrainingArguments' `adamw_torch_fused`, its default
  optim from torch 2.8): the same two states, and `step` is a 0-d fp32 tensor on the parameter's
  device (`_init_group`: `capturable or fused`), so 4 bytes per tensor on CUDA too. The step
  (`adam.py::_fused_adam` -> `torch._fused_adamw_`, a CUDA and a CPU kernel in torch 2.13)
  updates param, exp_avg and exp_avg_sq in place, element by element: no sqrt list, no
  per-tensor temporaries (CPU ledger: estimate's optimizer-step temporaries are 0 for it).
- torch.optim.SGD (`torch/optim/sgd.py`): with momentum, one `momentum_buffer`
  cloned from the gradient (parameter dtype); without momentum, no state.
- bitsandbytes 8-bit (`bitsandbytes/optim/optimizer.py::Optimizer2State.init_state`):
  tensors with fewer than `min_8bit_size` = 4096 values keep two fp32 states;
  larger ones keep two uint8 states plus two fp32 absmax per 256 values, and share
  two 256-value fp32 qmaps.
- bitsandbytes 32-bit optimizers keep fp32 states whatever the parameter dtype.
- Paged variants (`get_state_buffer`): on CUDA, state buffers of tensors with at
  least 1e5 values live in unified memory (evictable); on the CPU nothing is paged.
- Gradients take the parameter's dtype (autograd accumulates into `p.grad`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["OptimizerBytes", "optimizer_bytes", "gradient_bytes", "MIN_8BIT_SIZE", "PAGED_MIN_NUMEL"]

MIN_8BIT_SIZE = 4096  # bnb Optimizer2State(min_8bit_size=4096)
PAGED_MIN_NUMEL = 100_000  # bnb Optimizer8bit.get_state_buffer: `p.numel() < 1e5` stays unpaged
BNB_BLOCKSIZE = 256  # bnb 8-bit blockwise state: one fp32 absmax per 256 values
QMAP_BYTES = 2 * 256 * 4  # name2qmap["dynamic"] and ["udynamic"], shared


@dataclass(frozen=True)
class OptimizerBytes:
    resident: int  # device memory that stays put
    paged: int  # unified memory, evictable to the host under pressure

    @property
    def total(self) -> int:
        return self.resident + self.paged


def gradient_bytes(numels: Sequence[int], itemsize: int) -> int:
    return sum(numels) * itemsize


def optimizer_bytes(optimizer: str, numels: Sequence[int], itemsize: int, *, device: str) -> OptimizerBytes:
    """State bytes for `numels` trainable tensors of element size `itemsize`."""
    n_tensors = len(numels)
    total = sum(numels)
    if optimizer == "adamw":
        step = 4 * n_tensors if device == "cpu" else 0
        return OptimizerBytes(2 * total * itemsize + step, 0)
    if optimizer == "adamw_fused":
        return OptimizerBytes(2 * total * itemsize + 4 * n_tensors, 0)
    if optimizer == "sgd":
        return OptimizerBytes(0, 0)
    if optimizer == "sgd_momentum":
        return OptimizerBytes(total * itemsize, 0)
    paged_ok = optimizer.startswith("paged") and device == "cuda"
    resident = paged = 0
    any_8bit = False
    for n in numels:
        if optimizer.endswith("8bit") and n >= MIN_8BIT_SIZE:
            any_8bit = True
            states, absmax = 2 * n, 2 * 4 * (-(-n // BNB_BLOCKSIZE))
        else:
            states, absmax = 2 * 4 * n, 0
        if paged_ok and n >= PAGED_MIN_NUMEL:
            paged += states
        else:
            resident += states
        resident += absmax
    if any_8bit:
        resident += QMAP_BYTES
    return OptimizerBytes(resident, paged)
