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

from dataclasses import replace
from typing import Any, Sequence

from memplan.errors import SetupError
from memplan.hardware.gpus import GPUCatalog
from memplan.serving.inputs import MAX_VARIANTS, STRATEGIES, PlanInputs
from memplan.serving.memory import Assumptions
from memplan.serving.popularity import expected_distinct, lru_hit_rate, popularity_weights
from memplan.serving.results import (AdapterTiers, Candidate, Choice, Plan, StrategyResult, VariantSweep, frame_rows,
                                    plan_frame)
from memplan.serving.strategies import PlanContext, ReplicaShape, plan_context, price_at

__all__ = ["PlanInputs", "AdapterTiers", "StrategyResult", "Candidate", "Choice", "ReplicaShape", "Plan", "PlanContext", "plan", "plan_context", "plan_at", "sweep_variants",
           "VariantSweep", "plan_frame", "frame_rows", "popularity_weights", "lru_hit_rate", "expected_distinct", "STRATEGIES",
           "MAX_VARIANTS"]


def plan_at(ctx: PlanContext, variants: int) -> Plan:
    """`plan(replace(ctx.inp, variants=variants))`, reusing everything in `ctx`."""
    inp = ctx.inp if variants == ctx.inp.variants else replace(ctx.inp, variants=variants)
    picked = price_at(ctx, inp)
    return Plan(inputs=inp, gpu=ctx.gpu, checkpoint_bytes=ctx.checkpoint, adapter_file_bytes=ctx.adapter_file,
                lora_trainable_parameters=ctx.lora.trainable_parameters, training=dict(ctx.training),
                strategies={k: v[0] for k, v in picked.items()}, assumptions=dict(ctx.assumptions),
                choices={k: v[1] for k, v in picked.items()})


def plan(inp: PlanInputs, *, catalog: GPUCatalog | None = None, assumptions: Assumptions | None = None) -> Plan:
    """The strategies for `inp`, each on its cheapest candidate GPU, with every assumption that drove them."""
    return plan_at(plan_context(inp, catalog=catalog, assumptions=assumptions), inp.variants)


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


