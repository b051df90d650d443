"""The parallel layout of a training run: how many GPUs, and how the model is spread over them.

`Setup` carries these fields (`gpus`, `gpus_per_node`, `parallel`, `fsdp_version`, `offload`,
`quant_storage`); this module names their values and refuses the combinations the libraries
refuse, each with one line that says what to change. `memplan.training.sharding` turns a valid
layout into per-GPU and host bytes.

Layouts (what accelerate / transformers' Trainer build from their fsdp / deepspeed settings):
- `ddp`: torch DistributedDataParallel, every rank holds everything.
- `fsdp` (FULL_SHARD), `fsdp_shard_grad_op` (SHARD_GRAD_OP), `fsdp_hybrid` (HYBRID_SHARD: shard
  inside a node, replicate across nodes); `fsdp_version` 1 is `FullyShardedDataParallel`
  (FlatParameter per wrapped unit, `use_orig_params=True` as accelerate sets it), 2 is
  `torch.distributed.fsdp.fully_shard` (per-parameter sharding).
- `zero1`, `zero2`, `zero3`: DeepSpeed ZeRO stages (arXiv:1910.02054).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

from memplan.errors import SetupError
from memplan.model.storage import is_four_bit

if TYPE_CHECKING:
    from memplan.training.setup import Setup

__all__ = ["Parallel", "PARALLELS", "Offload", "OFFLOADS", "QuantStorage", "QUANT_STORAGES", "FSDP_VERSIONS",
           "is_fsdp", "is_zero", "shards_parameters", "check_layout", "MAX_GPUS", "default_gpus_per_node"]

Parallel = Literal["none", "ddp", "fsdp", "fsdp_shard_grad_op", "fsdp_hybrid", "zero1", "zero2", "zero3"]
PARALLELS: tuple[str, ...] = get_args(Parallel)
# FSDP's CPUOffload(offload_params=True) moves parameters and gradients to the host and runs the
# optimizer there; DeepSpeed offloads the optimizer (stages 1-3) or parameters too (stage 3 only).
Offload = Literal["none", "optimizer", "params_and_optimizer"]
OFFLOADS: tuple[str, ...] = get_args(Offload)
# transformers' BitsAndBytesConfig(bnb_4bit_quant_storage=...): the dtype the packed 4-bit data is
# stored in. A float storage packs 4-bit values into float elements so FSDP/ZeRO-3 can flatten them.
QuantStorage = Literal["uint8", "bf16", "fp16", "fp32"]
QUANT_STORAGES: tuple[str, ...] = get_args(QuantStorage)
FSDP_VERSIONS = (1, 2)
MAX_GPUS = 100_000


def is_fsdp(parallel: str) -> bool:
    return parallel.startswith("fsdp")


def is_zero(parallel: str) -> bool:
    return parallel.startswith("zero")


def shards_parameters(parallel: str) -> bool:
    """Layouts that flatten/partition the model's parameters themselves (so every weight must be a float)."""
    return is_fsdp(parallel) or parallel == "zero3"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def default_gpus_per_node() -> int:
    """GPUs in one server when --gpus-per-node is not given: the built-in GPU catalog's node
    (data/gpus.json `gpus_per_node`, an 8-GPU cloud instance, with its source)."""
    from memplan.hardware.gpus import gpu_catalog

    return gpu_catalog().gpus_per_node


def check_layout(setup: "Setup") -> int:
    """Refuse impossible layouts (raises SetupError); return the resolved `gpus_per_node`."""
    gpus = setup.gpus
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1 or gpus > MAX_GPUS:
        raise SetupError(f"--gpus must be a whole number of GPUs from 1 to {MAX_GPUS:,}, got {gpus!r}")
    per_node = setup.gpus_per_node
    if per_node is None:
        per_node = min(gpus, default_gpus_per_node())
    elif isinstance(per_node, bool) or not isinstance(per_node, int) or per_node < 1:
        raise SetupError(f"--gpus-per-node must be a positive integer, got {per_node!r}")
    per_node = min(per_node, gpus)
    if gpus % per_node:
        raise SetupError(f"--gpus {gpus} is not a whole number of nodes of {per_node} GPUs; use a multiple of --gpus-per-node")
    p = setup.parallel
    if p not in PARALLELS:
        raise SetupError(f"--parallel must be one of {', '.join(PARALLELS)}, got {p!r}")
    if p == "none" and gpus > 1:
        raise SetupError(f"--gpus {gpus} needs a layout: add --parallel ddp, fsdp, zero2 or zero3 (or use --gpus 1)")
    if setup.fsdp_version not in FSDP_VERSIONS:
        raise SetupError(f"--fsdp-version must be 1 or 2, got {setup.fsdp_version!r}")
    if setup.fsdp_version != 1 and not is_fsdp(p):
        raise SetupError(f"--fsdp-version applies to --parallel fsdp*, not {p}; drop it")
    if setup.offload not in OFFLOADS:
        raise SetupError(f"--offload must be one of {', '.join(OFFLOADS)}, got {setup.offload!r}")
    if setup.offload != "none":
        if not (is_fsdp(p) or is_zero(p)):
            raise SetupError(f"--offload needs --parallel fsdp or zero1/2/3 (DDP and one GPU offload nothing); got --parallel {p}")
        if is_fsdp(p) and setup.offload == "optimizer":
            # torch/distributed/fsdp/api.py::CPUOffload has one switch, offload_params, which also
            # puts gradients and the optimizer step on the host.
            raise SetupError("FSDP offloads parameters and optimizer together (CPUOffload(offload_params=True)); "
                             "use --offload params_and_optimizer, or zero1/zero2 for optimizer-only offload")
        if is_zero(p) and setup.offload == "params_and_optimizer" and p != "zero3":
            # deepspeed/runtime/zero/config.py: offload_param is only valid with stage 3.
            raise SetupError(f"DeepSpeed offloads parameters only at stage 3; use --parallel zero3, or --offload optimizer with {p}")
        if setup.device == "cpu" and not is_zero(p):
            # DeepSpeed's CPU accelerator runs ZeRO-Offload (its "device" and host buffers share the RAM, which is
            # how the profiler checks the offload terms); FSDP's CPUOffload has no device to move from there.
            raise SetupError("--offload moves state from the GPU to the host; with --device cpu there is no GPU to offload from")
    if setup.quant_storage not in QUANT_STORAGES:
        raise SetupError(f"--quant-storage must be one of {', '.join(QUANT_STORAGES)}, got {setup.quant_storage!r}")
    if setup.quant_storage != "uint8" and not is_four_bit(setup.quant):
        raise SetupError(f"--quant-storage is bnb_4bit_quant_storage (nf4/fp4 only), not {setup.quant}; drop it")
    if shards_parameters(p):
        if setup.quant == "int8":
            raise SetupError(f"--parallel {p} cannot shard bitsandbytes int8 weights (Int8Params and their row statistics); "
                             "use nf4 with --quant-storage bf16, or --parallel ddp/zero1/zero2")
        if is_four_bit(setup.quant) and setup.quant_storage == "uint8":
            # torch/distributed/fsdp/_flat_param.py::FlatParamHandle._validate_tensors_to_flatten refuses
            # non-float tensors; bitsandbytes docs/source/fsdp_qlora.md: the storage must match the dtype.
            raise SetupError(f"--parallel {p} cannot flatten a uint8 4-bit base; add --quant-storage {setup.compute_dtype} "
                             "(bnb_4bit_quant_storage = the compute dtype, as bitsandbytes' FSDP-QLoRA guide says)")
        if is_four_bit(setup.quant) and p == "fsdp_shard_grad_op" and setup.fsdp_version == 1:
            # Measured on the CPU profiler (torch 2.13): bitsandbytes swaps Params4bit data in forward, which
            # torch/distributed/fsdp/_flat_param.py::FlatParamHandle._writeback_orig_params refuses
            # ("FSDP does not support changing the parameters between forward and backward for SHARD_GRAD_OP").
            raise SetupError("FSDP1 SHARD_GRAD_OP cannot train a 4-bit base (bitsandbytes changes the parameters between "
                             "forward and backward); use --parallel fsdp, or --fsdp-version 2")
        if is_four_bit(setup.quant) and setup.quant_storage != setup.compute_dtype:
            raise SetupError(f"--quant-storage {setup.quant_storage} must equal --compute-dtype {setup.compute_dtype} under "
                             f"--parallel {p}: every parameter in a shard group has one dtype")
    if is_zero(p) and setup.optimizer not in ("adamw", "sgd", "sgd_momentum"):
        # DeepSpeed's ZeRO optimizer keeps its own fp32 partitions for torch AdamW/SGD; bnb 8-bit and paged
        # optimizers are not what Trainer hands it (transformers/integrations/deepspeed.py::deepspeed_optim_sched).
        raise SetupError(f"--optimizer {setup.optimizer} is not modelled under DeepSpeed ZeRO; use --optimizer adamw")
    return per_node
