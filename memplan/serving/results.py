"""What a fleet plan answers: per-strategy results, the candidates priced, plans over N, flat rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from memplan.hardware.gpus import GPU
from memplan.serving.inputs import PlanInputs
from memplan.serving.memory import ServingMemory
from memplan.serving.throughput import ReplicaThroughput
from memplan.serving.training_cost import TrainingCost

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["AdapterTiers", "StrategyResult", "Candidate", "Choice", "Plan", "VariantSweep", "frame_rows", "plan_frame"]

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
    training_usd: float | None  # all N variants, one-time; None where no GPU cluster holds the job
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
