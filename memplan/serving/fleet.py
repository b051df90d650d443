"""N fine-tuned variants under four strategies, side by side: GPUs, dollars, storage, latency.

- `full_finetune`: one full checkpoint per variant, dedicated replicas per variant.
- `lora`: one base + N adapters in storage, still one deployment per variant (the
  adapter merged into the base at load, so it serves like a full model).
- `lorax`: one shared base on LoRAX; pooled traffic; adapters tiered GPU -> host RAM -> disk.
  A replica's request rate is capped both by its GPU and by adapter loading (one at a time).
- `vllm_multi_lora`: one shared base on vLLM (`--enable-lora`): `--max-loras` slots of
  `--max-lora-rank` preallocated on the GPU, an LRU cache of `--max-cpu-loras` adapters in host
  RAM, at most `--max-loras` distinct adapters per batch, punica kernels on every step.

Each strategy is priced on every candidate (GPU, tensor-parallel degree) that can serve it, the
GPUs of `PlanInputs.gpu` or else the whole catalog, and the cheapest is the plan's; the rest are
kept, with why a candidate cannot serve (`Plan.choices`). Ignores all-reduce time, which larger
tensor-parallel degrees pay and this model does not charge.

Dedicated replicas per variant: a variant with rate r needs r / (capacity x utilisation)
replicas, at least one unless scale-to-zero; replicas beyond the first are counted as a
time average (autoscaling), then the fleet is rounded up to whole replicas. With
scale-to-zero a replica is up a fraction 1 - exp(-r x idle window) of the time (Poisson
arrivals). Adapter misses use Che's approximation of an LRU cache under independent
requests (Che, Tung, Wang 2002; Fricker et al. 2012), exact for uniform popularity; every
replica is assumed to see the whole popularity profile (no adapter-aware routing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

from memplan.model.catalog import load_model
from memplan.errors import SetupError
from memplan.hardware.gpus import GPU, GPUCatalog, gpu_catalog
from memplan.model.lora import LoraPlan, adapter_file_bytes, parse_lora_targets, plan_lora
from memplan.serving.memory import (Assumptions, ServingError, ServingMemory, no_fit_message, serving_memory,
                                   tensor_parallel_replicas, vllm_lora_slot_bytes, vllm_max_lora_rank)
from memplan.serving.memory import assumptions as default_assumptions, assumptions_payload
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, QUANTS
from memplan.serving.popularity import expected_distinct, lru_hit_rate, popularity_weights
from memplan.serving.throughput import ReplicaThroughput, replica_throughput
from memplan.serving.training_cost import TrainingCost, training_cost

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["PlanInputs", "AdapterTiers", "StrategyResult", "Candidate", "Choice", "ReplicaShape", "Plan", "PlanContext", "plan", "plan_context", "plan_at", "sweep_variants",
           "VariantSweep", "plan_frame", "frame_rows", "popularity_weights", "lru_hit_rate", "expected_distinct", "STRATEGIES",
           "MAX_VARIANTS"]

STRATEGIES = ("full_finetune", "lora", "lorax", "vllm_multi_lora")
MAX_VARIANTS = 10_000_000


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """The question: N variants of `model` at `rps` requests/s overall, served on `gpu`: one catalog
    GPU, a tuple of them to choose from, or None for every GPU of the catalog (the cheapest wins)."""

    model: str
    variants: int
    gpu: str | tuple[str, ...] | None = None  # kw_only: a default may precede required fields
    rps: float
    popularity: str = "uniform"  # uniform | zipf
    zipf_exponent: float = 1.0
    prompt_tokens: int = 1024  # vLLM benchmark_serving.py random-input-len default
    output_tokens: int = 128  # vLLM benchmark_serving.py random-output-len default
    utilization: float = 0.7
    quant: str = "bf16"  # serving format of the weights
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | None = None  # None: PEFT's default for the family
    train_quant: str = "bf16"  # nf4 = QLoRA
    scale_to_zero: bool = False
    dataset_tokens: int = 10_000_000
    epochs: float = 3.0
    train_gpu: str | None = None
    # vllm_multi_lora's engine flags (vllm/engine/arg_utils.py EngineArgs); None: sized by the plan.
    max_loras: int | None = None  # GPU slots; the plan's: the distinct adapters of a full batch, within the adapter budget
    max_lora_rank: int | None = None  # slot rank, rounded up to vLLM's allowed ranks; the plan's: --lora-rank's
    max_cpu_loras: int | None = None  # host-RAM LRU cache; the plan's: host_adapter_cache_bytes / adapter bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", parse_lora_targets(self.lora_targets))
        if isinstance(self.gpu, list):
            object.__setattr__(self, "gpu", tuple(self.gpu))
        names = (self.gpu,) if isinstance(self.gpu, str) else self.gpu
        if names is not None and (not isinstance(names, tuple) or not names
                                  or not all(isinstance(g, str) and g.strip() for g in names)):
            raise SetupError(f"--gpu must name catalog GPUs (e.g. a10g), got {self.gpu!r}")
        for name, top in (("variants", MAX_VARIANTS), ("prompt_tokens", 10**7), ("output_tokens", 10**7), ("dataset_tokens", 10**15)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise SetupError(f"--{name.replace('_', '-')} must be a positive integer up to {top:,}, got {v!r}")
        # Ceilings: 10**6 req/s is beyond any single deployment; a Zipf exponent above 10 puts all
        # traffic on one variant; 1,000 epochs is no fine-tuning schedule anyone runs.
        for name, top in (("rps", 10**6), ("epochs", 1000), ("zipf_exponent", 10)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= top:
                raise SetupError(f"--{name.replace('_', '-')} must be a positive number up to {top:,}, got {v!r}")
        from memplan.training.setup import MAX_LORA_RANK

        for name in ("max_loras", "max_cpu_loras", "max_lora_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_VARIANTS):
                raise SetupError(f"--{name.replace('_', '-')} must be a positive integer up to {MAX_VARIANTS:,}, got {v!r}")
        if self.max_loras is not None and self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            # vllm/config/lora.py LoRAConfig: max_cpu_loras must be >= max_loras.
            raise SetupError(f"--max-cpu-loras ({self.max_cpu_loras}) must be at least --max-loras ({self.max_loras}), as vLLM requires")
        if self.max_lora_rank is not None and self.max_lora_rank < self.lora_rank:
            raise SetupError(f"--max-lora-rank ({self.max_lora_rank}) must hold --lora-rank ({self.lora_rank})")

        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or not 1 <= self.lora_rank <= MAX_LORA_RANK:
            raise SetupError(f"--lora-rank must be a positive integer up to {MAX_LORA_RANK:,}, got {self.lora_rank!r}")
        if isinstance(self.utilization, bool) or not isinstance(self.utilization, (int, float)) or not 0 < self.utilization <= 1:
            raise SetupError(f"--utilization must be in (0, 1], got {self.utilization!r}")
        for name, allowed in (("popularity", ("uniform", "zipf")), ("quant", QUANTS),
                              ("train_quant", QUANTS)):
            if getattr(self, name) not in allowed:
                raise SetupError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def gpu_names(self) -> tuple[str, ...] | None:
        """The GPUs to choose from (None: the whole catalog)."""
        return (self.gpu,) if isinstance(self.gpu, str) else self.gpu

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @property
    def train_tokens(self) -> int:
        return int(self.dataset_tokens * self.epochs)


# ---- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterTiers:
    """Where the shared-base strategy keeps its N adapters, per replica, and what a miss costs."""

    on_gpu: int  # LoRAX reservation / max-active-adapters, or vLLM --max-loras
    in_cpu_ram: int  # LoRAX: host_adapter_cache_bytes / adapter file; vLLM: --max-cpu-loras beyond the GPU's
    on_disk: int  # all N
    gpu_miss_rate: float  # requests whose adapter is not on the GPU
    disk_miss_rate: float  # ... nor in host RAM: loaded from disk
    swap_from_cpu_s: float  # adapter bytes / PCIe + overhead
    swap_from_disk_s: float  # adapter bytes / min(PCIe, storage) + overhead

    @property
    def mean_added_latency_s(self) -> float:
        return (self.gpu_miss_rate - self.disk_miss_rate) * self.swap_from_cpu_s + self.disk_miss_rate * self.swap_from_disk_s


@dataclass(frozen=True)
class StrategyResult:
    name: str
    engine: str
    gpus: float  # average GPUs running; a whole number unless scale-to-zero
    replicas: float
    usd_per_hour: float  # GPUs only
    storage_bytes: int
    storage_usd_per_month: float
    usd_per_month: float  # GPUs x hours_per_month + storage
    training_usd: float | None  # all N variants, one-time; None where no single GPU holds the job
    training_gpu_hours: float | None
    cold_start_s: float  # bring up one replica: the bytes it loads / storage bandwidth
    memory: ServingMemory
    throughput: ReplicaThroughput
    adapters: AdapterTiers | None = None
    note: str = ""
    gpu: GPU | None = None  # the serving GPU (each replica is memory.tp of them)

    @property
    def swap_latency_s(self) -> float | None:
        return None if self.adapters is None else self.adapters.swap_from_disk_s

    @property
    def adapters_resident(self) -> dict[str, int] | None:
        t = self.adapters
        return None if t is None else {"gpu": t.on_gpu, "cpu": t.in_cpu_ram, "disk": t.on_disk}

    def summary(self, *, with_gpu: bool = False) -> dict[str, Any]:
        """The JSON of one strategy; `with_gpu` adds the serving GPU's key (plans that chose among GPUs)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("memory", "throughput", "adapters", "gpu")}
        if with_gpu and self.gpu is not None:
            d = {"gpu": self.gpu.key, **d}
        d["gpus"] = _number(self.gpus)
        t = self.adapters
        d["swap_latency_s"] = self.swap_latency_s
        d["adapters_resident"] = self.adapters_resident
        d["adapters"] = None if t is None else {**asdict(t), "mean_added_latency_s": t.mean_added_latency_s}
        d["replica"] = {
            "engine": self.engine, "tp": self.memory.tp, "memory_bytes": self.memory.parts,
            "kv_bytes_per_token": self.memory.kv_bytes_per_token, "max_loras": self.memory.max_loras,
            **asdict(self.throughput),
        }
        return d


def _number(x: float) -> float | int:
    return int(round(x)) if abs(x - round(x)) < 1e-9 else round(x, 4)


@dataclass(frozen=True)
class Candidate:
    """One (GPU, tensor-parallel degree) a strategy was priced on, or why it cannot serve there."""

    gpu: str
    tp: int
    replicas: float | None = None
    gpus: float | None = None
    usd_per_month: float | None = None
    reason: str = ""  # why this replica shape cannot serve the strategy; "" when it can

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"gpu": self.gpu, "tp": self.tp}
        if self.reason:
            return {**d, "reason": self.reason}
        return {**d, "replicas": _number(self.replicas or 0.0), "gpus": _number(self.gpus or 0.0),
                "usd_per_month": self.usd_per_month}


@dataclass(frozen=True)
class Choice:
    """Every candidate a strategy was priced on: those that serve, cheapest first, then those that cannot."""

    candidates: tuple[Candidate, ...]

    @property
    def serving(self) -> tuple[Candidate, ...]:
        return tuple(c for c in self.candidates if not c.reason)

    @property
    def chosen(self) -> Candidate:
        return self.serving[0]

    @property
    def runner_up(self) -> Candidate | None:
        s = self.serving
        return s[1] if len(s) > 1 else None

    def to_dict(self) -> dict[str, Any]:
        r = self.runner_up
        return {"chosen": self.chosen.to_dict(), "runner_up": None if r is None else r.to_dict(),
                "candidates": [c.to_dict() for c in self.candidates]}


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    gpu: GPU | None  # the one serving GPU the inputs named; None when each strategy chose among several
    checkpoint_bytes: int
    adapter_file_bytes: int
    lora_trainable_parameters: int
    training: dict[str, TrainingCost]  # per variant: "full" and "lora"
    strategies: dict[str, StrategyResult]  # each on its cheapest candidate
    assumptions: dict[str, dict[str, Any]] = field(repr=False)
    choices: dict[str, Choice] = field(default_factory=dict, repr=False)  # per strategy: every candidate priced

    def to_dict(self) -> dict[str, Any]:
        several = self.gpu is None
        d = {
            "inputs": {**asdict(self.inputs), "lora_targets": list(self.inputs.lora_targets or []) or None},
            "checkpoint_bytes": self.checkpoint_bytes,
            "adapter_file_bytes": self.adapter_file_bytes,
            "lora_trainable_parameters": self.lora_trainable_parameters,
            "training_per_variant": {k: asdict(v) for k, v in self.training.items()},
            "strategies": {k: v.summary(with_gpu=several) for k, v in self.strategies.items()},
        }
        if several:  # one --gpu: nothing was chosen, and the output stays as it was before the choice existed
            d["choices"] = {k: v.to_dict() for k, v in self.choices.items()}
        d["assumptions"] = self.assumptions
        return d


# ---- the planner ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaShape:
    """The per-GPU part of a plan: one strategy's replica on `tp` x `gpu`, built once and priced at every N.
    `reason` says why it cannot serve (then `memory` may be None)."""

    gpu: GPU
    tp: int
    memory: ServingMemory | None
    throughput: ReplicaThroughput | None = None  # dedicated replicas (it does not depend on N)
    batch: int = 0  # vllm shared base: sequences per step with one LoRA slot
    max_loras: int = 0  # vllm shared base: min(batch, slots the adapter budget holds)
    swap_from_cpu_s: float = 0.0
    swap_from_disk_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class PlanContext:
    """Everything a plan needs that does not depend on the number of variants N, built once by
    `plan_context` and shared by every N of a sweep (`plan_at`): the GPU-independent parts once,
    and per strategy one `ReplicaShape` per candidate (GPU, tensor-parallel degree)."""

    inp: PlanInputs
    spec: ModelSpec
    gpu: GPU | None  # the one GPU the inputs named; None when choosing among several
    gpus: tuple[GPU, ...]  # the GPUs considered
    catalog: GPUCatalog
    a: Assumptions
    lora: LoraPlan
    max_lora_rank: int  # vllm_multi_lora's slot rank: --max-lora-rank (or --lora-rank) rounded up to vLLM's ranks
    adapter_file: int
    checkpoint: int
    training: dict[str, TrainingCost]  # per variant: "full" and "lora"
    shapes: dict[str, tuple[ReplicaShape, ...]]  # "dedicated" (full_finetune and lora alike), "lorax", "vllm"
    assumptions: dict[str, dict[str, Any]]


def _replicas(rates: "np.ndarray", capacity: float, inp: PlanInputs, a: Assumptions) -> float:
    import numpy as np

    # Busy replicas = arrival rate x service time (the utilisation law U = X S: Denning and Buzen
    # 1978, "The operational analysis of queueing network models", ACM Computing Surveys 10(3)),
    # over the target utilisation; at least one replica per variant.
    need = rates / (capacity * inp.utilization)
    if not inp.scale_to_zero:
        return float(math.ceil(float(np.sum(np.maximum(1.0, need))) - 1e-9))
    # Poisson arrivals: P(at least one request in the idle window t) = 1 - exp(-rate x t).
    up = -np.expm1(-rates * a.scale_to_zero_idle_s)
    return float(np.sum(up * np.maximum(1.0, need)))


def _result(c: PlanContext, n: int, name: str, gpu: GPU, mem: ServingMemory, thr: ReplicaThroughput, replicas: float, *,
            storage: int, load_bytes: int, training: TrainingCost, adapters: AdapterTiers | None = None,
            note: str = "") -> StrategyResult:
    gpus = replicas * mem.tp
    per_hour = gpus * gpu.usd_per_hour
    # Object storage bills per GB-month with GB = 10^9 bytes (the catalog's storage_source).
    storage_month = storage / 1e9 * c.catalog.storage_usd_per_gb_month
    return StrategyResult(
        name=name, engine=mem.engine, gpus=gpus, replicas=replicas, usd_per_hour=per_hour, storage_bytes=storage,
        storage_usd_per_month=storage_month, usd_per_month=per_hour * c.a.hours_per_month + storage_month,
        training_usd=None if training.usd is None else training.usd * n,
        training_gpu_hours=None if training.gpu_hours is None else training.gpu_hours * n,
        cold_start_s=load_bytes / c.a.storage_bytes_per_s, memory=mem, throughput=thr, adapters=adapters, note=note,
        gpu=gpu,
    )


def _dedicated(c: PlanContext, shape: ReplicaShape, inp: PlanInputs, p: "np.ndarray", name: str, *, storage: int,
               load_bytes: int, training: TrainingCost) -> StrategyResult:
    """One vLLM deployment per variant (a LoRA variant merged into its base)."""
    mem, thr = shape.memory, shape.throughput
    assert mem is not None and thr is not None  # only shapes without a reason are priced
    note = "one vLLM deployment per variant" + (", adapter merged at load" if name == "lora" else "")
    return _result(c, inp.variants, name, shape.gpu, mem, thr, _replicas(inp.rps * p, thr.requests_per_s, inp, c.a),
                   storage=storage, load_bytes=load_bytes, training=training, note=note)


class _Hits:
    """lru_hit_rate(p, slots) of one N, memoised: the candidates of a plan share a handful of cache sizes."""

    def __init__(self, p: "np.ndarray") -> None:
        self.p, self.memo = p, {}  # type: dict[int, float]

    def __call__(self, slots: int) -> float:
        if slots not in self.memo:
            self.memo[slots] = lru_hit_rate(self.p, slots)
        return self.memo[slots]


def _tiers(c: PlanContext, shape: ReplicaShape, n: int, on_gpu: int, in_ram: int, hits: _Hits) -> AdapterTiers:
    return AdapterTiers(
        on_gpu=int(on_gpu), in_cpu_ram=int(in_ram), on_disk=n,
        gpu_miss_rate=1.0 - hits(on_gpu), disk_miss_rate=1.0 - hits(on_gpu + in_ram),
        swap_from_cpu_s=shape.swap_from_cpu_s, swap_from_disk_s=shape.swap_from_disk_s,
    )


def _pooled(c: PlanContext, name: str, shape: ReplicaShape, mem: ServingMemory, thr: ReplicaThroughput, tiers: AdapterTiers,
            inp: PlanInputs, note: str) -> StrategyResult:
    """One shared base with pooled traffic: replicas for all `rps`, capped by GPU work and adapter loading."""
    import numpy as np

    # A replica loads one adapter at a time (we assume loads do not overlap), beside its GPU work:
    # its request rate is also capped by 1 / mean swap time per request.
    capacity = thr.requests_per_s
    if tiers.mean_added_latency_s > 0:
        capacity = min(capacity, 1.0 / tiers.mean_added_latency_s)
    bound = "adapter loading" if capacity < thr.requests_per_s else "GPU"
    return _result(c, inp.variants, name, shape.gpu, mem, thr, _replicas(np.array([inp.rps]), capacity, inp, c.a),
                   storage=c.checkpoint + inp.variants * c.adapter_file, load_bytes=c.checkpoint, training=c.training["lora"],
                   adapters=tiers, note=f"{note}; replicas bound by {bound}")


def _lorax(c: PlanContext, shape: ReplicaShape, inp: PlanInputs, p: "np.ndarray", hits: _Hits) -> StrategyResult:
    """LoRAX: one base, pooled traffic, adapters tiered GPU -> host RAM -> disk."""
    a, n, mem = c.a, inp.variants, shape.memory
    assert mem is not None
    # LoRAX charges each adapter its file size against the reservation (server.py download_adapter).
    on_gpu = min(n, a.lorax_max_active_adapters, mem.adapter_bytes // c.adapter_file)
    in_ram = min(n - on_gpu, a.host_adapter_cache_bytes // c.adapter_file)
    batch = max(1, min(mem.max_sequences(inp.context_tokens), a.max_batch_sequences))
    thr = replica_throughput(
        c.spec, shape.gpu, a, mem, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens,
        distinct_adapters=expected_distinct(p, batch),
        adapter_bytes=c.lora.trainable_parameters * FLOAT_BYTES["bf16"],  # on the GPU in the model dtype
        adapter_overhead=a.lorax_adapter_batch_overhead,
    )
    return _pooled(c, "lorax", shape, mem, thr, _tiers(c, shape, n, on_gpu, in_ram, hits), inp,
                   "one shared base on lorax; adapters tiered GPU -> host RAM -> disk")


def _batch_within_loras(p: "np.ndarray", batch: int, max_loras: int) -> int:
    """The largest batch (<= `batch`) whose expected distinct adapters fit `max_loras`: vLLM's
    scheduler leaves a request waiting when its LoRA is not among the step's and the step already
    has max_loras of them (`vllm/v1/core/sched/scheduler.py::Scheduler.schedule`)."""
    if max_loras >= len(p) or expected_distinct(p, batch) <= max_loras:
        return batch
    lo, hi = max(1, max_loras), batch  # expected_distinct(p, max_loras) <= max_loras; grows with the batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if expected_distinct(p, mid) <= max_loras else (lo, mid)
    return lo


def _vllm_multi_lora(c: PlanContext, shape: ReplicaShape, inp: PlanInputs, p: "np.ndarray", hits: _Hits) -> StrategyResult | str:
    """vLLM multi-LoRA: one base, `--max-loras` slots of `--max-lora-rank` preallocated on every
    LoRA-wrapped linear (`vllm/lora/layers/base_linear.py::BaseLinearLayerWithLoRA.create_lora_weights`),
    an LRU cache of `--max-cpu-loras` adapters in host RAM (`vllm/lora/worker_manager.py::
    LRUCacheWorkerLoRAManager`; vLLM requires max_cpu_loras >= max_loras), adapters loaded from disk on a miss."""
    a, spec, n = c.a, c.spec, inp.variants
    # The plan's --max-loras: the distinct adapters of a full batch, within the adapter budget (shape.max_loras).
    max_loras = inp.max_loras if inp.max_loras is not None else min(n, math.ceil(expected_distinct(p, shape.batch)), shape.max_loras)
    mem = serving_memory(spec, shape.gpu, a, engine="vllm", tp=shape.tp, quant=inp.quant, lora=c.lora, max_loras=max_loras,
                         max_lora_rank=c.max_lora_rank)
    if mem.max_sequences(inp.context_tokens) < 1:
        return f"{max_loras} LoRA slots of rank {c.max_lora_rank} leave no room for one {inp.context_tokens}-token sequence"
    on_gpu = min(n, max_loras)
    # vLLM keeps a CPU copy of every cached adapter in the model dtype (LoRAModel.from_local_checkpoint
    # with dtype=lora_config.lora_dtype, device="cpu"): the plan's cache is what host_adapter_cache_bytes holds.
    cpu_bytes = c.lora.trainable_parameters * FLOAT_BYTES["bf16"]
    cpu_loras = inp.max_cpu_loras if inp.max_cpu_loras is not None else max(max_loras, a.host_adapter_cache_bytes // cpu_bytes)
    in_ram = max(0, min(n, cpu_loras) - on_gpu)
    kv_batch = max(1, min(mem.max_sequences(inp.context_tokens), a.max_batch_sequences))
    batch = _batch_within_loras(p, kv_batch, max_loras)
    thr = replica_throughput(
        spec, shape.gpu, a, mem, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens,
        distinct_adapters=expected_distinct(p, batch),
        # The punica kernels read each slot at its full max_lora_rank (the zero rows too).
        adapter_bytes=vllm_lora_slot_bytes(spec, max_lora_rank=c.max_lora_rank, dtype_bytes=FLOAT_BYTES["bf16"]),
        adapter_overhead=a.vllm_lora_kernel_overhead, max_batch=batch,
    )
    limit = f", batch capped at {batch} by --max-loras" if batch < kv_batch else ""
    return _pooled(c, "vllm_multi_lora", shape, mem, thr, _tiers(c, shape, n, on_gpu, in_ram, hits), inp,
                   f"one shared base on vllm: {max_loras} LoRA slot(s) of rank {c.max_lora_rank}, "
                   f"{min(n, cpu_loras):,} adapter(s) in the host-RAM LRU cache{limit}")


def _fits(mem: ServingMemory, context_tokens: int) -> str:
    if mem.max_sequences(context_tokens) >= 1:
        return ""
    return f"no room for one {context_tokens}-token sequence ({mem.kv_cache_bytes:,} bytes of KV cache)"


def _shapes(inp: PlanInputs, spec: ModelSpec, gpu: GPU, a: Assumptions, lora: LoraPlan, adapter_file: int,
            max_lora_rank: int) -> dict[str, tuple[ReplicaShape, ...]]:
    """The replica shapes on `gpu`, one per tensor-parallel degree: "dedicated" (one merged model on
    vLLM: full_finetune and lora alike), "lorax" and "vllm" (the shared base, vLLM with one LoRA slot:
    it sizes the batch and the slot budget). A shape that cannot serve says why."""
    ctx_tokens = inp.context_tokens
    pcie = a.pcie_bytes_per_s(gpu.pcie_gen)
    # Adapter bytes over the link, plus a fixed software cost (data/serving.json sources both).
    swaps = dict(swap_from_cpu_s=adapter_file / pcie + a.adapter_swap_overhead_s,
                 swap_from_disk_s=adapter_file / min(pcie, a.storage_bytes_per_s) + a.adapter_swap_overhead_s)
    out: dict[str, tuple[ReplicaShape, ...]] = {}
    for kind, engine, kw in (("dedicated", "vllm", {}), ("lorax", "lorax", dict(lora=lora)),
                             ("vllm", "vllm", dict(lora=lora, max_loras=1, max_lora_rank=max_lora_rank))):
        shapes: list[ReplicaShape] = []
        for tp, mem in tensor_parallel_replicas(spec, gpu, a, engine=engine, quant=inp.quant, **kw):  # type: ignore[arg-type]
            if isinstance(mem, str):
                shapes.append(ReplicaShape(gpu=gpu, tp=tp, memory=None, reason=mem, **swaps))
                continue
            why = _fits(mem, ctx_tokens)
            thr, batch, max_loras = None, 0, 0
            if not why and kind == "dedicated":
                thr = replica_throughput(spec, gpu, a, mem, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens)
            elif not why and kind == "lorax" and mem.adapter_bytes // adapter_file < 1:
                why = (f"one {adapter_file:,}-byte adapter does not fit the {mem.adapter_bytes:,}-byte adapter reservation; "
                       "raise adapter_memory_fraction with --set or lower --lora-rank")
            elif not why and kind == "vllm":
                batch = max(1, min(mem.max_sequences(ctx_tokens), a.max_batch_sequences))
                slot = vllm_lora_slot_bytes(spec, max_lora_rank=max_lora_rank, dtype_bytes=FLOAT_BYTES["bf16"])
                max_loras = min(batch, max(1, int(a.adapter_memory_fraction * mem.gpu_bytes) // slot))
            shapes.append(ReplicaShape(gpu=gpu, tp=tp, memory=mem, throughput=thr, batch=batch, max_loras=max_loras,
                                       reason=why, **swaps))
        out[kind] = tuple(shapes)
    return out


def _no_shape_error(inp: PlanInputs, spec: ModelSpec, gpus: tuple[GPU, ...], shapes: tuple[ReplicaShape, ...],
                    what: str) -> ServingError:
    """No candidate serves `what`: the message of the largest GPU's largest replica."""
    last = shapes[-1]
    if last.memory is not None and not last.reason.startswith("no room"):
        return ServingError(last.reason)  # the adapter reservation, say
    sized = [s.memory for s in shapes if s.gpu is last.gpu and s.memory is not None]
    msg = no_fit_message(spec, last.gpu, quant=inp.quant, context_tokens=inp.context_tokens, largest=sized[-1] if sized else None)
    if len(gpus) == 1:
        return ServingError(msg)
    return ServingError(f"no GPU of the {len(gpus)} considered serves {what}: {msg}")


def plan_context(inp: PlanInputs, *, catalog: GPUCatalog | None = None, assumptions: Assumptions | None = None) -> PlanContext:
    """The N-independent part of `plan(inp)`: checks, model, training costs (once), and the replica
    shapes on every candidate GPU and tensor-parallel degree. Raises what `plan` raises for these
    inputs at any N (except vllm_multi_lora's N-sized slots)."""
    catalog = catalog if catalog is not None else gpu_catalog()
    a = assumptions if assumptions is not None else default_assumptions()
    names = inp.gpu_names
    gpus = catalog.gpus if names is None else tuple(dict.fromkeys(catalog.get(g) for g in names))
    spec = load_model(inp.model)
    if not spec.is_causal_lm:
        raise SetupError(f"{spec.name} is not a causal LM; memplan plan sizes text-generation serving")
    if inp.context_tokens > spec.max_position_embeddings:
        raise SetupError(
            f"--prompt-tokens + --output-tokens = {inp.context_tokens:,} exceeds {spec.name}'s "
            f"{spec.max_position_embeddings:,} positions; shorten them"
        )
    lora = plan_lora(spec, inp.lora_rank, inp.lora_targets)
    adapter_file = adapter_file_bytes(lora, a.adapter_save_dtype)
    train = {
        "full": training_cost(spec, catalog, a, method="full", tokens=inp.train_tokens, train_gpu=inp.train_gpu),
        "lora": training_cost(spec, catalog, a, method="lora", tokens=inp.train_tokens, lora=lora,
                              quant=inp.train_quant, train_gpu=inp.train_gpu),
    }
    max_lora_rank = vllm_max_lora_rank(inp.max_lora_rank or lora.rank)
    shapes: dict[str, tuple[ReplicaShape, ...]] = {"dedicated": (), "lorax": (), "vllm": ()}
    for gpu in gpus:
        for kind, some in _shapes(inp, spec, gpu, a, lora, adapter_file, max_lora_rank).items():
            shapes[kind] += some
    for kind, what in (("dedicated", "a merged model"), ("lorax", "the LoRAX base"), ("vllm", "the vLLM multi-LoRA base")):
        if all(s.reason for s in shapes[kind]):
            raise _no_shape_error(inp, spec, gpus, shapes[kind], what)
    one = gpus[0] if names is not None and len(gpus) == 1 else None
    return PlanContext(
        inp=inp, spec=spec, gpu=one, gpus=gpus, catalog=catalog, a=a, lora=lora, max_lora_rank=max_lora_rank,
        adapter_file=adapter_file, checkpoint=spec.total_parameters * FLOAT_BYTES[a.checkpoint_dtype], training=train,
        shapes=shapes,
        assumptions=assumptions_payload(a, catalog, one if one is not None else gpus,
                                        [t.gpu for t in train.values() if t.gpu]),
    )


def _choose(results: list[tuple[ReplicaShape, StrategyResult | str]]) -> tuple[StrategyResult, Choice]:
    """The cheapest result ($/month, then fewer GPUs, then the smaller degree, then catalog order) and every candidate."""
    ok = [(i, sh, r) for i, (sh, r) in enumerate(results) if not isinstance(r, str)]
    ok.sort(key=lambda t: (t[2].usd_per_month, t[2].gpus, t[1].tp, t[0]))
    if not ok:
        raise ServingError(next(r for _, r in results if isinstance(r, str)))
    cands = [Candidate(gpu=sh.gpu.key, tp=sh.tp, replicas=r.replicas, gpus=r.gpus, usd_per_month=r.usd_per_month)
             for _, sh, r in ok]
    cands += [Candidate(gpu=sh.gpu.key, tp=sh.tp, reason=r) for sh, r in results if isinstance(r, str)]
    return ok[0][2], Choice(candidates=tuple(cands))


def plan_at(ctx: PlanContext, variants: int) -> Plan:
    """`plan(replace(ctx.inp, variants=variants))`, reusing everything in `ctx`."""
    inp = ctx.inp if variants == ctx.inp.variants else replace(ctx.inp, variants=variants)
    n = inp.variants
    p = popularity_weights(n, inp.popularity, inp.zipf_exponent)
    hits = _Hits(p)
    train = dict(ctx.training)
    ded = ctx.shapes["dedicated"]

    def each(shapes: tuple[ReplicaShape, ...], price: Any) -> tuple[StrategyResult, Choice]:
        return _choose([(sh, sh.reason if sh.reason else price(sh)) for sh in shapes])

    picked = {
        "full_finetune": each(ded, lambda sh: _dedicated(ctx, sh, inp, p, "full_finetune", storage=n * ctx.checkpoint,
                                                         load_bytes=ctx.checkpoint, training=train["full"])),
        "lora": each(ded, lambda sh: _dedicated(ctx, sh, inp, p, "lora", storage=ctx.checkpoint + n * ctx.adapter_file,
                                                load_bytes=ctx.checkpoint + ctx.adapter_file, training=train["lora"])),
        "lorax": each(ctx.shapes["lorax"], lambda sh: _lorax(ctx, sh, inp, p, hits)),
        "vllm_multi_lora": each(ctx.shapes["vllm"], lambda sh: _vllm_multi_lora(ctx, sh, inp, p, hits)),
    }
    return Plan(inputs=inp, gpu=ctx.gpu, checkpoint_bytes=ctx.checkpoint, adapter_file_bytes=ctx.adapter_file,
                lora_trainable_parameters=ctx.lora.trainable_parameters, training=train,
                strategies={k: v[0] for k, v in picked.items()}, assumptions=dict(ctx.assumptions),
                choices={k: v[1] for k, v in picked.items()})


def plan(inp: PlanInputs, *, catalog: GPUCatalog | None = None, assumptions: Assumptions | None = None) -> Plan:
    """The strategies for `inp`, each on its cheapest candidate GPU, with every assumption that drove them."""
    return plan_at(plan_context(inp, catalog=catalog, assumptions=assumptions), inp.variants)


# ---- sweeps and crossovers ---------------------------------------------------------------


@dataclass(frozen=True)
class VariantSweep:
    plans: tuple[Plan, ...]
    crossovers: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        several = bool(self.plans) and self.plans[0].gpu is None
        return {
            "variants": [p.inputs.variants for p in self.plans],
            "plans": [{"variants": p.inputs.variants,
                       "strategies": {k: v.summary(with_gpu=several) for k, v in p.strategies.items()}} for p in self.plans],
            "crossovers": list(self.crossovers),
            "assumptions": self.plans[0].assumptions if self.plans else {},
        }


def sweep_variants(inp: PlanInputs, variants: Sequence[int], *, catalog: GPUCatalog | None = None,
                   assumptions: Assumptions | None = None) -> VariantSweep:
    """Plans over N, and the smallest N at which one strategy's $/month undercuts another's.
    Everything that does not depend on N is computed once (`plan_context`)."""
    ns = sorted(set(variants))
    if not ns:
        raise SetupError("--sweep-variants is empty; give a comma list such as 1,10,100,1000")
    ctx = plan_context(replace(inp, variants=ns[0]), catalog=catalog, assumptions=assumptions)

    def at(n: int) -> Plan:
        return plan_at(ctx, n)

    plans = tuple(at(n) for n in ns)
    cross: list[dict[str, Any]] = []
    for i, x in enumerate(STRATEGIES):
        for y in STRATEGIES[i + 1:]:
            def diff(p: Plan) -> float:
                return p.strategies[x].usd_per_month - p.strategies[y].usd_per_month

            for lo_plan, hi_plan in zip(plans, plans[1:]):
                d_lo, d_hi = diff(lo_plan), diff(hi_plan)
                if d_lo == 0 or d_hi == 0 or (d_lo > 0) == (d_hi > 0):
                    continue
                lo, hi = lo_plan.inputs.variants, hi_plan.inputs.variants
                while hi - lo > 1:  # smallest N in (lo, hi] on hi's side
                    mid = (lo + hi) // 2
                    d = diff(at(mid))
                    lo, hi = (mid, hi) if d != 0 and (d > 0) == (d_lo > 0) else (lo, mid)
                cheaper_before, cheaper_from = (y, x) if d_lo > 0 else (x, y)
                cross.append({"pair": [x, y], "variants": hi, "between": [lo_plan.inputs.variants, hi_plan.inputs.variants],
                              "cheaper_before": cheaper_before, "cheaper_from": cheaper_from, "metric": "usd_per_month"})
    return VariantSweep(plans=plans, crossovers=tuple(cross))


_FRAME_COLUMNS = ("gpus", "replicas", "usd_per_hour", "usd_per_month", "storage_bytes", "storage_usd_per_month",
                  "training_usd", "training_gpu_hours", "cold_start_s", "swap_latency_s")


def frame_rows(result: Plan | VariantSweep) -> list[dict[str, Any]]:
    """One flat row per (variants, strategy)."""
    plans = result.plans if isinstance(result, VariantSweep) else (result,)
    rows = []
    for p in plans:
        for name, s in p.strategies.items():
            t = s.adapters
            # The GPU column only where strategies chose among GPUs (one --gpu keeps the rows as they were).
            gpu = {"gpu": s.gpu.key if s.gpu is not None else None} if p.gpu is None else {}
            rows.append({"variants": p.inputs.variants, "strategy": name, "engine": s.engine, **gpu, "tp": s.memory.tp,
                         **{col: getattr(s, col) for col in _FRAME_COLUMNS},
                         "mean_added_latency_s": None if t is None else t.mean_added_latency_s,
                         "adapters_on_gpu": None if t is None else t.on_gpu,
                         "adapters_in_cpu_ram": None if t is None else t.in_cpu_ram,
                         "gpu_miss_rate": None if t is None else t.gpu_miss_rate})
    return rows


def plan_frame(result: Plan | VariantSweep) -> "pd.DataFrame":
    """The rows of `frame_rows` as a pandas DataFrame (pandas is imported here, lazily)."""
    import pandas as pd

    return pd.DataFrame(frame_rows(result))
