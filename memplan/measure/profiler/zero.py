"""DeepSpeed ZeRO stages 1-3 around one rank's model: the config Trainer builds, `deepspeed.initialize`, a step.

`wrap_zero(model, setup, ctx)` implements `sharded.Wrapped` for `--parallel zero1|zero2|zero3`:

- The config (`ds_config`) is what transformers' Trainer hands DeepSpeed: for `--recipe
  trainer|trl-sft|axolotl` the "auto" values `transformers/integrations/deepspeed.py::
  HfTrainerDeepSpeedConfig.trainer_config_finalize` fills in (reduce_bucket_size = h²,
  stage3_prefetch_bucket_size = 0.9·h², stage3_param_persistence_threshold = 10·h), for `--recipe
  plain` DeepSpeed's own defaults (`deepspeed/runtime/zero/config.py`: 5e8, 5e7, 1e5). bf16 (or
  fp16) is on when the model computes in it; AdamW is `torch.optim.AdamW` (`torch_adam: true`,
  `engine.py::get_optimizer_configuration`): FusedAdam needs a CUDA build, and its state is the
  same two fp32 moments per element of the partition.
- A step is Trainer's under DeepSpeed (accelerate's `DeepSpeedEngineWrapper`): `loss =
  engine(input_ids=..., labels=...).loss`, `engine.backward(loss)`, `engine.step()`, which clips,
  steps the fp32 partition, copies it back into the bf16 weights and zeroes the gradients.
- ZeRO-3: the runner loads the model as for every layout (`from_pretrained` without an
  `HfDeepSpeedConfig`, so without `deepspeed.zero.Init`) and `deepspeed.initialize` partitions it
  (`parameter_offload.py::DeepSpeedZeRoOffload._convert_to_zero_parameters`). The load phase thus
  holds the whole model on each rank, which Trainer's zero.Init load would not; the steady step
  measured afterwards is the same. 4-bit bases need a float `bnb_4bit_quant_storage` (Setup
  enforces it); bitsandbytes' quant state stays whole on every rank. ZeRO-3 also replaces
  F.linear process-wide (`zero/linear.py::LinearFunctionForZeroStage3`); `close()` undoes it.
- With bf16 on, `engine.py::_cast_module_mixed_precision` casts every float parameter to bf16,
  PEFT's fp32 LoRA adapters included, so adapters, their gradients and activations are bf16 here.

Categories: DeepSpeed's attributes are listed in `_STAGE12` / `_STAGE3` with the function that
makes each. The fp32 master partition is optimizer state, as the ZeRO paper counts it (K = 12
bytes per parameter for mixed-precision Adam: 4 for the fp32 copy + 8 for the moments,
arXiv:1910.02054 §3.1). Per-step buffers (ZeRO-1/2's reduce bucket, ZeRO-3's all-gathered
parameters) are gone by the time the runner adopts tensors, so the DeepSpeed methods that make
them are wrapped on this engine's instances to label them `comm_buffers` while they live
(`_install_labels`).

DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`) runs all three stages on gloo; it reports the
process RSS as `memory_allocated`, so the storage ledger is the measurement there.
"""

from __future__ import annotations

import functools
import importlib
import os
import weakref
from typing import Any, Callable

import torch

from memplan.errors import ProfileError
from memplan.training.setup import Setup

__all__ = ["ds_config", "wrap_zero", "ZeroWrapped", "DEEPSPEED_VERSION"]

DEEPSPEED_VERSION = "0.19.8"  # the version whose attribute names and defaults this module reads
_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3}
# build.make_optimizer's lr; transformers' TrainingArguments defaults for the rest.
_ADAMW = {"lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
COMM = "comm_buffers"  # sharded.COMM_BUFFERS

# deepspeed/runtime/zero/stage_1_and_2.py::DeepSpeedZeroOptimizer attributes -> ledger category.
_STAGE12 = {
    "bit16_groups_flat": "parameters",  # __init__: flatten_dense_tensors_aligned, all trainable params (not sharded)
    "single_partition_of_fp32_groups": "optimizer_state",  # __init__: fp32 clone of this rank's 1/N of them
    "averaged_gradients": "gradients",  # epilogue: get_flat_partition, views of grads_in_partition (+ zero padding)
    "grads_in_partition": "gradients",  # reduce_ipg_grads -> copy_grads_in_partition (stages 1 and 2, contiguous_gradients)
    "param_buffer_of_bit16_for_cpu_offload_groups": "parameters",  # offload: bf16 staging of the partition
    "temp_grad_buffer_for_gpu_offload": "gradients",  # offload: largest_param_numel each
    "temp_grad_buffer_for_cpu_offload": "gradients",
    "accumulated_grads_in_cpu": "gradients",
}
# deepspeed/runtime/zero/stage3.py::DeepSpeedZeroOptimizer_Stage3 attributes -> ledger category.
_STAGE3 = {
    "lp_param_buffer": "parameters",  # _create_fp16_partitions_with_defragmentation: trainable bf16 partitions
    "fp16_partitioned_groups_flat": "parameters",  # views of lp_param_buffer per sub group
    "fp32_partitioned_groups_flat": "optimizer_state",  # _create_fp32_partitions: fp32 master partitions
    "grad_partitions_flat_buffer": "gradients",  # _setup_for_real_optimizer: bf16, one partition of every param
    "averaged_gradients": "gradients",  # views of grad_partitions_flat_buffer
    "lp_param_contiguous_pin_buffer": "parameters",  # offload_param
}


def ds_config(setup: Setup, hidden_size: int) -> dict[str, Any]:
    """The DeepSpeed config a Trainer run of `setup` ends up with (after "auto" is filled in)."""
    stage = _STAGE[setup.parallel]
    zero: dict[str, Any] = {"stage": stage}
    if setup.recipe != "plain":
        # "auto", as Trainer users write it; transformers fills it in below (the stage-3 keys at stage 3).
        zero["reduce_bucket_size"] = "auto"
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = "auto"
            zero["stage3_param_persistence_threshold"] = "auto"
    if setup.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if setup.offload == "params_and_optimizer":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    low = setup.compute_dtype if setup.quant != "fp32" else "fp32"
    config = {
        "train_micro_batch_size_per_gpu": setup.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,  # TrainingArguments.max_grad_norm
        "zero_optimization": zero,
        "bf16": {"enabled": low == "bf16"},
        "fp16": {"enabled": low == "fp16"},
        "optimizer": {"type": "AdamW", "params": {**_ADAMW, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _fill_auto(config, hidden_size) if setup.recipe != "plain" else config


def _fill_auto(config: dict[str, Any], hidden_size: int) -> dict[str, Any]:
    """Trainer's own filler on the config: transformers/integrations/deepspeed.py::
    HfTrainerDeepSpeedConfig.trainer_config_finalize sets the hidden-size "auto" keys from
    `model.config.hidden_size` (the config has no scheduler, so of the TrainingArguments it only
    asks for warmup steps, which nothing here uses)."""
    from types import SimpleNamespace

    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(config)
    hf.trainer_config_finalize(SimpleNamespace(get_warmup_steps=lambda steps: 0),
                               SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size)), 1)
    return hf.config


def _tensors_in(value: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if depth > 3:
        return []
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v, depth + 1)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v, depth + 1)]
    return []


class ZeroWrapped:
    """One rank's DeepSpeedEngine, with the runner's step interface (`sharded.Wrapped`)."""

    def __init__(self, engine: Any, setup: Setup, config: dict[str, Any], trainable: list[torch.Tensor],
                 restore: Any = None) -> None:
        self.engine = engine
        self._restore = restore
        self.module = engine  # engine(**batch) runs the forward under ZeRO's hooks
        self.setup = setup
        self.config = config
        self.stage = _STAGE[setup.parallel]
        self._trainable = trainable  # the model's trainable parameters (ZeRO-3: their ds_tensor partitions)

    # ---- the step ----------------------------------------------------------------
    def backward(self, loss: Any) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        """Nothing left to free: engine.py::_take_model_step zeroed the gradients (set_to_none)."""

    def close(self) -> None:
        """Undo DeepSpeed's process-wide patch (ZeRO-3's F.linear) now rather than when the engine is collected."""
        if self._restore is not None:
            self._restore()  # a weakref.finalize: runs once

    # ---- what the ledger adopts --------------------------------------------------
    def _table(self) -> dict[str, str]:
        return _STAGE3 if self.stage == 3 else _STAGE12

    def _attrs(self, category: str) -> list[torch.Tensor]:
        opt = self.engine.optimizer
        return [t for name, cat in self._table().items() if cat == category for t in _tensors_in(getattr(opt, name, None))]

    def param_tensors(self) -> list[torch.Tensor]:
        from memplan.measure.profiler import build

        mod = self.engine.module
        out = list(mod.parameters()) + list(mod.buffers()) + build.quant_state_tensors(mod)
        out += [p.ds_tensor for p in mod.parameters() if getattr(p, "ds_tensor", None) is not None]  # ZeRO-3 partitions
        return out + self._attrs("parameters")

    def trainable_tensors(self) -> list[torch.Tensor]:
        if self.stage == 3:
            return [p.ds_tensor for p in self._trainable]
        return list(self._trainable)  # views of bit16_groups_flat: every rank holds them all

    def grad_tensors(self) -> list[torch.Tensor]:
        out = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        out += self._attrs("gradients")
        return out + [t.grad for t in self._attrs("optimizer_state") if t.grad is not None]

    def state_tensors(self) -> list[torch.Tensor]:
        inner = getattr(self.engine.optimizer, "optimizer", None)
        out = [t for st in (inner.state.values() if inner is not None else ()) for t in _tensors_in(st)]
        return out + self._attrs("optimizer_state")

    def _ipg(self) -> list[torch.Tensor]:
        return [t for b in getattr(self.engine.optimizer, "ipg_buckets", {}).values() for t in _tensors_in(getattr(b, "buffer", None))]

    def buffer_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Persistent buffers: ZeRO-3's reduce bucket (stage3.py::_setup_for_real_optimizer, IPGBucketZ3.buffer
        of reduce_bucket_size elements, made once). ZeRO-1/2 make theirs per backward; they are labelled then."""
        return {"ipg_bucket": self._ipg()} if self.stage == 3 and self._ipg() else {}

    def describe(self) -> dict[str, Any]:
        zc = self.engine._config.zero_config
        keys = ("stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
                "reduce_scatter", "use_multi_rank_bucket_allreduce", "prefetch_bucket_size", "param_persistence_threshold",
                "max_live_parameters", "max_reuse_distance", "sub_group_size", "round_robin_gradients")
        import deepspeed

        return {
            "wrapper": "DeepSpeedEngine",
            "optimizer": type(self.engine.optimizer).__name__,
            "inner_optimizer": type(getattr(self.engine.optimizer, "optimizer", None)).__name__,
            "deepspeed": deepspeed.__version__,
            "zero": {k: _plain(getattr(zc, k, None)) for k in keys},
            "bf16": self.config["bf16"]["enabled"],
            "buffers": self.buffers(),
        }

    def buffers(self) -> dict[str, dict[str, int]]:
        """DeepSpeed's own tensors on this rank, by attribute: count, elements, bytes of distinct storages."""
        opt = self.engine.optimizer
        out: dict[str, dict[str, int]] = {}
        for name in self._table():
            ts = _tensors_in(getattr(opt, name, None))
            if ts:
                out[name] = _sizes(ts)
        if self.stage == 3 and self._ipg():
            out["ipg_bucket"] = _sizes(self._ipg())
        inner = getattr(opt, "optimizer", None)
        if inner is not None and inner.state:
            out["optimizer.state"] = _sizes([t for st in inner.state.values() for t in _tensors_in(st)])
        if self.stage == 3:
            mod = self.engine.module
            out["ds_tensor"] = _sizes([p.ds_tensor for p in mod.parameters() if getattr(p, "ds_tensor", None) is not None])
            persist = [p for p in mod.parameters() if getattr(p, "ds_persist", False)]
            if persist:
                out["persistent_params"] = {"tensors": len(persist), "elements": sum(p.ds_numel for p in persist),
                                            "storage_bytes": sum(p.ds_numel * p.element_size() for p in persist)}
        return out


def _sizes(ts: list[torch.Tensor]) -> dict[str, int]:
    seen = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in ts if t.layout == torch.strided}
    return {"tensors": len(ts), "elements": sum(t.numel() for t in ts), "storage_bytes": sum(seen.values())}


def _plain(v: Any) -> Any:
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


# ---- per-step buffers, labelled while they live ------------------------------------------

def _active_ledger() -> Any:
    """The StorageLedger recording this rank (the innermost one on the dispatch-mode stack)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from memplan.measure.profiler.ledger import StorageLedger

    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, StorageLedger):
            return mode
    return None


def _label(led: Any, tensors: list[torch.Tensor], category: str, name: str) -> None:
    if category == COMM and COMM not in getattr(led, "categories", ()):
        category = "temporaries"
    if hasattr(led, "label"):
        led.label(tensors, category, name)
    else:
        led.adopt(tensors, category)


def _wrap_method(obj: Any, name: str, *, before: Callable[..., None] | None = None,
                 after: Callable[..., None] | None = None) -> None:
    """Replace `obj.name` on this instance by a call that runs `before(led)` / `after(led, out, *args)`."""
    orig = getattr(obj, name, None)
    if orig is None:  # another DeepSpeed version: its bytes are still counted, as temporaries
        return

    @functools.wraps(orig)
    def run(*args: Any, **kwargs: Any) -> Any:
        led = _active_ledger()
        if led is not None and before is not None:
            before(led)
        out = orig(*args, **kwargs)
        if led is not None and after is not None:
            after(led, out, *args)
        return out

    setattr(obj, name, run)


def _install_labels(engine: Any, stage: int) -> None:
    opt = engine.optimizer
    if stage in (1, 2):
        def ipg_buffers() -> list[torch.Tensor]:
            return [t for b in opt.ipg_buckets.values() for t in _tensors_in(getattr(b, "buffer", None))]

        # stage_1_and_2.py::setup_buckets (contiguous_gradients): one buffer of reduce_bucket_size
        # elements (two with overlap_comm) per backward, made at its first gradient hook and dropped by
        # _release_ipg_buffers in the epilogue; gradients are copied in and reduced from there.
        _wrap_method(opt, "setup_buckets", after=lambda led, out: _label(led, ipg_buffers(), COMM, "ipg_bucket"))
        # stage_1_and_2.py::allreduce_bucket: the flattened copy of the gradients it all-reduces
        # (average_tensor all-reduces whole buckets: use_multi_rank_bucket_allreduce=True). A bucket of
        # one tensor is not copied (torch._utils._flatten_dense_tensors returns a view of it).
        def flat_copy(led: Any, out: Any, *args: Any) -> None:
            inputs = {t.untyped_storage()._cdata for t in _tensors_in(args[:1])}
            if isinstance(out, torch.Tensor) and out.untyped_storage()._cdata not in inputs:
                _label(led, [out], COMM, "allreduce_bucket")

        _wrap_method(opt, "allreduce_bucket", after=flat_copy)

        # The gradients autograd left on the parameters before they are reduced (ZeRO-1 keeps all of
        # them until engine.py::allreduce_gradients -> reduce_gradients), except views into the bucket.
        def full_grads(led: Any) -> None:
            bucket = {t.untyped_storage()._cdata for t in ipg_buffers()}
            grads = [p.grad for g in opt.bit16_groups for p in g if p.grad is not None]
            led.adopt([g for g in grads if g.untyped_storage()._cdata not in bucket], "gradients")

        _wrap_method(opt, "reduce_gradients", before=full_grads)
        _wrap_method(opt, "independent_gradient_partition_epilogue", before=full_grads)
        return
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params
    from deepspeed.utils.z3_leaf_module import z3_leaf_module

    names = {id(m): n for n, m in engine.module.named_modules()}

    # partitioned_param_coordinator.py::fetch_sub_module all-gathers a module's parameters (and
    # prefetches the next ones up to stage3_prefetch_bucket_size) into full-size buffers
    # (partition_parameters.py::all_gather_coalesced); ds_persist parameters stay gathered for good.
    def gathered(led: Any, out: Any, module: Any, *a: Any) -> None:
        params = list(iter_params(module, recurse=z3_leaf_module(module)))
        _label(led, [p.data for p in params if not getattr(p, "ds_persist", False)], COMM,
               "allgather:" + (names.get(id(module)) or type(module).__name__))
        led.adopt([p.data for p in params if getattr(p, "ds_persist", False)], "parameters")

    _wrap_method(opt.parameter_offload.get_param_coordinator(), "fetch_sub_module", after=gathered)


def wrap_zero(model: Any, setup: Setup, ctx: Any) -> ZeroWrapped:
    """`deepspeed.initialize` on the initialised process group, the optimizer from the config."""
    if setup.parallel not in _STAGE:
        raise ProfileError(f"wrap_zero handles --parallel zero1/zero2/zero3, not {setup.parallel}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if setup.device == "cpu" else "cuda")
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
    try:
        import deepspeed

        # `import deepspeed.comm.torch as m` would bind the `torch` that deepspeed/comm/__init__.py imports.
        ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError as exc:
        raise ProfileError("--parallel zero1/zero2/zero3 needs DeepSpeed: pip install -e '.[profile]'") from exc
    # deepspeed/comm/torch.py::TorchBackend.__init__ JIT-compiles the CPU shared-memory op
    # (ShareMemCommBuilder: ~100 s of g++ on 2 cores), which only inference_all_reduce uses; training
    # collectives go through torch.distributed either way.
    ds_comm_torch.build_shm_op = lambda: None
    trainable = [p for p in model.parameters() if p.requires_grad]
    cfg = ds_config(setup, model.config.hidden_size)
    linear = torch.nn.functional.linear
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=cfg)
    if torch.nn.functional.linear is not linear:
        # ZeRO-3 replaces F.linear for the whole process (partition_parameters.py::Init.
        # _enable_mem_efficient_linear: LinearFunctionForZeroStage3, which saves every linear's input,
        # "persists unless manually reset"). A rank process runs several jobs: put it back when this
        # engine goes (or on close()), so the next job measures the plain F.linear.
        restore = weakref.finalize(engine, _restore_linear, linear)
    else:
        restore = None
    _install_labels(engine, _STAGE[setup.parallel])
    return ZeroWrapped(engine, setup, cfg, trainable, restore)


def _restore_linear(linear: Any) -> None:
    torch.nn.functional.linear = linear
