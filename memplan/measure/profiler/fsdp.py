"""DDP, FSDP1 and FSDP2 around a loaded, set-up model, as accelerate builds them for Trainer.

- FSDP1 (`torch/distributed/fsdp/fully_sharded_data_parallel.py::FullyShardedDataParallel`):
  the kwargs of `accelerate/accelerator.py::Accelerator.prepare_model` (FSDP branch) with the
  defaults of Trainer's fsdp_config: `use_orig_params=True`, `limit_all_gathers=True`,
  `backward_prefetch=BACKWARD_PRE`, `device_id` = this rank's device. The auto-wrap policy is
  `transformer_auto_wrap_policy` over `model._no_split_modules`
  (`accelerate/utils/dataclasses.py::FullyShardedDataParallelPlugin.set_auto_wrap_policy`), or
  for a PEFT model `peft/utils/other.py::fsdp_auto_wrap_policy` (decoder layers plus every
  trainable leaf, the LoRA A/B, in its own unit), which
  `transformers/distributed/fsdp.py::update_fsdp_plugin_peft` installs.
- FSDP2 (`torch/distributed/fsdp/_fully_shard/_fully_shard.py::fully_shard`): the order of
  `accelerate/utils/fsdp_utils.py::fsdp2_prepare_model`: every decoder layer (bottom-up), the
  input embedding when untied, one group of [final norm, output embedding] with
  `reshard_after_forward=False`, then the root with torch's default (None: False for the root).
- DDP (`torch/nn/parallel/distributed.py::DistributedDataParallel`) with Trainer's
  `find_unused_parameters` (`transformers/trainer.py::Trainer._build_accelerator_args`).

Mixed precision only under `--autocast` (accelerate's `set_mixed_precision`: param, reduce and
buffer/output dtype all the autocast dtype); FSDP1 and DDP also run the forward under
torch.autocast (`autocast_forward`), FSDP2 does not (accelerate's FSDP2 path never patches it).
Ignores: Trainer's QLoRA override
(`update_fsdp_plugin_peft` sets MixedPrecision(quant_storage) on FSDP1; without Trainer's
bf16=True autocast the fp32 LoRA input then meets a bf16 weight and F.linear refuses it),
`sync_module_states` and `cpu_ram_efficient_loading` (a broadcast at wrap time, no steady bytes).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from memplan.measure.profiler import build
from memplan.measure.profiler.run import LocalDriver
from memplan.measure.profiler.sharded import RankContext
from memplan.training.setup import Setup

__all__ = ["wrap_fsdp", "wrap_ddp", "module_quant_state_tensors", "autocast_forward"]

_STRATEGY = {"fsdp": "FULL_SHARD", "fsdp_shard_grad_op": "SHARD_GRAD_OP", "fsdp_hybrid": "HYBRID_SHARD"}


def module_quant_state_tensors(model: Any) -> list[torch.Tensor]:
    """bitsandbytes quant state on parameters (`build.quant_state_tensors`) and on Linear4bit
    modules (`bitsandbytes/nn/modules.py::Linear4bit.quant_state`, where
    `fix_4bit_weight_quant_state_from_module` finds it once FSDP2 replaced the Params4bit)."""
    out = build.quant_state_tensors(model)
    for m in model.modules():
        qs = getattr(m, "quant_state", None)
        if qs is not None and not isinstance(qs, torch.Tensor):
            out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                out += [t for t in (s2.absmax, s2.code, getattr(s2, "offset", None)) if isinstance(t, torch.Tensor)]
    return out


def autocast_forward(model: Any, setup: Setup) -> None:
    """Under `--autocast`, `model.forward` runs inside torch.autocast with its outputs converted
    to fp32, patched on the model before any wrapper, as `accelerate/accelerator.py::
    Accelerator.prepare_model` does for native AMP (`utils/operations.py::convert_outputs_to_fp32`)."""
    if setup.autocast == "none":
        return
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    device_type = "cuda" if setup.device == "cuda" else "cpu"
    autocast = torch.autocast(device_type, dtype=build.TORCH_DTYPES[setup.autocast])
    model.forward = MethodType(convert_outputs_to_fp32(autocast(model.forward.__func__)), model)


def _layer_classes(model: Any) -> set[type]:
    """The classes named in `_no_split_modules` (`accelerate/utils/dataclasses.py::get_module_class_from_name`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        from peft.utils.other import _get_no_split_modules

        names = set(_get_no_split_modules(model))
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _mp_dtype(setup: Setup) -> torch.dtype | None:
    return build.TORCH_DTYPES[setup.autocast] if setup.autocast != "none" else None


class _TorchWrapped(LocalDriver):
    """A torch-side wrapper (DDP, FSDP1, FSDP2) and its torch optimizer (made after wrapping, over
    the wrapped module's trainable parameters, as Trainer creates it for FSDP); backward, step,
    zero_grad, grad_tensors and state_tensors are the single-process driver's."""

    def __init__(self, module: Any, setup: Setup, facts: dict[str, Any]) -> None:
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build.make_optimizer(setup, self.params)
        # fp16 autocast: accelerate's GradScaler, ShardedGradScaler for FSDP1
        # (`accelerate/utils/modeling.py::get_grad_scaler`; torch/distributed/fsdp/sharded_grad_scaler.py).
        self.scaler = build.grad_scaler(setup)
        if self.scaler is not None and facts.get("wrapper") == "FullyShardedDataParallel":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler("cuda" if setup.device == "cuda" else "cpu")
        self.facts = facts

    def param_tensors(self) -> list[Any]:
        return list(self.module.parameters()) + list(self.module.buffers()) + module_quant_state_tensors(self.module)

    def trainable_tensors(self) -> list[Any]:
        return list(self.params)

    def buffer_tensors(self) -> dict[str, list[Any]]:
        return {}

    def describe(self) -> dict[str, Any]:
        return dict(self.facts)


class _Fsdp1(_TorchWrapped):
    def _handles(self) -> list[tuple[str, Any]]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        out = []
        for name, m in self.module.named_modules():
            if isinstance(m, FSDP) and m._handle is not None:
                out.append((name.replace("_fsdp_wrapped_module.", "") or "<root>", m._handle.flat_param))
        return out

    def param_tensors(self) -> list[Any]:
        return [fp for _, fp in self._handles()] + super().param_tensors()

    def grad_tensors(self) -> list[Any]:
        # The sharded gradient lives on the FlatParameter; with use_orig_params the original
        # parameters' .grad are views into it (_flat_param.py::_use_sharded_grad_views).
        return [fp.grad for _, fp in self._handles() if fp.grad is not None] + super().grad_tensors()

    def buffer_tensors(self) -> dict[str, list[Any]]:
        """Per unit: the padded unsharded FlatParameter (the all-gather output, storage resized
        to 0 when resharded: `torch/distributed/utils.py::_free_storage`) and, under mixed
        precision, the low-precision shard (`_flat_param.py::FlatParamHandle._init_param_attributes`)."""
        out: dict[str, list[Any]] = {}
        for name, fp in self._handles():
            for attr, tag in (("_full_param_padded", "unsharded"), ("_mp_shard", "mp_shard")):
                t = getattr(fp, attr, None)
                if isinstance(t, torch.Tensor):
                    out.setdefault(f"{tag}:{name}", []).append(t)
        return out


class _Fsdp2(_TorchWrapped):
    def _groups(self) -> list[tuple[str, Any]]:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        out = []
        for name, m in self.module.named_modules():
            if isinstance(m, FSDPModule):
                for group in fully_shard.state(m)._fsdp_param_groups:
                    out.append((name or "<root>", group))
        return out

    def buffer_tensors(self) -> dict[str, list[Any]]:
        """Per group: each FSDPParam's all-gather outputs (`_fsdp_param.py::FSDPParam.init_all_gather_outputs`,
        resized to 0 by `free_storage` when resharded) and unsharded inner tensors."""
        out: dict[str, list[Any]] = {}
        for name, group in self._groups():
            for fp in group.fsdp_params:
                out.setdefault(f"unsharded:{name}", []).extend(list(fp.all_gather_outputs) + list(fp._unsharded_inner_tensors))
        return out


def _fsdp1(model: Any, setup: Setup, ctx: RankContext) -> _Fsdp1:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if _is_peft(model):
        from peft.utils.other import fsdp_auto_wrap_policy

        policy = fsdp_auto_wrap_policy(model)
    else:
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=_layer_classes(model))
    dtype = _mp_dtype(setup)
    autocast_forward(model, setup)
    kwargs: dict[str, Any] = dict(
        sharding_strategy=ShardingStrategy[_STRATEGY[setup.parallel]],
        auto_wrap_policy=policy,
        use_orig_params=True,
        limit_all_gathers=True,
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
        forward_prefetch=False,
        device_id=ctx.device,
    )
    if dtype is not None:
        kwargs["mixed_precision"] = MixedPrecision(param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype)
    if setup.offload == "params_and_optimizer":
        kwargs["cpu_offload"] = CPUOffload(offload_params=True)
    if setup.parallel == "fsdp_hybrid":
        # HYBRID_SHARD over a (nodes, gpus_per_node) mesh: shard inside a node, replicate across
        # (fully_sharded_data_parallel.py: device_mesh instead of the CUDA-count default groups).
        nodes = ctx.world_size // setup.gpus_per_node
        kwargs["device_mesh"] = init_device_mesh(ctx.device.type, (nodes, setup.gpus_per_node), mesh_dim_names=("replicate", "shard"))
    wrapped = FSDP(model, **kwargs)
    units = sum(1 for m in wrapped.modules() if isinstance(m, FSDP))
    facts = {"wrapper": "FullyShardedDataParallel", "sharding_strategy": _STRATEGY[setup.parallel], "units": units,
             "use_orig_params": True, "mixed_precision": str(dtype).replace("torch.", "") if dtype else None}
    return _Fsdp1(wrapped, setup, facts)


def _fsdp2(model: Any, setup: Setup, ctx: RankContext) -> _Fsdp2:
    from accelerate.utils.fsdp_utils import _find_final_norm
    from accelerate.utils.other import get_module_children_bottom_up
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if setup.parallel == "fsdp_hybrid":  # HSDP: replicate across nodes, shard within (fully_shard's 2-D mesh)
        nodes = ctx.world_size // setup.gpus_per_node
        mesh = init_device_mesh(ctx.device.type, (nodes, setup.gpus_per_node), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    dtype = _mp_dtype(setup)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype, output_dtype=dtype) if dtype else MixedPrecisionPolicy()
    kwargs: dict[str, Any] = dict(
        mesh=mesh,
        # accelerate's FSDP2 plugin: reshard_after_forward follows the sharding strategy name.
        reshard_after_forward=setup.parallel != "fsdp_shard_grad_op",
        mp_policy=mp,
        offload_policy=CPUOffloadPolicy() if setup.offload == "params_and_optimizer" else OffloadPolicy(),
    )
    layers = tuple(_layer_classes(model))
    units = 0
    for module in get_module_children_bottom_up(model)[:-1]:
        if layers and isinstance(getattr(module, "_checkpoint_wrapped_module", module), layers) and not isinstance(module, FSDPModule):
            fully_shard(module, **kwargs)
            units += 1
    input_embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output_embed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = input_embed is not None and output_embed is not None and getattr(input_embed, "weight", None) is getattr(output_embed, "weight", None)
    if not tied and input_embed is not None and not isinstance(input_embed, FSDPModule):
        fully_shard(input_embed, **kwargs)
        units += 1
    final_norm = _find_final_norm(model)
    tail = [m for m in ((final_norm, input_embed, output_embed) if tied else (final_norm, output_embed))
            if m is not None and not isinstance(m, FSDPModule)]
    if tail:
        fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
        units += 1
    root = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}
    fully_shard(model, **root)
    facts = {"wrapper": "fully_shard", "reshard_after_forward": kwargs["reshard_after_forward"], "units": units + 1,
             "mesh": list(mesh.shape), "mixed_precision": str(dtype).replace("torch.", "") if dtype else None}
    return _Fsdp2(model, setup, facts)


def wrap_fsdp(model: Any, setup: Setup, ctx: RankContext) -> _TorchWrapped:
    """FSDP1 or FSDP2 (`setup.fsdp_version`) around `model`, with its optimizer (on gloo, its
    collectives are settled: `sharded.py` calls `collectives.settle_collectives`)."""
    return _fsdp2(model, setup, ctx) if setup.fsdp_version == 2 else _fsdp1(model, setup, ctx)


def wrap_ddp(model: Any, setup: Setup, ctx: RankContext) -> _TorchWrapped:
    """DistributedDataParallel with Trainer's find_unused_parameters: off for a transformers model
    under checkpointing, on otherwise (a PEFT model is not a PreTrainedModel)."""
    from torch.nn.parallel import DistributedDataParallel
    from transformers import PreTrainedModel

    find_unused = not setup.grad_checkpointing if isinstance(model, PreTrainedModel) else True
    autocast_forward(model, setup)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)
    return _TorchWrapped(wrapped, setup, {"wrapper": "DistributedDataParallel", "find_unused_parameters": find_unused,
                                          "bucket_cap_mb": wrapped.bucket_bytes_cap // (1024 * 1024)})
