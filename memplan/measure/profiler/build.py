"""Build a model the way a user's fine-tuning script does, from a config alone.

1. `AutoConfig.for_model(**config)` (truncated to `--layers`), random weights
   in the load dtype, `save_pretrained` as safetensors into a checkpoint cache
   (one per config and dtype, shared by every run of a campaign).
2. `from_pretrained(dtype=..., quantization_config=BitsAndBytesConfig(...),
   device_map={"": device}, attn_implementation=...)`: the real loading path,
   bitsandbytes quantization included.
3. PEFT LoRA (`get_peft_model`), optionally `prepare_model_for_kbit_training`,
   gradient checkpointing with `use_reentrant=False`, and the optimizer.
No hub access: nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from memplan.errors import ProfileError
from memplan.training.setup import Setup
from memplan.model.spec import ModelSpec
from memplan.model.storage import is_four_bit

__all__ = ["TORCH_DTYPES", "checkpoint_for", "load_model", "apply_training_setup", "make_optimizer", "quant_state_tensors",
           "training_forward", "grad_scaler"]

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTN_IMPLEMENTATION = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}
# Keys of a config.json that describe a checkpoint, not the architecture.
_DROP_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map", "quantization_config")


def _model_class(spec: ModelSpec) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM if spec.is_causal_lm else transformers.AutoModelForMaskedLM


def hf_config(spec: ModelSpec) -> Any:
    from transformers import AutoConfig

    raw = {k: v for k, v in spec.config.items() if k not in _DROP_KEYS}
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


def checkpoint_for(spec: ModelSpec, dtype: str, cache_dir: Path, *, init_device: str = "cpu") -> Path:
    """A safetensors checkpoint with random weights for `spec` in `dtype`, made once per cache.

    Made in a private folder and renamed into place, so concurrent workers never
    read a half-written checkpoint. With `init_device="cuda"` the weights are
    initialised on the GPU in a separate process (seconds instead of minutes for a
    7B model, and the measuring process's CUDA context stays untouched).
    """
    import transformers

    digest = hashlib.sha256(
        json.dumps([spec.config, dtype, transformers.__version__], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name)[:60]
    final = Path(cache_dir) / f"{safe_name}-{dtype}-{digest}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if init_device == "cpu":
        _make_checkpoint(spec, dtype, final, "cpu")
        return final
    job = json.dumps({"config": spec.config, "name": spec.name, "dtype": dtype, "final": str(final), "device": init_device})
    proc = subprocess.run([sys.executable, "-m", "memplan.measure.profiler.build", job], capture_output=True, text=True)
    if proc.returncode != 0 or not (final / "config.json").is_file():
        tail = " | ".join([ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-3:])[-500:]
        raise RuntimeError(f"making the random checkpoint failed (status {proc.returncode}): {tail}")
    return final


def _make_checkpoint(spec: ModelSpec, dtype: str, final: Path, device: str) -> None:
    work = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        with torch.device(device):
            model = _model_class(spec).from_config(hf_config(spec), dtype=TORCH_DTYPES[dtype])
        model.save_pretrained(work)
        del model
        try:
            os.rename(work, final)
        except OSError:  # another worker finished first; use theirs
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quantization_config(setup: Setup) -> Any:
    from transformers import BitsAndBytesConfig

    if setup.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if is_four_bit(setup.quant):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=setup.quant,
            bnb_4bit_use_double_quant=setup.double_quant,
            bnb_4bit_compute_dtype=TORCH_DTYPES[setup.compute_dtype],
            # A float storage packs the 4-bit data into float elements so FSDP/ZeRO-3 can flatten
            # them (bitsandbytes docs/source/fsdp_qlora.md); uint8 is bitsandbytes' default.
            bnb_4bit_quant_storage=torch.uint8 if setup.quant_storage == "uint8" else TORCH_DTYPES[setup.quant_storage],
        )
    return None


def load_model(spec: ModelSpec, setup: Setup, checkpoint: Path) -> Any:
    """`from_pretrained` through the real path, quantizing on load for int8/nf4/fp4."""
    kwargs: dict[str, Any] = {
        "dtype": TORCH_DTYPES[setup.param_dtype],
        "device_map": {"": torch.cuda.current_device() if setup.device == "cuda" else "cpu"},  # a rank's own GPU
        "attn_implementation": ATTN_IMPLEMENTATION[setup.attention],
    }
    qcfg = _quantization_config(setup)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    return _model_class(spec).from_pretrained(str(checkpoint), **kwargs)


def _enable_checkpointing(model: Any) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_training_setup(model: Any, spec: ModelSpec, setup: Setup) -> Any:
    """LoRA adapters (PEFT) or full fine-tuning, checkpointing, train mode."""
    if setup.method == "lora":
        import peft

        if setup.prepare_kbit_training:
            # The setup's own --grad-checkpointing decides, rather than PEFT's default (True).
            model = peft.prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=setup.grad_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif setup.grad_checkpointing:
            _enable_checkpointing(model)
        cfg_kwargs: dict[str, Any] = {
            "r": setup.lora_rank,
            "lora_alpha": 2 * setup.lora_rank,
            "lora_dropout": setup.lora_dropout,
            "target_modules": _lora_targets(spec, setup),
        }
        if setup.modules_to_save:
            # ModulesToSaveWrapper: a trainable deepcopy of each (peft/utils/other.py).
            cfg_kwargs["modules_to_save"] = list(setup.modules_to_save)
        if spec.is_causal_lm:
            cfg_kwargs["task_type"] = "CAUSAL_LM"
        model = peft.get_peft_model(model, peft.LoraConfig(**cfg_kwargs))
    elif setup.grad_checkpointing:
        _enable_checkpointing(model)
    model.train()
    return model


def _lora_targets(spec: ModelSpec, setup: Setup) -> Any:
    """The setup's targets, or PEFT's per-family default looked up here (memplan's where PEFT has none).

    Passing the default explicitly equals what `LoraModel._prepare_adapter_config`
    does with `target_modules=None`, except that PEFT 0.21 + transformers 5 empties
    the field for MoE models (Mixtral) before the lookup and then finds nothing.
    """
    if setup.lora_targets is not None:
        return "all-linear" if tuple(setup.lora_targets) == ("all-linear",) else list(setup.lora_targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    from memplan.model.architectures import DEFAULT_LORA_TARGETS

    # PEFT 0.21 has no phi3 entry; there memplan's own choice (what the estimator assumes) applies.
    default = DEFAULTS.get(spec.model_type) or DEFAULT_LORA_TARGETS.get(spec.model_type)
    if default is None:
        raise ProfileError(f"PEFT has no default LoRA targets for {spec.model_type}; pass --lora-targets")
    return default if isinstance(default, str) else list(default)


def make_optimizer(setup: Setup, params: list[Any]) -> Any:
    """The optimizer named by `setup.optimizer` (names as in transformers' TrainingArguments.optim)."""
    lr = 1e-5
    if setup.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if setup.optimizer == "adamw_fused":  # TrainingArguments optim="adamw_torch_fused"
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if setup.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if setup.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    }[setup.optimizer]
    return cls(params, lr=lr)


def quant_state_tensors(model: Any) -> list[Any]:
    """bitsandbytes state kept beside the packed weights, outside parameters and buffers.

    Params4bit.quant_state (`bitsandbytes/functional.py::QuantState`): absmax, code,
    offset, and the nested state2 (absmax, code). Int8Params: SCB (row scales) and
    CB (the int8 matrix, the weight's own storage).
    """
    out: list[Any] = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out += [qs.absmax, qs.code, getattr(qs, "offset", None)]
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                out += [s2.absmax, s2.code, getattr(s2, "offset", None)]
        for attr in ("SCB", "CB"):
            t = getattr(p, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    for m in model.modules():  # bnb Linear8bitLt keeps a MatmulLtState with CB/SCB copies
        state = getattr(m, "state", None)
        for attr in ("CB", "SCB"):
            t = getattr(state, attr, None) if state is not None else None
            if isinstance(t, torch.Tensor):
                out.append(t)
    return [t for t in out if isinstance(t, torch.Tensor)]


if __name__ == "__main__":  # python -m memplan.measure.profiler.build JOB_JSON: make one checkpoint
    from memplan.model.architectures import spec_from_config

    _job = json.loads(sys.argv[1])
    _make_checkpoint(spec_from_config(_job["config"], name=_job["name"]), _job["dtype"], Path(_job["final"]), _job["device"])


def training_forward(model: Any, setup: Setup) -> Any:
    """The callable a training step runs. Under `--autocast` it is what accelerate's
    `Accelerator.prepare_model` installs for Trainer's bf16=True / fp16=True: the forward
    inside `torch.autocast`, its fp16/bf16 outputs converted to fp32
    (`accelerate/accelerator.py::prepare_model`, `utils/operations.py::convert_outputs_to_fp32`)."""
    if setup.autocast == "none":
        return model
    from accelerate.utils import convert_outputs_to_fp32

    device_type = "cuda" if setup.device == "cuda" else "cpu"
    return convert_outputs_to_fp32(torch.autocast(device_type, dtype=TORCH_DTYPES[setup.autocast])(model.forward))


def grad_scaler(setup: Setup) -> Any:
    """Trainer's fp16=True scales the loss (`torch.amp.GradScaler`); None otherwise."""
    if setup.autocast != "fp16":
        return None
    return torch.amp.GradScaler("cuda" if setup.device == "cuda" else "cpu")

