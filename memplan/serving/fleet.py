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
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from memplan.model.catalog import load_model
from memplan.errors import SetupError
from memplan.hardware.gpus import GPU, GPUCatalog, gpu_catalog
from memplan.model.lora import LoraPlan, adapter_file_bytes, plan_lora
from memplan.serving.memory import Assumptions, ServingMemory, check_catalog, tensor_parallel_degree, vllm_lora_slot_bytes, vllm_max_lora_rank
from memplan.serving.memory import assumptions as default_assumptions, assumptions_payload
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES, QUANTS
from memplan.serving.throughput import ReplicaThroughput, replica_throughput
from memplan.serving.training_cost import TrainingCost, training_cost

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["PlanInputs", "AdapterTiers", "StrategyResult", "Plan", "plan", "sweep_variants", "VariantSweep", "plan_frame", "frame_rows", "popularity_weights",
           "lru_hit_rate", "expected_distinct", "STRATEGIES", "MAX_VARIANTS"]

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
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        for name, top in (("variants", MAX_VARIANTS), ("prompt_tokens", 10**7), ("output_tokens", 10**7), ("dataset_tokens", 10**15)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise SetupError(f"--{name.replace('_', '-')} must be a positive integer up to {top:,}, got {v!r}")
        for name in ("rps", "epochs", "zipf_exponent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SetupError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")
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


# ---- popularity and caches ------------------------------------------------------------


def popularity_weights(n: int, kind: str, exponent: float = 1.0) -> "np.ndarray":
    """Share of traffic per variant, most popular first: uniform 1/n, or Zipf i^-s / H(n, s)."""
    import numpy as np

    if kind == "uniform":
        return np.full(n, 1.0 / n)
    w = np.arange(1, n + 1, dtype=float) ** -float(exponent)
    return w / w.sum()


def lru_hit_rate(p: "np.ndarray", slots: int) -> float:
    """Hit rate of an LRU cache of `slots` items (Che's approximation): find the
    characteristic time T with sum(1 - exp(-p_i T)) = slots; hit = sum p_i (1 - exp(-p_i T))."""
    import numpy as np

    n = len(p)
    if slots >= n:
        return 1.0
    if slots <= 0:
        return 0.0
    if float(np.ptp(p)) == 0.0:
        return slots / n  # uniform popularity: Che's fixed point gives exactly slots / n
    lo, hi = 0.0, 1.0
    while np.sum(-np.expm1(-p * hi)) < slots:
        hi *= 2.0
    # Bisection to a relative width of 1e-9 on T (~30 steps instead of 100): the hit
    # rate moves by far less than that, and each step is a pass over n values.
    for _ in range(100):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        if np.sum(-np.expm1(-p * mid)) < slots:
            lo = mid
        else:
            hi = mid
    return float(np.sum(p * -np.expm1(-p * hi)))


def expected_distinct(p: "np.ndarray", batch: int) -> float:
    """Expected distinct variants among `batch` independent requests: sum 1 - (1 - p_i)^batch."""
    import numpy as np

    return float(np.sum(-np.expm1(batch * np.log1p(-np.minimum(p, 1.0 - 1e-16)))))


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
class _Context:
    inp: PlanInputs
    spec: ModelSpec
    gpu: GPU
    catalog: GPUCatalog
    a: Assumptions
    lora: LoraPlan
    adapter_file: int
    checkpoint: int
    p: "np.ndarray"


def _replicas(rates: "np.ndarray", capacity: float, inp: PlanInputs, a: Assumptions) -> float:
    import numpy as np

    need = rates / (capacity * inp.utilization)
    if not inp.scale_to_zero:
        return float(math.ceil(float(np.sum(np.maximum(1.0, need))) - 1e-9))
    up = -np.expm1(-rates * a.scale_to_zero_idle_s)
    return float(np.sum(up * np.maximum(1.0, need)))


def _result(c: _Context, name: str, mem: ServingMemory, thr: ReplicaThroughput, replicas: float, *, storage: int,
            load_bytes: int, training: TrainingCost, adapters: AdapterTiers | None = None, note: str = "") -> StrategyResult:
    gpus = replicas * mem.tp
    per_hour = gpus * c.gpu.usd_per_hour
    storage_month = storage / 1e9 * c.catalog.storage_usd_per_gb_month
    n = c.inp.variants
    return StrategyResult(
        name=name, engine=mem.engine, gpus=gpus, replicas=replicas, usd_per_hour=per_hour, storage_bytes=storage,
        storage_usd_per_month=storage_month, usd_per_month=per_hour * c.a.hours_per_month + storage_month,
        training_usd=None if training.usd is None else training.usd * n,
        training_gpu_hours=None if training.gpu_hours is None else training.gpu_hours * n,
        cold_start_s=load_bytes / c.a.storage_bytes_per_s, memory=mem, throughput=thr, adapters=adapters, note=note,
    )


def _dedicated(c: _Context, name: str, *, storage: int, load_bytes: int, training: TrainingCost) -> StrategyResult:
    """One vLLM deployment per variant (a LoRA variant merged into its base)."""
    inp = c.inp
    mem = tensor_parallel_degree(c.spec, c.gpu, c.a, engine="vllm", context_tokens=inp.context_tokens, quant=inp.quant)
    thr = replica_throughput(c.spec, c.gpu, c.a, mem, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens)
    note = "one vLLM deployment per variant" + (", adapter merged at load" if name == "lora" else "")
    return _result(c, name, mem, thr, _replicas(inp.rps * c.p, thr.requests_per_s, inp, c.a),
                   storage=storage, load_bytes=load_bytes, training=training, note=note)


def _shared(c: _Context, training: TrainingCost) -> StrategyResult:
    """One base, pooled traffic, adapters tiered GPU -> host RAM -> disk."""
    import numpy as np

    inp, a, spec, gpu, n = c.inp, c.a, c.spec, c.gpu, c.inp.variants
    kw: dict[str, Any] = dict(engine=inp.engine, context_tokens=inp.context_tokens, quant=inp.quant, lora=c.lora)
    if inp.engine == "lorax":
        mem = tensor_parallel_degree(spec, gpu, a, **kw)
        # LoRAX charges each adapter its file size against the reservation (server.py download_adapter).
        on_gpu = min(n, a.lorax_max_active_adapters, mem.adapter_bytes // c.adapter_file)
        if on_gpu < 1:
            raise SetupError(
                f"one {c.adapter_file:,}-byte adapter does not fit the {mem.adapter_bytes:,}-byte adapter reservation; "
                "raise adapter_memory_fraction with --set or lower --lora-rank"
            )
    else:
        # vLLM: size --max-loras to the distinct adapters of a full batch, within the same adapter budget.
        mem = tensor_parallel_degree(spec, gpu, a, max_loras=1, **kw)
        batch = max(1, min(mem.max_sequences(inp.context_tokens), a.max_batch_sequences))
        slot = vllm_lora_slot_bytes(spec, max_lora_rank=vllm_max_lora_rank(c.lora.rank), dtype_bytes=FLOAT_BYTES["bf16"])
        budget = int(a.adapter_memory_fraction * mem.gpu_bytes) // slot
        want = min(n, batch, math.ceil(expected_distinct(c.p, batch)), max(1, budget))
        mem = tensor_parallel_degree(spec, gpu, a, max_loras=want, **kw)
        on_gpu = mem.max_loras
    in_ram = min(n - on_gpu, a.host_adapter_cache_bytes // c.adapter_file)
    batch = max(1, min(mem.max_sequences(inp.context_tokens), a.max_batch_sequences))
    thr = replica_throughput(
        spec, gpu, a, mem, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens,
        distinct_adapters=expected_distinct(c.p, batch),
        adapter_bytes=c.lora.trainable_parameters * FLOAT_BYTES["bf16"],  # on the GPU in the model dtype
        adapter_overhead=a.lorax_adapter_batch_overhead,
    )
    pcie = a.pcie_bytes_per_s(gpu.pcie_gen)
    tiers = AdapterTiers(
        on_gpu=int(on_gpu), in_cpu_ram=int(in_ram), on_disk=n,
        gpu_miss_rate=1.0 - lru_hit_rate(c.p, on_gpu), disk_miss_rate=1.0 - lru_hit_rate(c.p, on_gpu + in_ram),
        swap_from_cpu_s=c.adapter_file / pcie + a.adapter_swap_overhead_s,
        swap_from_disk_s=c.adapter_file / min(pcie, a.storage_bytes_per_s) + a.adapter_swap_overhead_s,
    )
    # A replica loads one adapter at a time (we assume loads do not overlap), beside its GPU work:
    # its request rate is also capped by 1 / mean swap time per request.
    capacity = thr.requests_per_s
    if tiers.mean_added_latency_s > 0:
        capacity = min(capacity, 1.0 / tiers.mean_added_latency_s)
    bound = "adapter loading" if capacity < thr.requests_per_s else "GPU"
    return _result(c, "lorax", mem, thr, _replicas(np.array([inp.rps]), capacity, inp, a),
                   storage=c.checkpoint + n * c.adapter_file, load_bytes=c.checkpoint, training=training, adapters=tiers,
                   note=f"one shared base on {inp.engine}; adapters tiered GPU -> host RAM -> disk; replicas bound by {bound}")


def plan(inp: PlanInputs, *, catalog: GPUCatalog | None = None, assumptions: Assumptions | None = None) -> Plan:
    """The three strategies for `inp`, with every assumption that drove them."""
    catalog = catalog if catalog is not None else gpu_catalog()
    a = assumptions if assumptions is not None else default_assumptions()
    check_catalog(catalog.gpus)
    gpu = catalog.get(inp.gpu)
    a.pcie_bytes_per_s(gpu.pcie_gen)
    spec = load_model(inp.model)
    if not spec.is_causal_lm:
        raise SetupError(f"{spec.name} is not a causal LM; memplan plan sizes text-generation serving")
    if inp.context_tokens > spec.max_position_embeddings:
        raise SetupError(
            f"--prompt-tokens + --output-tokens = {inp.context_tokens:,} exceeds {spec.name}'s "
            f"{spec.max_position_embeddings:,} positions; shorten them"
        )
    lora = plan_lora(spec, inp.lora_rank, inp.lora_targets)
    c = _Context(
        inp=inp, spec=spec, gpu=gpu, catalog=catalog, a=a, lora=lora, adapter_file=adapter_file_bytes(lora, a.adapter_save_dtype),
        checkpoint=spec.total_parameters * FLOAT_BYTES[a.checkpoint_dtype],
        p=popularity_weights(inp.variants, inp.popularity, inp.zipf_exponent),
    )
    train = {
        "full": training_cost(spec, catalog, a, method="full", tokens=inp.train_tokens, train_gpu=inp.train_gpu),
        "lora": training_cost(spec, catalog, a, method="lora", tokens=inp.train_tokens, lora=lora,
                              quant=inp.train_quant, train_gpu=inp.train_gpu),
    }
    n = inp.variants
    strategies = {
        "full_finetune": _dedicated(c, "full_finetune", storage=n * c.checkpoint, load_bytes=c.checkpoint, training=train["full"]),
        "lora": _dedicated(c, "lora", storage=c.checkpoint + n * c.adapter_file, load_bytes=c.checkpoint + c.adapter_file,
                           training=train["lora"]),
        "lorax": _shared(c, train["lora"]),
    }
    return Plan(inputs=inp, gpu=gpu, checkpoint_bytes=c.checkpoint, adapter_file_bytes=c.adapter_file,
                lora_trainable_parameters=lora.trainable_parameters, training=train, strategies=strategies,
                assumptions=assumptions_payload(a, catalog, gpu, [t.gpu for t in train.values() if t.gpu]))


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
    """Plans over N, and the smallest N at which one strategy's $/month undercuts another's."""
    from dataclasses import replace

    ns = sorted(set(variants))
    if not ns:
        raise SetupError("--sweep-variants is empty; give a comma list such as 1,10,100,1000")

    def at(n: int) -> Plan:
        return plan(replace(inp, variants=n), catalog=catalog, assumptions=assumptions)

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
