"""Pricing each strategy on one replica shape (GPU, tensor-parallel degree): the N-independent
`PlanContext` built once, and the per-N results of full fine-tuning, merged LoRA, LoRAX and
vLLM multi-LoRA. The model behind the formulas is described in `memplan.serving.fleet`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memplan.errors import SetupError
from memplan.hardware.gpus import GPU, GPUCatalog, gpu_catalog
from memplan.model.catalog import load_model
from memplan.model.lora import LoraPlan, adapter_file_bytes, plan_lora
from memplan.model.spec import ModelSpec
from memplan.model.storage import FLOAT_BYTES
from memplan.serving.inputs import PlanInputs
from memplan.serving.memory import (Assumptions, ServingError, ServingMemory, no_fit_message, serving_memory,
                                    tensor_parallel_replicas, vllm_lora_slot_bytes, vllm_max_lora_rank)
from memplan.serving.memory import assumptions as default_assumptions, assumptions_payload
from memplan.serving.popularity import expected_distinct, lru_hit_rate, popularity_weights
from memplan.serving.results import AdapterTiers, Candidate, Choice, StrategyResult
from memplan.serving.throughput import ReplicaThroughput, replica_throughput
from memplan.serving.training_cost import TrainingCost, training_cost

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ReplicaShape", "PlanContext", "plan_context", "price_at"]

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


def price_at(ctx: PlanContext, inp: PlanInputs) -> dict[str, tuple[StrategyResult, Choice]]:
    """Every strategy priced on each of its candidate shapes at `inp.variants`: the cheapest result and
    every candidate considered, per strategy (`ctx` holds everything that does not depend on N)."""
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
    return picked
