"""N fine-tuned variants under three strategies, side by side: GPUs, dollars, storage, latency.

- `full_finetune`: one full checkpoint per variant, dedicated replicas per variant.
- `lora`: one base + N adapters in storage, still one deployment per variant (the
  adapter merged into the base at load, so it serves like a full model).
- `lorax`: one shared base; pooled traffic; adapters tiered GPU -> host RAM -> disk. A
  replica's request rate is capped both by its GPU and by adapter loading (one at a time).

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
from memplan.serving.memory import Assumptions, ServingMemory, check_catalog, smallest_tensor_parallel_fit, vllm_lora_slot_bytes, vllm_max_lora_rank
from memplan.serving.memory import assumptions as default_assumptions, assumptions_payload
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, QUANTS
from memplan.serving.popularity import expected_distinct, lru_hit_rate, popularity_weights
from memplan.serving.throughput import ReplicaThroughput, replica_throughput
from memplan.serving.training_cost import TrainingCost, training_cost

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["PlanInputs", "AdapterTiers", "StrategyResult", "Plan", "PlanContext", "plan", "plan_context", "plan_at", "sweep_variants",
           "VariantSweep", "plan_frame", "frame_rows", "popularity_weights", "lru_hit_rate", "expected_distinct", "STRATEGIES",
           "MAX_VARIANTS"]

STRATEGIES = ("full_finetune", "lora", "lorax")
MAX_VARIANTS = 10_000_000


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """The question: N variants of `model` on `gpu` at `rps` requests/s overall."""

    model: str
    variants: int
    gpu: str
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
    engine: str = "lorax"  # engine of the shared-base strategy: lorax | vllm

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", parse_lora_targets(self.lora_targets))
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

        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or not 1 <= self.lora_rank <= MAX_LORA_RANK:
            raise SetupError(f"--lora-rank must be a positive integer up to {MAX_LORA_RANK:,}, got {self.lora_rank!r}")
        if isinstance(self.utilization, bool) or not isinstance(self.utilization, (int, float)) or not 0 < self.utilization <= 1:
            raise SetupError(f"--utilization must be in (0, 1], got {self.utilization!r}")
        for name, allowed in (("popularity", ("uniform", "zipf")), ("engine", ("lorax", "vllm")), ("quant", QUANTS),
                              ("train_quant", QUANTS)):
            if getattr(self, name) not in allowed:
                raise SetupError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

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
    in_cpu_ram: int  # host_adapter_cache_bytes / adapter file (vLLM --max-cpu-loras beyond the GPU's)
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

    @property
    def swap_latency_s(self) -> float | None:
        return None if self.adapters is None else self.adapters.swap_from_disk_s

    @property
    def adapters_resident(self) -> dict[str, int] | None:
        t = self.adapters
        return None if t is None else {"gpu": t.on_gpu, "cpu": t.in_cpu_ram, "disk": t.on_disk}

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("memory", "throughput", "adapters")}
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
class Plan:
    inputs: PlanInputs
    gpu: GPU
    checkpoint_bytes: int
    adapter_file_bytes: int
    lora_trainable_parameters: int
    training: dict[str, TrainingCost]  # per variant: "full" and "lora"
    strategies: dict[str, StrategyResult]
    assumptions: dict[str, dict[str, Any]] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": {**asdict(self.inputs), "lora_targets": list(self.inputs.lora_targets or []) or None},
            "checkpoint_bytes": self.checkpoint_bytes,
            "adapter_file_bytes": self.adapter_file_bytes,
            "lora_trainable_parameters": self.lora_trainable_parameters,
            "training_per_variant": {k: asdict(v) for k, v in self.training.items()},
            "strategies": {k: v.summary() for k, v in self.strategies.items()},
            "assumptions": self.assumptions,
        }


# ---- the planner ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanContext:
    """Everything a plan needs that does not depend on the number of variants N, built once
    by `plan_context` and shared by every N of a sweep (`plan_at`)."""

    inp: PlanInputs
    spec: ModelSpec
    gpu: GPU
    catalog: GPUCatalog
    a: Assumptions
    lora: LoraPlan
    adapter_file: int
    checkpoint: int
    training: dict[str, TrainingCost]  # per variant: "full" and "lora"
    dedicated_memory: ServingMemory  # one merged model on vLLM: full_finetune and lora alike
    dedicated_throughput: ReplicaThroughput
    shared_memory: ServingMemory  # lorax: the replica; vllm: with one LoRA slot (sizes batch and slot budget)
    vllm_batch: int  # vllm engine: sequences per step with one slot; 0 for lorax
    vllm_max_loras: int  # vllm engine: min(batch, slots the adapter budget holds); 0 for lorax
    swap_from_cpu_s: float
    swap_from_disk_s: float
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


def _result(c: PlanContext, n: int, name: str, mem: ServingMemory, thr: ReplicaThroughput, replicas: float, *, storage: int,
            load_bytes: int, training: TrainingCost, adapters: AdapterTiers | None = None, note: str = "") -> StrategyResult:
    gpus = replicas * mem.tp
    per_hour = gpus * c.gpu.usd_per_hour
    # Object storage bills per GB-month with GB = 10^9 bytes (the catalog's storage_source).
    storage_month = storage / 1e9 * c.catalog.storage_usd_per_gb_month
    return StrategyResult(
        name=name, engine=mem.engine, gpus=gpus, replicas=replicas, usd_per_hour=per_hour, storage_bytes=storage,
        storage_usd_per_month=storage_month, usd_per_month=per_hour * c.a.hours_per_month + storage_month,
        training_usd=None if training.usd is None else training.usd * n,
        training_gpu_hours=None if training.gpu_hours is None else training.gpu_hours * n,
        cold_start_s=load_bytes / c.a.storage_bytes_per_s, memory=mem, throughput=thr, adapters=adapters, note=note,
    )


def _dedicated(c: PlanContext, inp: PlanInputs, p: "np.ndarray", name: str, *, storage: int, load_bytes: int,
               training: TrainingCost) -> StrategyResult:
    """One vLLM deployment per variant (a LoRA variant merged into its base)."""
    mem, thr = c.dedicated_memory, c.dedicated_throughput
    note = "one vLLM deployment per variant" + (", adapter merged at load" if name == "lora" else "")
    return _result(c, inp.variants, name, mem, thr, _replicas(inp.rps * p, thr.requests_per_s, inp, c.a),
                   storage=storage, load_bytes=load_bytes, training=training, note=note)


def _shared(c: PlanContext, inp: PlanInputs, p: "np.ndarray") -> StrategyResult:
    """One base, pooled traffic, adapters tiered GPU -> host RAM -> disk."""
    import numpy as np

    a, spec, gpu, n = c.a, c.spec, c.gpu, inp.variants
    mem = c.shared_memory
    if inp.engine == "lorax":
        # LoRAX charges each adapter its file size against the reservation (server.py download_adapter).
        on_gpu = min(n, a.lorax_max_active_adapters, mem.adapter_bytes // c.adapter_file)
    else:
        # vLLM: size --max-loras to the distinct adapters of a full batch, within the same adapter budget.
        want = min(n, math.ceil(expected_distinct(p, c.vllm_batch)), c.vllm_max_loras)
        mem = smallest_tensor_parallel_fit(spec, gpu, a, engine="vllm", context_tokens=inp.context_tokens, quant=inp.quant,
                                           lora=c.lora, max_loras=want)
        on_gpu = mem.max_loras
    in_ram = min(n - on_gpu, a.host_adapter_cache_bytes // c.adapter_file)
    batch = max(1, min(mem.max_sequences(inp.context_tokens), a.max_batch_sequences))
    thr = replica_throughput(
        spec, gpu, a, mem, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens,
        distinct_adapters=expected_distinct(p, batch),
        adapter_bytes=c.lora.trainable_parameters * FLOAT_BYTES["bf16"],  # on the GPU in the model dtype
        adapter_overhead=a.lorax_adapter_batch_overhead,
    )
    tiers = AdapterTiers(
        on_gpu=int(on_gpu), in_cpu_ram=int(in_ram), on_disk=n,
        gpu_miss_rate=1.0 - lru_hit_rate(p, on_gpu), disk_miss_rate=1.0 - lru_hit_rate(p, on_gpu + in_ram),
        swap_from_cpu_s=c.swap_from_cpu_s, swap_from_disk_s=c.swap_from_disk_s,
    )
    # A replica loads one adapter at a time (we assume loads do not overlap), beside its GPU work:
    # its request rate is also capped by 1 / mean swap time per request.
    capacity = thr.requests_per_s
    if tiers.mean_added_latency_s > 0:
        capacity = min(capacity, 1.0 / tiers.mean_added_latency_s)
    bound = "adapter loading" if capacity < thr.requests_per_s else "GPU"
    return _result(c, n, "lorax", mem, thr, _replicas(np.array([inp.rps]), capacity, inp, a),
                   storage=c.checkpoint + n * c.adapter_file, load_bytes=c.checkpoint, training=c.training["lora"],
                   adapters=tiers,
                   note=f"one shared base on {inp.engine}; adapters tiered GPU -> host RAM -> disk; replicas bound by {bound}")


def plan_context(inp: PlanInputs, *, catalog: GPUCatalog | None = None, assumptions: Assumptions | None = None) -> PlanContext:
    """The N-independent part of `plan(inp)`: checks, model, training costs, replica memory.
    Raises what `plan` raises for these inputs at any N (except the vLLM engine's N-sized slots)."""
    catalog = catalog if catalog is not None else gpu_catalog()
    a = assumptions if assumptions is not None else default_assumptions()
    check_catalog(catalog.gpus)
    gpu = catalog.get(inp.gpu)
    pcie = a.pcie_bytes_per_s(gpu.pcie_gen)
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
    # full_finetune and lora serve the same merged model: one replica shape for both.
    dedicated = smallest_tensor_parallel_fit(spec, gpu, a, engine="vllm", context_tokens=inp.context_tokens, quant=inp.quant)
    dedicated_thr = replica_throughput(spec, gpu, a, dedicated, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens)
    shared = smallest_tensor_parallel_fit(spec, gpu, a, engine=inp.engine, context_tokens=inp.context_tokens, quant=inp.quant,
                                          lora=lora, max_loras=1 if inp.engine == "vllm" else 0)
    vllm_batch = vllm_max_loras = 0
    if inp.engine == "lorax":
        if shared.adapter_bytes // adapter_file < 1:
            raise SetupError(
                f"one {adapter_file:,}-byte adapter does not fit the {shared.adapter_bytes:,}-byte adapter reservation; "
                "raise adapter_memory_fraction with --set or lower --lora-rank"
            )
    else:
        vllm_batch = max(1, min(shared.max_sequences(inp.context_tokens), a.max_batch_sequences))
        slot = vllm_lora_slot_bytes(spec, max_lora_rank=vllm_max_lora_rank(lora.rank), dtype_bytes=FLOAT_BYTES["bf16"])
        vllm_max_loras = min(vllm_batch, max(1, int(a.adapter_memory_fraction * shared.gpu_bytes) // slot))
    return PlanContext(
        inp=inp, spec=spec, gpu=gpu, catalog=catalog, a=a, lora=lora, adapter_file=adapter_file,
        checkpoint=spec.total_parameters * FLOAT_BYTES[a.checkpoint_dtype], training=train,
        dedicated_memory=dedicated, dedicated_throughput=dedicated_thr, shared_memory=shared,
        vllm_batch=vllm_batch, vllm_max_loras=vllm_max_loras,
        # Adapter bytes over the link, plus a fixed software cost (data/serving.json sources both).
        swap_from_cpu_s=adapter_file / pcie + a.adapter_swap_overhead_s,
        swap_from_disk_s=adapter_file / min(pcie, a.storage_bytes_per_s) + a.adapter_swap_overhead_s,
        assumptions=assumptions_payload(a, catalog, gpu, [t.gpu for t in train.values() if t.gpu]),
    )


def plan_at(ctx: PlanContext, variants: int) -> Plan:
    """`plan(replace(ctx.inp, variants=variants))`, reusing everything in `ctx`."""
    inp = ctx.inp if variants == ctx.inp.variants else replace(ctx.inp, variants=variants)
    n = inp.variants
    p = popularity_weights(n, inp.popularity, inp.zipf_exponent)
    train = dict(ctx.training)
    strategies = {
        "full_finetune": _dedicated(ctx, inp, p, "full_finetune", storage=n * ctx.checkpoint, load_bytes=ctx.checkpoint,
                                    training=train["full"]),
        "lora": _dedicated(ctx, inp, p, "lora", storage=ctx.checkpoint + n * ctx.adapter_file,
                           load_bytes=ctx.checkpoint + ctx.adapter_file, training=train["lora"]),
        "lorax": _shared(ctx, inp, p),
    }
    return Plan(inputs=inp, gpu=ctx.gpu, checkpoint_bytes=ctx.checkpoint, adapter_file_bytes=ctx.adapter_file,
                lora_trainable_parameters=ctx.lora.trainable_parameters, training=train, strategies=strategies,
                assumptions=dict(ctx.assumptions))


def plan(inp: PlanInputs, *, catalog: GPUCatalog | None = None, assumptions: Assumptions | None = None) -> Plan:
    """The three strategies for `inp`, with every assumption that drove them."""
    return plan_at(plan_context(inp, catalog=catalog, assumptions=assumptions), inp.variants)


# ---- sweeps and crossovers ---------------------------------------------------------------


@dataclass(frozen=True)
class VariantSweep:
    plans: tuple[Plan, ...]
    crossovers: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants": [p.inputs.variants for p in self.plans],
            "plans": [{"variants": p.inputs.variants, "strategies": {k: v.summary() for k, v in p.strategies.items()}} for p in self.plans],
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
            rows.append({"variants": p.inputs.variants, "strategy": name, "engine": s.engine, "tp": s.memory.tp,
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
