"""N fine-tuned variants under three strategies, side by side: GPUs, dollars, storage, latency.

- `full_finetune`: one full checkpoint per variant, dedicated replicas per variant.
- `lora`: one base + N adapters in storage, still one deployment per variant.
- `lorax`: one shared base; pooled traffic; adapters tiered GPU -> host RAM -> disk.

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

from memplan.catalog import load_model
from memplan.errors import SetupError
from memplan.gpus import GPU, GPUCatalog, gpu_catalog
from memplan.lora import adapter_file_bytes, plan_lora
from memplan.serving import Assumptions, ServingMemory, assumptions as default_assumptions, check_catalog, tensor_parallel_degree
from memplan.serving import vllm_lora_slot_bytes, vllm_max_lora_rank
from memplan.storage import FLOAT_BYTES, QUANTS
from memplan.throughput import ReplicaThroughput, replica_throughput
from memplan.training_cost import TrainingCost, training_cost

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["PlanInputs", "StrategyResult", "Plan", "plan", "sweep", "Sweep", "plan_frame", "frame_rows", "popularity_weights",
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
        def positive_int(name: str, v: Any, top: int) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SetupError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
            if v > top:
                raise SetupError(f"--{name.replace('_', '-')} {v:,} is larger than {top:,}; check the value")

        def positive_float(name: str, v: Any) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SetupError(f"--{name.replace('_', '-')} must be a positive number, got {v!r}")

        positive_int("variants", self.variants, MAX_VARIANTS)
        positive_float("rps", self.rps)
        positive_int("prompt_tokens", self.prompt_tokens, 10_000_000)
        positive_int("output_tokens", self.output_tokens, 10_000_000)
        positive_int("dataset_tokens", self.dataset_tokens, 10**15)
        positive_float("epochs", self.epochs)
        positive_float("zipf_exponent", self.zipf_exponent)
        if not (isinstance(self.utilization, (int, float)) and 0 < self.utilization <= 1):
            raise SetupError(f"--utilization must be in (0, 1], got {self.utilization!r}")
        if self.popularity not in ("uniform", "zipf"):
            raise SetupError(f"--popularity must be uniform or zipf, got {self.popularity!r}")
        if self.engine not in ("lorax", "vllm"):
            raise SetupError(f"--engine must be lorax or vllm, got {self.engine!r}")
        for name in ("quant", "train_quant"):
            if getattr(self, name) not in QUANTS:
                raise SetupError(f"--{name.replace('_', '-')} must be one of {', '.join(QUANTS)}, got {getattr(self, name)!r}")
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))

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
    lo, hi = 0.0, 1.0
    while np.sum(-np.expm1(-p * hi)) < slots:
        hi *= 2.0
    for _ in range(100):
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
class StrategyResult:
    name: str
    engine: str
    gpus: float  # average GPUs running; a whole number unless scale-to-zero
    replicas: float
    usd_per_hour: float  # GPUs only
    storage_bytes: int
    storage_usd_per_month: float
    usd_per_month: float  # GPUs x hours_per_month + storage
    training_usd: float | None  # all N variants, one-time
    training_gpu_hours: float | None
    cold_start_s: float  # bring up one replica: its checkpoint bytes / storage bandwidth
    swap_latency_s: float | None  # adapter bytes / min(PCIe, storage) + overhead (from disk)
    swap_latency_host_s: float | None  # adapter bytes / PCIe + overhead (from host RAM)
    mean_added_latency_s: float | None  # expected swap time per request from the miss rates
    adapters_resident: dict[str, int] | None  # gpu / cpu / disk, per replica
    miss_rate: dict[str, float] | None  # gpu: not on the GPU; gpu_and_cpu: in neither, loaded from disk
    memory: ServingMemory
    throughput: ReplicaThroughput
    note: str = ""

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("memory", "throughput")}
        d["gpus"] = _number(self.gpus)
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
    training: dict[str, TrainingCost]
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


def _replicas(rates: "np.ndarray", capacity: float, inp: PlanInputs, a: Assumptions) -> float:
    import numpy as np

    need = rates / (capacity * inp.utilization)
    if not inp.scale_to_zero:
        return float(math.ceil(float(np.sum(np.maximum(1.0, need))) - 1e-9))
    up = -np.expm1(-rates * a.scale_to_zero_idle_s)
    return float(np.sum(up * np.maximum(1.0, need)))


def _dedicated(name: str, inp: PlanInputs, ctx: "_Context", storage: int, load_bytes: int, training: TrainingCost) -> StrategyResult:
    mem = tensor_parallel_degree(ctx.spec, ctx.gpu, ctx.a, engine="vllm", context_tokens=inp.context_tokens, quant=inp.quant)
    thr = replica_throughput(ctx.spec, ctx.gpu, ctx.a, mem, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens)
    replicas = _replicas(inp.rps * ctx.p, thr.requests_per_s, inp, ctx.a)
    note = "one vLLM deployment per variant" + (" (merged adapter)" if name == "lora" else "")
    return _result(name, "vllm", inp, ctx, mem, thr, replicas, storage, load_bytes, training, note=note)


def _result(name: str, engine: str, inp: PlanInputs, ctx: "_Context", mem: ServingMemory, thr: ReplicaThroughput,
            replicas: float, storage: int, load_bytes: int, training: TrainingCost, **extra: Any) -> StrategyResult:
    gpus = replicas * mem.tp
    per_hour = gpus * ctx.gpu.usd_per_hour
    storage_month = storage / 1e9 * ctx.catalog.storage_usd_per_gb_month
    train_usd = None if training.usd is None else training.usd * inp.variants
    train_hours = None if training.gpu_hours is None else training.gpu_hours * inp.variants
    return StrategyResult(
        name=name, engine=engine, gpus=gpus, replicas=replicas, usd_per_hour=per_hour, storage_bytes=storage,
        storage_usd_per_month=storage_month, usd_per_month=per_hour * ctx.a.hours_per_month + storage_month,
        training_usd=train_usd, training_gpu_hours=train_hours, cold_start_s=load_bytes / ctx.a.storage_bytes_per_s,
        swap_latency_s=extra.get("swap"), swap_latency_host_s=extra.get("swap_host"),
        mean_added_latency_s=extra.get("added"), adapters_resident=extra.get("resident"),
        miss_rate=extra.get("miss"), memory=mem, throughput=thr, note=extra.get("note", ""),
    )


def _shared(inp: PlanInputs, ctx: "_Context", training: TrainingCost) -> StrategyResult:
    a, spec, gpu, n = ctx.a, ctx.spec, ctx.gpu, inp.variants
    gpu_adapter_bytes = ctx.lora.trainable_parameters * FLOAT_BYTES["bf16"]  # loaded in the model dtype
    kw = dict(engine=inp.engine, context_tokens=inp.context_tokens, quant=inp.quant, lora=ctx.lora)
    if inp.engine == "lorax":
        mem = tensor_parallel_degree(spec, gpu, a, **kw)  # type: ignore[arg-type]
        slots = min(n, a.lorax_max_active_adapters, mem.adapter_bytes // ctx.adapter_file)
    else:
        # vLLM: size --max-loras to the distinct adapters of a full batch, within the adapter budget.
        mem = tensor_parallel_degree(spec, gpu, a, max_loras=1, **kw)  # type: ignore[arg-type]
        batch = max(1, min(mem.max_sequences(inp.context_tokens), a.max_batch_sequences))
        slot = vllm_lora_slot_bytes(spec, max_lora_rank=vllm_max_lora_rank(ctx.lora.rank), dtype_bytes=FLOAT_BYTES["bf16"])
        budget = int(a.adapter_memory_fraction * mem.gpu_bytes) // slot
        want = min(n, batch, math.ceil(expected_distinct(ctx.p, batch)), max(1, budget))
        mem = tensor_parallel_degree(spec, gpu, a, max_loras=want, **kw)  # type: ignore[arg-type]
        slots = mem.max_loras
    if slots < 1:
        raise SetupError(
            f"one {ctx.adapter_file:,}-byte adapter does not fit the adapter reservation "
            f"({mem.adapter_bytes:,} bytes); raise adapter_memory_fraction with --set or lower --lora-rank"
        )
    host = min(n - slots, a.host_adapter_cache_bytes // ctx.adapter_file)
    batch = max(1, min(mem.max_sequences(inp.context_tokens), a.max_batch_sequences))
    thr = replica_throughput(
        spec, gpu, a, mem, prompt_tokens=inp.prompt_tokens, output_tokens=inp.output_tokens,
        distinct_adapters=expected_distinct(ctx.p, batch), adapter_bytes=gpu_adapter_bytes,
        adapter_overhead=a.lorax_adapter_batch_overhead,
    )
    replicas = _replicas(ctx.np.array([inp.rps]), thr.requests_per_s, inp, a)
    miss_gpu = 1.0 - lru_hit_rate(ctx.p, slots)
    miss_host = 1.0 - lru_hit_rate(ctx.p, slots + host)
    pcie = a.pcie_bytes_per_s(gpu.pcie_gen)
    swap_disk = ctx.adapter_file / min(pcie, a.storage_bytes_per_s) + a.adapter_swap_overhead_s
    swap_host = ctx.adapter_file / pcie + a.adapter_swap_overhead_s
    added = (miss_gpu - miss_host) * swap_host + miss_host * swap_disk
    return _result(
        "lorax", inp.engine, inp, ctx, mem, thr, replicas, ctx.checkpoint + n * ctx.adapter_file, ctx.checkpoint,
        training, swap=swap_disk, swap_host=swap_host, added=added,
        resident={"gpu": int(slots), "cpu": int(host), "disk": n}, miss={"gpu": miss_gpu, "gpu_and_cpu": miss_host},
        note=f"one shared base on {inp.engine}; adapters tiered GPU -> host RAM -> disk",
    )


@dataclass(frozen=True)
class _Context:
    spec: Any
    gpu: GPU
    catalog: GPUCatalog
    a: Assumptions
    lora: Any
    adapter_file: int
    checkpoint: int
    p: Any
    np: Any


def plan(inp: PlanInputs, *, catalog: GPUCatalog | None = None, assumptions: Assumptions | None = None) -> Plan:
    """The three strategies for `inp`, with every assumption that drove them."""
    import numpy as np

    catalog = catalog if catalog is not None else gpu_catalog()
    a = assumptions if assumptions is not None else default_assumptions()
    check_catalog(catalog.gpus, a)
    gpu = catalog.get(inp.gpu)
    spec = load_model(inp.model)
    lora = plan_lora(spec, inp.lora_rank, inp.lora_targets)
    ctx = _Context(
        spec=spec, gpu=gpu, catalog=catalog, a=a, lora=lora, adapter_file=adapter_file_bytes(lora, a.adapter_save_dtype),
        checkpoint=spec.total_parameters * FLOAT_BYTES[a.checkpoint_dtype],
        p=popularity_weights(inp.variants, inp.popularity, inp.zipf_exponent), np=np,
    )
    train = {
        "full": training_cost(spec, catalog, a, method="full", tokens=inp.train_tokens, train_gpu=inp.train_gpu),
        "lora": training_cost(spec, catalog, a, method="lora", tokens=inp.train_tokens, lora=lora,
                              quant=inp.train_quant, train_gpu=inp.train_gpu),
    }
    n = inp.variants
    strategies = {
        "full_finetune": _dedicated("full_finetune", inp, ctx, n * ctx.checkpoint, ctx.checkpoint, train["full"]),
        "lora": _dedicated("lora", inp, ctx, ctx.checkpoint + n * ctx.adapter_file, ctx.checkpoint + ctx.adapter_file, train["lora"]),
        "lorax": _shared(inp, ctx, train["lora"]),
    }
    return Plan(inputs=inp, gpu=gpu, checkpoint_bytes=ctx.checkpoint, adapter_file_bytes=ctx.adapter_file,
                lora_trainable_parameters=lora.trainable_parameters, training=train, strategies=strategies,
                assumptions=_assumptions_payload(a, catalog, gpu, train))


def _assumptions_payload(a: Assumptions, catalog: GPUCatalog, gpu: GPU, train: dict[str, TrainingCost]) -> dict[str, dict[str, Any]]:
    out = a.to_dict()
    sheet = "GPU catalog (data/gpus.json or --gpu-catalog)"
    price_src = f"{gpu.price_provider}, {gpu.price_date}".strip(", ") or "GPU catalog"
    out.update({
        "gpu_usd_per_hour": {"value": gpu.usd_per_hour, "unit": f"USD per {gpu.key}-hour", "source": price_src},
        "gpu_usable_bytes": {"value": gpu.usable_bytes, "unit": "bytes", "source": sheet},
        "gpu_bandwidth_bytes_per_s": {"value": gpu.bandwidth_bytes_per_s, "unit": "bytes/s", "source": sheet},
        "gpu_bf16_tflops": {"value": gpu.bf16_tflops, "unit": "TFLOP/s dense", "source": sheet},
        "gpu_pcie_gen": {"value": gpu.pcie_gen, "unit": "generation", "source": sheet},
        "storage_usd_per_gb_month": {"value": catalog.storage_usd_per_gb_month, "unit": "USD per GB-month",
                                     "source": _storage_source(catalog)},
    })
    for method, t in train.items():
        if t.gpu is not None:
            g = catalog.get(t.gpu)
            out[f"train_{method}_gpu_usd_per_hour"] = {
                "value": g.usd_per_hour, "unit": f"USD per {g.key}-hour",
                "source": f"{g.price_provider}, {g.price_date}".strip(", ") or "GPU catalog",
            }
    return out


def _storage_source(catalog: GPUCatalog) -> str:
    import json

    from memplan.paths import data_dir

    builtin = gpu_catalog()
    if catalog.source == builtin.source and catalog.storage_usd_per_gb_month == builtin.storage_usd_per_gb_month:
        raw = json.loads((data_dir() / "gpus.json").read_text(encoding="utf-8"))
        return str(raw.get("storage_source", builtin.source))
    return f"--storage-price or the catalog file ({catalog.source})"


# ---- sweeps and crossovers ---------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    plans: tuple[Plan, ...]
    crossovers: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "variants": [p.inputs.variants for p in self.plans],
            "plans": [{"variants": p.inputs.variants, "strategies": {k: v.summary() for k, v in p.strategies.items()}} for p in self.plans],
            "crossovers": list(self.crossovers),
            "assumptions": self.plans[0].assumptions if self.plans else {},
        }


def sweep(inp: PlanInputs, variants: Sequence[int], *, catalog: GPUCatalog | None = None,
          assumptions: Assumptions | None = None) -> Sweep:
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
    return Sweep(plans=plans, crossovers=tuple(cross))


_FRAME_COLUMNS = ("gpus", "replicas", "usd_per_hour", "usd_per_month", "storage_bytes", "storage_usd_per_month",
                  "training_usd", "training_gpu_hours", "cold_start_s", "swap_latency_s", "mean_added_latency_s")


def frame_rows(result: Plan | Sweep) -> list[dict[str, Any]]:
    """One flat row per (variants, strategy)."""
    plans = result.plans if isinstance(result, Sweep) else (result,)
    rows = []
    for p in plans:
        for name, s in p.strategies.items():
            res = s.adapters_resident or {}
            rows.append({"variants": p.inputs.variants, "strategy": name, "engine": s.engine, "tp": s.memory.tp,
                         **{c: getattr(s, c) for c in _FRAME_COLUMNS},
                         "adapters_on_gpu": res.get("gpu"), "adapters_in_host_ram": res.get("cpu"),
                         "gpu_miss_rate": (s.miss_rate or {}).get("gpu")})
    return rows


def plan_frame(result: Plan | Sweep) -> "pd.DataFrame":
    """The rows of `frame_rows` as a pandas DataFrame (pandas is imported here, lazily)."""
    import pandas as pd

    return pd.DataFrame(frame_rows(result))
