"""Launch settings that implement a plan's shared-base strategies.

- `lorax-launcher` flags for the `lorax` strategy, as defined in LoRAX `launcher/src/main.rs` (Args).
- `vllm serve` arguments for the `vllm_multi_lora` strategy, as defined in vLLM's `EngineArgs`
  (`vllm/engine/arg_utils.py`).
The values are the strategy's: its GPU and tensor-parallel degree, the KV budget it computed,
the adapter slots and CPU cache it sized, the context it was asked for. Nothing here computes;
it only names.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from memplan.model.catalog import catalog
from memplan.errors import SetupError
from memplan.serving.fleet import Plan

__all__ = ["Launch", "launch_settings", "ENGINES", "ENGINE_STRATEGY"]

ENGINES = ("lorax", "vllm")
# The plan's strategy each engine launches.
ENGINE_STRATEGY = {"lorax": "lorax", "vllm": "vllm_multi_lora"}
# LoRAX `--quantize` values (launcher Quantization enum) and vLLM `--quantization`.
_LORAX_QUANTIZE = {"int8": "bitsandbytes", "nf4": "bitsandbytes-nf4", "fp4": "bitsandbytes-fp4"}
_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Launch:
    engine: str
    program: tuple[str, ...]  # the command before the flags
    flags: tuple[tuple[str, str | None], ...]  # (flag, value or None for a switch)
    replicas: int  # how many of these to run (each on `tp` GPUs)
    tp: int
    gpu: str = ""  # the catalog GPU the strategy chose

    @property
    def argv(self) -> list[str]:
        out = list(self.program)
        for flag, value in self.flags:
            out.append(flag)
            if value is not None:
                out.append(value)
        return out

    def command(self) -> str:
        return " \\\n  ".join([shlex.join(list(self.program))] + [
            f"{flag} {shlex.quote(value)}" if value is not None else flag for flag, value in self.flags
        ])

    def to_dict(self) -> dict:
        return {"engine": self.engine, "gpu": self.gpu, "replicas": self.replicas, "tensor_parallel": self.tp, "argv": self.argv,
                "flags": {f: v for f, v in self.flags}}


def _model_id(name: str) -> str:
    for entry in catalog():
        if entry.name == name and entry.hf_id:
            return entry.hf_id
    return name


def launch_settings(p: Plan, engine: str) -> Launch:
    """The engine flags of `p`'s shared-base strategy for `engine`: `lorax` or `vllm_multi_lora`, on the GPU it chose."""
    if engine not in ENGINES:
        raise SetupError(f"--emit must be one of {', '.join(ENGINES)}, got {engine!r}")
    s = p.strategies[ENGINE_STRATEGY[engine]]
    inp, mem = p.inputs, s.memory
    gpu = s.gpu.key if s.gpu is not None else ""
    model = _model_id(p.inputs.model)
    replicas = max(1, math.ceil(s.replicas - 1e-9))
    if engine == "lorax":
        flags: list[tuple[str, str | None]] = [("--model-id", model)]
        if mem.tp > 1:
            flags += [("--sharded", "true"), ("--num-shard", str(mem.tp))]
        if inp.quant in _LORAX_QUANTIZE:
            flags.append(("--quantize", _LORAX_QUANTIZE[inp.quant]))
        elif inp.quant in ("bf16", "fp16"):
            flags.append(("--dtype", _DTYPE[inp.quant]))
        a = p.assumptions
        flags += [
            ("--adapter-memory-fraction", f"{a['adapter_memory_fraction']['value']:g}"),
            ("--max-active-adapters", str((s.adapters_resident or {}).get("gpu", 1))),
            ("--max-input-length", str(inp.prompt_tokens)),
            ("--max-total-tokens", str(inp.context_tokens)),
            ("--max-batch-prefill-tokens", str(max(a["prefill_batch_tokens"]["value"], inp.prompt_tokens))),
            ("--max-batch-total-tokens", str(mem.kv_blocks * a["kv_block_tokens"]["value"])),
        ]
        if a["lorax_cuda_memory_fraction"]["value"] != 1.0:
            flags.append(("--cuda-memory-fraction", f"{a['lorax_cuda_memory_fraction']['value']:g}"))
        return Launch(engine="lorax", program=("lorax-launcher",), flags=tuple(flags), replicas=replicas, tp=mem.tp, gpu=gpu)
    a = p.assumptions
    res = s.adapters_resident or {}
    flags = [
        ("--enable-lora", None),
        ("--max-loras", str(mem.max_loras)),
        ("--max-lora-rank", str(mem.max_lora_rank)),
        ("--max-cpu-loras", str(max(mem.max_loras, res.get("gpu", 0) + res.get("cpu", 0)))),
        ("--gpu-memory-utilization", f"{a['vllm_gpu_memory_utilization']['value']:g}"),
        ("--max-model-len", str(inp.context_tokens)),
        ("--max-num-seqs", str(a["max_batch_sequences"]["value"])),
        ("--max-num-batched-tokens", str(a["prefill_batch_tokens"]["value"])),
    ]
    if mem.tp > 1:
        flags.append(("--tensor-parallel-size", str(mem.tp)))
    if inp.quant in ("int8", "nf4"):
        flags.append(("--quantization", "bitsandbytes"))
    elif inp.quant in _DTYPE:
        flags.append(("--dtype", _DTYPE[inp.quant]))
    return Launch(engine="vllm", program=("vllm", "serve", model), flags=tuple(flags), replicas=replicas, tp=mem.tp, gpu=gpu)
