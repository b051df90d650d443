"""GPU memory of one serving replica: weights, KV cache, workspace, adapters.

Mirrors how the engines size their KV cache at start-up:
- vLLM (`vllm/v1/worker/gpu_worker.py::determine_available_memory`): the budget is
  total x `gpu_memory_utilization`; weights, the profiled activation peak, CUDA
  graphs and the LoRA slots come off it, and the rest is KV cache in blocks.
- LoRAX (`server/lorax_server/models/flash_causal_lm.py::warmup`): free memory after
  the warm-up prefill, minus `adapter_memory_fraction` x total, times
  `MEMORY_WIGGLE_ROOM`, divided by the block size.
Every constant comes from `data/serving.json` through `Assumptions`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, Literal, Mapping

from memplan.errors import ConfigError, SetupError
from memplan.hardware.gpus import GPU, GPUCatalog, gpu_catalog
from memplan.model.lora import LoraPlan
from memplan.paths import data_dir
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, weight_bytes

__all__ = [
    "Assumptions",
    "assumptions",
    "ServingError",
    "Engine",
    "ServingMemory",
    "serving_memory",
    "kv_bytes_per_token",
    "vllm_lora_slot_bytes",
    "smallest_tensor_parallel_fit",
    "tensor_parallel_replicas",
    "no_fit_message",
    "TP_DEGREES",
    "VLLM_MAX_LORA_RANKS",
    "assumptions_payload",
]

Engine = Literal["vllm", "lorax"]
TP_DEGREES = (1, 2, 4, 8)
# vllm/config LoRAConfig: max_lora_rank must be one of these.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
FP32 = 4


class ServingError(SetupError):
    """A serving plan that cannot be built (the model does not fit, a bad override)."""


# Physical ceilings of the assumptions that have one (a month has at most 744 hours; no KV
# element is wider than fp64; PCIe 6 x16 is 128 GB/s, 10**13 B/s leaves room for any link).
_CEILINGS: dict[str, float] = {
    "kv_block_tokens": 2**20, "kv_cache_bytes_per_element": 8, "cuda_context_bytes": 2**40, "cuda_graph_bytes": 2**40,
    "prefill_batch_tokens": 10**7, "max_batch_sequences": 10**6, "lorax_max_active_adapters": 10**7,
    "host_adapter_cache_bytes": 2**50, "pcie_gen3_bytes_per_s": 1e13, "pcie_gen4_bytes_per_s": 1e13,
    "pcie_gen5_bytes_per_s": 1e13, "storage_bytes_per_s": 1e13, "adapter_swap_overhead_s": 3600.0,
    "lorax_adapter_batch_overhead": 100.0, "vllm_lora_kernel_overhead": 100.0, "train_seq_len": 10**7, "train_batch_size": 10**6, "hours_per_month": 744.0,
    "scale_to_zero_idle_s": 31 * 86400.0,
}


@dataclass(frozen=True)
class Assumptions:
    """Named, documented, overridable constants (values in `data/serving.json`)."""

    kv_block_tokens: int
    kv_cache_bytes_per_element: int
    cuda_context_bytes: int
    cuda_graph_bytes: int
    prefill_batch_tokens: int
    max_batch_sequences: int
    vllm_gpu_memory_utilization: float
    lorax_cuda_memory_fraction: float
    lorax_memory_wiggle_room: float
    adapter_memory_fraction: float
    lorax_max_active_adapters: int
    adapter_save_dtype: str
    host_adapter_cache_bytes: int
    pcie_gen3_bytes_per_s: float
    pcie_gen4_bytes_per_s: float
    pcie_gen5_bytes_per_s: float
    storage_bytes_per_s: float
    adapter_swap_overhead_s: float
    decode_bandwidth_efficiency: float
    prefill_compute_efficiency: float
    lorax_adapter_batch_overhead: float
    vllm_lora_kernel_overhead: float
    training_mfu: float
    train_seq_len: int
    train_batch_size: int
    train_grad_checkpointing: bool
    train_optimizer: str
    checkpoint_dtype: str
    hours_per_month: float
    scale_to_zero_idle_s: float
    units: Mapping[str, str] = field(default_factory=dict, compare=False)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("vllm_gpu_memory_utilization", "lorax_cuda_memory_fraction", "lorax_memory_wiggle_room",
                     "decode_bandwidth_efficiency", "prefill_compute_efficiency", "training_mfu"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ServingError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if not 0.0 <= self.adapter_memory_fraction < self.lorax_cuda_memory_fraction:
            raise ServingError(f"adapter_memory_fraction must be in [0, lorax_cuda_memory_fraction), got {self.adapter_memory_fraction!r}")
        for name in ("kv_block_tokens", "kv_cache_bytes_per_element", "prefill_batch_tokens", "max_batch_sequences",
                     "lorax_max_active_adapters", "pcie_gen3_bytes_per_s", "pcie_gen4_bytes_per_s", "pcie_gen5_bytes_per_s",
                     "storage_bytes_per_s", "train_seq_len", "train_batch_size", "hours_per_month"):
            if getattr(self, name) <= 0:
                raise ServingError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("cuda_context_bytes", "cuda_graph_bytes", "host_adapter_cache_bytes", "adapter_swap_overhead_s",
                     "lorax_adapter_batch_overhead", "vllm_lora_kernel_overhead", "scale_to_zero_idle_s"):
            if getattr(self, name) < 0:
                raise ServingError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("adapter_save_dtype", "checkpoint_dtype"):
            if getattr(self, name) not in FLOAT_BYTES:
                raise ServingError(f"{name} must be one of {', '.join(FLOAT_BYTES)}, got {getattr(self, name)!r}")
        for name, ceiling in _CEILINGS.items():  # typos (an extra zero or three) caught before the arithmetic
            if getattr(self, name) > ceiling:
                raise ServingError(f"{name} {getattr(self, name)!r} is larger than {ceiling:,}; check the value")
        from memplan.training.setup import OPTIMIZERS

        if self.train_optimizer not in OPTIMIZERS:
            raise ServingError(f"train_optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.train_optimizer!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in ("units", "sources"))

    def override(self, values: Mapping[str, Any]) -> "Assumptions":
        """A copy with `values` replaced; strings are parsed to the field's type."""
        known = self.names()
        changes: dict[str, Any] = {}
        for name, raw in values.items():
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}?" if close else "see data/serving.json for the names"
                raise ServingError(f"unknown assumption '{name}'; {hint}")
            changes[name] = _coerce(name, _FIELD_TYPES[name], raw)
        sources = dict(self.sources)
        sources.update({n: "user override" for n in changes})
        return replace(self, sources=sources, **changes)

    def pcie_bytes_per_s(self, gen: int) -> float:
        table = {3: self.pcie_gen3_bytes_per_s, 4: self.pcie_gen4_bytes_per_s, 5: self.pcie_gen5_bytes_per_s}
        if gen not in table:
            raise ServingError(f"PCIe generation {gen!r} has no bandwidth assumption; use 3, 4 or 5 in the GPU catalog")
        return table[gen]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {n: {"value": getattr(self, n), "unit": self.units.get(n, ""), "source": self.sources.get(n, "")} for n in self.names()}


_FIELD_TYPES: dict[str, type] = {
    f.name: {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
    for f in fields(Assumptions) if f.name not in ("units", "sources")
}
_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(name: str, kind: type, raw: Any) -> Any:
    """`raw` (from JSON, the API or `--set NAME=VALUE`) as the field's declared type."""
    if not isinstance(raw, str):
        if kind is bool and isinstance(raw, bool):
            return raw
        if kind in (int, float) and isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw):
            if kind is int and float(raw) != int(raw):
                raise ServingError(f"{name} must be {_KIND_WORDS[kind]}, got {raw!r}")
            return kind(raw)
        raise ServingError(f"{name} must be {_KIND_WORDS[kind]}, got {raw!r}")
    if kind is str:
        return raw.strip()
    text = raw.strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            value = float(text)
            if value != int(value):
                raise ValueError
            return int(value)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except (ValueError, OverflowError):
        pass
    raise ServingError(f"{name} must be {_KIND_WORDS[kind]}, got '{raw}'")


@lru_cache(maxsize=1)
def assumptions() -> Assumptions:
    """The defaults from `data/serving.json`."""
    path = data_dir() / "serving.json"
    raw = json.loads(path.read_text(encoding="utf-8"))["assumptions"]
    names = set(Assumptions.names())
    if set(raw) != names:
        raise ConfigError(f"{path}: assumptions differ from the model's: {sorted(set(raw) ^ names)}")
    return Assumptions(
        **{n: _coerce(n, _FIELD_TYPES[n], raw[n]["value"]) for n in names},
        units={n: raw[n]["unit"] for n in names},
        sources={n: raw[n]["source"] for n in names},
    )


def assumptions_payload(a: Assumptions, catalog: GPUCatalog, gpus: "GPU | tuple[GPU, ...]",
                        train_gpus: "list[str]") -> dict[str, dict[str, Any]]:
    """Every number a plan used, with unit and source: the constants, the GPUs' datasheets and prices
    (names such as `gpu_usd_per_hour` for one serving GPU; `gpu_usd_per_hour[KEY]` for each of several)."""
    sheet = f"GPU catalog ({catalog.source})"

    def price(g: GPU) -> dict[str, Any]:
        return {"value": g.usd_per_hour, "unit": f"USD per {g.key}-hour", "source": f"{g.price_provider} {g.price_date}".strip() or sheet}

    builtin = gpu_catalog()
    storage_src = f"--storage-price or {sheet}"
    if catalog.source == builtin.source and catalog.storage_usd_per_gb_month == builtin.storage_usd_per_gb_month:
        storage_src = str(json.loads((data_dir() / "gpus.json").read_text(encoding="utf-8")).get("storage_source", sheet))
    out = a.to_dict()
    several = isinstance(gpus, tuple)
    for gpu in gpus if isinstance(gpus, tuple) else (gpus,):
        tag = f"[{gpu.key}]" if several else ""
        out.update({
            f"gpu_usd_per_hour{tag}": price(gpu),
            f"gpu_usable_bytes{tag}": {"value": gpu.usable_bytes, "unit": "bytes", "source": sheet},
            f"gpu_bandwidth_bytes_per_s{tag}": {"value": gpu.bandwidth_bytes_per_s, "unit": "bytes/s", "source": sheet},
            f"gpu_bf16_tflops{tag}": {"value": gpu.bf16_tflops, "unit": "TFLOP/s dense", "source": sheet},
            f"gpu_pcie_gen{tag}": {"value": gpu.pcie_gen, "unit": "generation", "source": sheet},
        })
    out["storage_usd_per_gb_month"] = {"value": catalog.storage_usd_per_gb_month, "unit": "USD per GB-month", "source": storage_src}
    for key in dict.fromkeys(train_gpus):
        out[f"train_gpu_usd_per_hour[{key}]"] = price(catalog.get(key))
    return out


# ---- formulas ---------------------------------------------------------------------


def kv_bytes_per_token(spec: ModelSpec, a: Assumptions, *, tp: int = 1) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x bytes: vLLM's page per layer is
    2 x block_size x num_kv_heads x head_size x dtype bytes
    (`vllm/v1/kv_cache_interface.py::AttentionSpec.page_size_bytes`).

    With tensor parallelism vLLM gives each GPU kv_heads / tp heads, and replicates a head
    when tp > kv_heads (`vllm/model_executor/layers/linear.py::QKVParallelLinear`), so the
    replica-wide total is tp x max(1, kv_heads // tp) heads.
    Ignores: sliding windows (the cache is sized for the full context) and MLA.
    """
    heads = tp * max(1, spec.num_kv_heads // tp)
    return 2 * spec.num_layers * heads * spec.head_dim * a.kv_cache_bytes_per_element


def activation_workspace_bytes(spec: ModelSpec, a: Assumptions, *, tp: int) -> int:
    """Peak activation of one prefill forward of `prefill_batch_tokens` tokens, plus the
    sampler's fp32 logits for `max_batch_sequences` rows (`vllm/v1/worker/gpu_model_runner.py::
    GPUModelRunner.profile_run`, whose `_dummy_sampler_run` samples max_num_seqs rows; LoRAX
    `FlashCausalLM.warmup`).

    Per token, (4 x hidden + 3 x intermediate) x 2 bytes live at the MLP: measured for this
    project on an H100 (transformers 5.17 LlamaForCausalLM, bf16, SDPA, inference mode,
    logits_to_keep=1): 99,336 bytes/token for Llama-2-7B at 2048-8192 tokens, for 2 and 32
    layers alike; the formula gives 98,816. MoE: intermediate x experts_per_token.
    TP splits the intermediate. Ignores: attention scratch (flash kernels keep none).
    """
    inter = spec.intermediate_size * max(1, spec.experts_per_token)
    per_token = (4 * spec.hidden_size * tp + 3 * inter) * FLOAT_BYTES["bf16"]
    logits = a.max_batch_sequences * spec.vocab_size * FP32
    return a.prefill_batch_tokens * per_token + logits * tp


def wrapped_linears(spec: ModelSpec) -> tuple:
    """Linears vLLM wraps with LoRA slots: every linear but the output layer."""
    return tuple(lin for lin in spec.linears if not lin.is_output)


def vllm_lora_slot_bytes(spec: ModelSpec, *, max_lora_rank: int, dtype_bytes: int) -> int:
    """One LoRA slot: max_lora_rank x sum over wrapped linears of (d_in + d_out) x bytes.

    vLLM allocates `lora_a_stacked` (max_loras, 1, rank, in) and `lora_b_stacked`
    (max_loras, 1, out, rank) for every wrapped linear up front
    (`vllm/lora/layers/base_linear.py::BaseLinearLayerWithLoRA.create_lora_weights`); an
    adapter of lower rank still takes a full slot (`set_lora` copies it into the slot's
    leading `[:rank]` rows and leaves the rest zero).
    Ignores: embedding / lm_head extra-vocab slots (off by default in recent vLLM).
    """
    per_rank = sum((lin.in_features + lin.out_features) * lin.count for lin in wrapped_linears(spec))
    return max_lora_rank * per_rank * dtype_bytes


@dataclass(frozen=True)
class ServingMemory:
    """Memory of one replica (all `tp` GPUs together). Parts sum to `gpu_bytes`."""

    engine: str
    tp: int
    gpu_bytes: int  # tp x the GPU's usable (nvidia-smi total) bytes
    weights_bytes: int
    cuda_context_bytes: int
    cuda_graph_bytes: int
    activation_bytes: int
    adapter_bytes: int  # LoRAX reservation or vLLM LoRA slots
    kv_cache_bytes: int  # whole blocks only
    unallocated_bytes: int  # engine headroom, wiggle room, partial block
    kv_bytes_per_token: int
    kv_block_bytes: int
    max_loras: int  # vLLM slots (0 without LoRA / for LoRAX)
    max_lora_rank: int = 0  # vLLM --max-lora-rank of the slots (0 without LoRA / for LoRAX)

    @property
    def kv_blocks(self) -> int:
        return self.kv_cache_bytes // self.kv_block_bytes if self.kv_block_bytes else 0

    @property
    def parts(self) -> dict[str, int]:
        return {
            "weights": self.weights_bytes,
            "cuda_context": self.cuda_context_bytes,
            "cuda_graphs": self.cuda_graph_bytes,
            "activations": self.activation_bytes,
            "adapters": self.adapter_bytes,
            "kv_cache": self.kv_cache_bytes,
            "unallocated": self.unallocated_bytes,
        }

    def max_sequences(self, context_tokens: int) -> int:
        """Sequences of `context_tokens` whose KV fits at once (paged: whole blocks each, as
        `vllm/v1/kv_cache_interface.py::FullAttentionSpec.max_memory_usage_bytes` takes
        cdiv(tokens, block_size) pages; Kwon et al. 2023, arXiv:2309.06180, section 4)."""
        block_tokens = self.kv_block_bytes // self.kv_bytes_per_token
        return self.kv_blocks // math.ceil(context_tokens / block_tokens)


def _serving_weight_bytes(spec: ModelSpec, quant: str) -> int:
    # Serving loads the non-quantized parts in bf16 (bnb_4bit_compute_dtype / vLLM dtype).
    return weight_bytes(spec, quant, compute_dtype="bf16").total  # type: ignore[arg-type]


def serving_memory(
    spec: ModelSpec,
    gpu: GPU,
    a: Assumptions,
    *,
    engine: Engine,
    tp: int = 1,
    quant: str = "bf16",
    lora: LoraPlan | None = None,
    max_loras: int = 0,
    max_lora_rank: int | None = None,
) -> ServingMemory:
    """Memory of one replica on `tp` x `gpu`. `lora` (with `max_loras` slots of `max_lora_rank`,
    default the adapter's rank rounded up by `vllm_max_lora_rank`, for vLLM) turns on adapter
    memory; without it the replica serves one merged model."""
    if tp not in TP_DEGREES:
        raise ServingError(f"tensor-parallel degree must be one of {TP_DEGREES}, got {tp!r}")
    total = tp * gpu.usable_bytes
    weights = _serving_weight_bytes(spec, quant)
    context = tp * a.cuda_context_bytes
    act = activation_workspace_bytes(spec, a, tp=tp)
    kv_tok = kv_bytes_per_token(spec, a, tp=tp)
    block = a.kv_block_tokens * kv_tok
    slot_rank = 0
    if engine == "vllm":
        graphs = tp * a.cuda_graph_bytes
        adapters = 0
        if lora is not None:
            slot_rank = vllm_max_lora_rank(max_lora_rank if max_lora_rank is not None else lora.rank)
            # lora_dtype='auto' is the model dtype (bf16): 2 bytes.
            slot = vllm_lora_slot_bytes(spec, max_lora_rank=slot_rank, dtype_bytes=FLOAT_BYTES["bf16"])
            adapters = max(1, max_loras) * slot
        # determine_available_memory: requested (total x gpu_memory_utilization) minus the
        # non-KV memory measured after the profiling run (weights, activation peak, graphs, LoRA).
        budget = int(total * a.vllm_gpu_memory_utilization)
        free = budget - weights - context - graphs - act - adapters
    elif engine == "lorax":
        graphs = 0
        adapters = int(a.adapter_memory_fraction * total) if lora is not None else 0
        # get_cuda_free_memory(device, MEMORY_FRACTION - ADAPTER_MEMORY_FRACTION) x MEMORY_WIGGLE_ROOM
        after_warmup = int(total * a.lorax_cuda_memory_fraction) - weights - context - act - adapters
        free = int(after_warmup * a.lorax_memory_wiggle_room) if after_warmup > 0 else after_warmup
    else:
        raise ServingError(f"engine must be vllm or lorax, got {engine!r}")
    # Whole blocks only: vllm/v1/core/kv_cache_utils.py::get_num_blocks (available // page size // layers).
    kv = (free // block) * block if free > 0 else 0
    rest = total - weights - context - graphs - act - adapters - kv
    return ServingMemory(
        engine=engine, tp=tp, gpu_bytes=total, weights_bytes=weights, cuda_context_bytes=context,
        cuda_graph_bytes=graphs, activation_bytes=act, adapter_bytes=adapters, kv_cache_bytes=kv,
        unallocated_bytes=rest, kv_bytes_per_token=kv_tok, kv_block_bytes=block,
        max_loras=max(1, max_loras) if engine == "vllm" and lora is not None else 0, max_lora_rank=slot_rank,
    )


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds `rank`."""
    for r in VLLM_MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise ServingError(f"LoRA rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")


def tensor_parallel_replicas(
    spec: ModelSpec, gpu: GPU, a: Assumptions, *, engine: Engine, quant: str = "bf16", lora: LoraPlan | None = None,
    max_loras: int = 0, max_lora_rank: int | None = None,
) -> tuple[tuple[int, ServingMemory | str], ...]:
    """(tp, the replica's memory) for every degree in TP_DEGREES on `gpu`, or (tp, why not) where
    the heads do not split: vLLM checks num_attention_heads % tp == 0 and splits the KV heads
    evenly or replicates them (tp a multiple of them) in
    `vllm/config/model.py::ModelConfig.verify_with_parallel_config`."""
    if engine == "vllm" and quant == "fp4":
        raise ServingError("vLLM's bitsandbytes support has no fp4; use --quant nf4 or bf16")
    out: list[tuple[int, ServingMemory | str]] = []
    for tp in TP_DEGREES:
        if spec.num_heads % tp or (spec.num_kv_heads % tp and tp % spec.num_kv_heads):
            out.append((tp, f"{spec.num_heads} attention heads / {spec.num_kv_heads} KV heads do not split over {tp} GPUs"))
            continue
        out.append((tp, serving_memory(spec, gpu, a, engine=engine, tp=tp, quant=quant, lora=lora, max_loras=max_loras,
                                       max_lora_rank=max_lora_rank)))
    return tuple(out)


def no_fit_message(spec: ModelSpec, gpu: GPU, *, quant: str, context_tokens: int, largest: ServingMemory | None) -> str:
    """Why no tensor-parallel degree of `gpu` holds the weights plus one full-context sequence."""
    need = "" if largest is None else f" (8 GPUs leave {largest.kv_cache_bytes:,} bytes of KV cache)"
    return (f"{spec.name} in {quant} with {context_tokens}-token contexts does not fit on up to 8 x {gpu.key}{need}; "
            "pick a larger --gpu, a smaller --quant or shorter --prompt-tokens/--output-tokens")


def smallest_tensor_parallel_fit(
    spec: ModelSpec, gpu: GPU, a: Assumptions, *, engine: Engine, context_tokens: int, quant: str = "bf16",
    lora: LoraPlan | None = None, max_loras: int = 0,
) -> ServingMemory:
    """The replica on the fewest GPUs (1, 2, 4 or 8) that holds the weights plus the KV of one
    full-context sequence (`tensor_parallel_replicas`)."""
    last = None
    for _, mem in tensor_parallel_replicas(spec, gpu, a, engine=engine, quant=quant, lora=lora, max_loras=max_loras):
        if isinstance(mem, str):
            continue
        last = mem
        if mem.max_sequences(context_tokens) >= 1:
            return mem
    raise ServingError(no_fit_message(spec, gpu, quant=quant, context_tokens=context_tokens, largest=last))
