"""The fleet planner (memplan.serving.fleet): storage, GPUs, adapter tiers, sweeps, and the
N-independent parts a sweep computes once (equal, field by field, to a plan from scratch)."""

from __future__ import annotations

import collections
import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memplan.serving import fleet
from memplan.serving.fleet import (
    STRATEGIES,
    Plan,
    PlanInputs,
    StrategyResult,
    plan,
    plan_at,
    plan_context,
    plan_frame,
    sweep_variants,
)
from memplan.serving.memory import Assumptions, assumptions


def _plan(**kw: object):
    base = dict(model="llama2-7b", variants=100, gpu="a10g", rps=1.0)
    base.update(kw)
    return plan(PlanInputs(**base))  # type: ignore[arg-type]


# ---- the founding documents' arithmetic -----------------------------------------------------------


@pytest.mark.parametrize("variants, founding_bytes", [(10, 3.5e12), (1_000, 350e12), (100_000, 35e15)])
def test_gpt3_full_copies(variants: int, founding_bytes: float) -> None:
    # Founding documents: GPT-3 175B is 350 GB in fp16, so 10 / 1,000 / 100,000 variants take
    # 3.5 TB / 350 TB / 35 PB. They use 175e9 parameters; our config counts 174,604,259,328
    # exactly (0.23% fewer), so we hold the nominal figures to 0.3% and the multiple exactly.
    p = _plan(model="gpt3-175b", variants=variants, gpu="h100")
    full = p.strategies["full_finetune"]
    assert full.storage_bytes == variants * p.checkpoint_bytes
    assert p.checkpoint_bytes == pytest.approx(350e9, rel=0.003)
    assert full.storage_bytes == pytest.approx(founding_bytes, rel=0.003)


def test_llama2_7b_lora_r8_qv_adapter() -> None:
    # Llama-2-7B, LoRA r=8 on q_proj,v_proj: 32 layers x 2 targets x 8 x (4096 in + 4096 out)
    # = 4,194,304 trainable parameters (PEFT's print_trainable_parameters on meta-llama/Llama-2-7b-hf).
    p = _plan(lora_rank=8, lora_targets=("q_proj", "v_proj"))
    assert p.lora_trainable_parameters == 4_194_304
    # The adapter file the plan stores and swaps is PEFT's adapter_model.safetensors. Write the
    # same tensors with safetensors itself and compare sizes, in fp32 (PEFT's default, the plan's
    # adapter_save_dtype) and fp16: 4 and 2 bytes per parameter plus the header.
    from safetensors.numpy import save

    def real_file(dtype: type) -> int:
        tensors = {}
        for i in range(32):
            for proj in ("q_proj", "v_proj"):
                key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                tensors[f"{key}.lora_A.weight"] = np.zeros((8, 4096), dtype=dtype)
                tensors[f"{key}.lora_B.weight"] = np.zeros((4096, 8), dtype=dtype)
        return len(save(tensors, metadata={"format": "pt"}))

    from memplan.model.catalog import load_model
    from memplan.model.lora import adapter_file_bytes, plan_lora

    assert p.adapter_file_bytes == real_file(np.float32)  # 16.79 MB
    assert 4 * 4_194_304 < p.adapter_file_bytes < 4 * 4_194_304 + 20_000
    fp16 = adapter_file_bytes(plan_lora(load_model("llama2-7b"), 8, "q_proj,v_proj"), "fp16")
    assert fp16 == real_file(np.float16)  # 8.40 MB
    assert 2 * 4_194_304 < fp16 < 2 * 4_194_304 + 20_000


def test_lorax_serves_100_variants_on_one_replica_where_full_finetuning_needs_100() -> None:
    # Modest traffic: one request every two seconds over all 100 variants.
    p = _plan(variants=100, rps=0.5)
    assert p.strategies["lorax"].gpus == 1
    assert p.strategies["full_finetune"].gpus >= 100
    assert p.strategies["lora"].gpus >= 100
    assert p.strategies["lorax"].adapters_resident == {"gpu": 100, "cpu": 0, "disk": 100}
    assert p.strategies["lorax"].adapters.gpu_miss_rate == 0.0


def test_storage_is_base_plus_adapters_for_lora_strategies() -> None:
    p = _plan(variants=250)
    for name in ("lora", "lorax"):
        assert p.strategies[name].storage_bytes == p.checkpoint_bytes + 250 * p.adapter_file_bytes


def test_training_is_paid_once_per_variant() -> None:
    p = _plan(variants=40)
    assert p.strategies["full_finetune"].training_usd == pytest.approx(40 * p.training["full"].usd)
    assert p.strategies["lorax"].training_usd == pytest.approx(40 * p.training["lora"].usd)
    assert p.training["lora"].usd < p.training["full"].usd


# ---- monotonicity ------------------------------------------------------------------------------------

_inputs = st.fixed_dictionaries(
    {
        "rps": st.floats(0.01, 300.0),
        "popularity": st.sampled_from(["uniform", "zipf"]),
        "zipf_exponent": st.floats(0.3, 3.0),
        "scale_to_zero": st.booleans(),
        "max_loras": st.sampled_from([None, 4]),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kw=_inputs, n=st.integers(1, 3000), extra=st.integers(1, 3000))
def test_more_variants_never_means_fewer_gpus_or_less_storage(kw: dict, n: int, extra: int) -> None:
    small, large = _plan(variants=n, **kw), _plan(variants=n + extra, **kw)
    for name in STRATEGIES:
        assert large.strategies[name].gpus >= small.strategies[name].gpus - 1e-9, name
        assert large.strategies[name].storage_bytes >= small.strategies[name].storage_bytes, name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kw=_inputs, n=st.integers(1, 3000), factor=st.floats(1.0, 50.0))
def test_more_traffic_never_means_fewer_gpus(kw: dict, n: int, factor: float) -> None:
    low = _plan(variants=n, **kw)
    kw = dict(kw, rps=kw["rps"] * factor)
    high = _plan(variants=n, **kw)
    for name in STRATEGIES:
        assert high.strategies[name].gpus >= low.strategies[name].gpus - 1e-9, name


def test_scale_to_zero_runs_fewer_gpus_and_says_how_long_a_cold_start_takes() -> None:
    a = assumptions()
    on, off = _plan(variants=1000, rps=1.0, scale_to_zero=True), _plan(variants=1000, rps=1.0)
    assert on.strategies["full_finetune"].gpus < off.strategies["full_finetune"].gpus
    # cold start = checkpoint bytes / storage bandwidth (13.48 GB at 2 GB/s by default)
    assert on.strategies["full_finetune"].cold_start_s == pytest.approx(on.checkpoint_bytes / a.storage_bytes_per_s)


# ---- popularity, caches, swaps --------------------------------------------------------------------


def test_swap_latency_is_adapter_bytes_over_the_slower_link_plus_overhead() -> None:
    a = assumptions().override({"storage_bytes_per_s": 1e9, "adapter_swap_overhead_s": 0.5})
    p = plan(PlanInputs(model="llama2-7b", variants=5000, gpu="a10g", rps=1.0), assumptions=a)
    s = p.strategies["lorax"]
    assert s.swap_latency_s == pytest.approx(p.adapter_file_bytes / 1e9 + 0.5)  # A10G is PCIe Gen4: 25 GB/s > 1 GB/s
    assert s.adapters.swap_from_cpu_s == pytest.approx(p.adapter_file_bytes / 25e9 + 0.5)
    res = s.adapters_resident
    assert res["gpu"] + res["cpu"] <= 5000 and res["disk"] == 5000
    assert 0 < s.adapters.gpu_miss_rate <= 1 and s.adapters.disk_miss_rate <= s.adapters.gpu_miss_rate


def test_vllm_engine_sizes_max_loras_within_the_variants() -> None:
    s = _plan(variants=3, rps=2.0).strategies["vllm_multi_lora"]
    assert s.engine == "vllm" and 1 <= s.memory.max_loras <= 3
    assert s.adapters_resident["gpu"] == s.memory.max_loras


# ---- output ------------------------------------------------------------------------------------------


def test_every_assumption_is_in_the_output() -> None:
    d = _plan().to_dict()
    assert set(d["strategies"]) == {"full_finetune", "lora", "lorax", "vllm_multi_lora"}
    for entry in d["strategies"].values():
        assert {"gpus", "usd_per_month", "storage_bytes", "training_usd"} <= set(entry)
    names = set(Assumptions.names()) | {"gpu_usd_per_hour", "gpu_bandwidth_bytes_per_s", "gpu_bf16_tflops",
                                         "gpu_usable_bytes", "storage_usd_per_gb_month"}
    assert names <= set(d["assumptions"])
    for name, entry in d["assumptions"].items():
        assert {"value", "unit", "source"} <= set(entry) and entry["source"], name


def test_sweep_finds_the_crossover_exactly() -> None:
    sw = sweep_variants(PlanInputs(model="llama2-7b", variants=1, gpu="a10g", rps=5.0), [1, 10, 100])
    cross = {tuple(c["pair"]): c for c in sw.crossovers}
    c = cross[("full_finetune", "lorax")]
    assert c["cheaper_from"] == "lorax"
    n = c["variants"]

    def cost(v: int, name: str) -> float:
        return _plan(variants=v, rps=5.0).strategies[name].usd_per_month

    assert cost(n, "lorax") < cost(n, "full_finetune")
    assert cost(n - 1, "lorax") >= cost(n - 1, "full_finetune")


def test_plan_frame_is_a_dataframe_and_pandas_loads_lazily() -> None:
    sw = sweep_variants(PlanInputs(model="llama2-7b", variants=1, gpu="a10g", rps=1.0), [1, 10])
    df = plan_frame(sw)
    assert list(df["strategy"]) == list(STRATEGIES) * 2 and list(df["variants"]) == [1] * 4 + [10] * 4
    code = "import sys, memplan.serving.fleet, memplan.serving.launch, memplan.commands.plan; print('pandas' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# ---- N-independent parts computed once ---------------------------------------------------------------

_ONCE_CASES = [
    {},
    {"max_loras": 4, "max_cpu_loras": 10, "max_lora_rank": 16},
    {"popularity": "zipf", "zipf_exponent": 1.1, "scale_to_zero": True},
    {"quant": "nf4", "train_quant": "nf4", "lora_rank": 64, "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj")},
    {"model": "mistral-7b", "gpu": "l4", "popularity": "zipf", "rps": 40.0},
    {"gpu": ("a10g", "l4", "h100"), "popularity": "zipf"},
    {"model": "llama3-70b", "gpu": "a100-80gb", "train_gpu": "h100"},
]


def _assert_same_plan(got: Plan, want: Plan) -> None:
    for f in fields(Plan):
        if f.name != "strategies":
            assert getattr(got, f.name) == getattr(want, f.name), f.name
    assert list(got.strategies) == list(want.strategies)
    for name in STRATEGIES:
        for f in fields(StrategyResult):
            assert getattr(got.strategies[name], f.name) == getattr(want.strategies[name], f.name), (name, f.name)
    assert got.to_dict() == want.to_dict()


@pytest.mark.parametrize("kw", _ONCE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults")
def test_context_computed_once_gives_the_plain_plan_at_every_n(kw: dict) -> None:
    # plan_at(plan_context(...), n) and sweep_variants must equal plan() run from scratch at each N,
    # field by field (floats exactly: the same operations in the same order).
    inp = PlanInputs(**{"model": "llama2-7b", "variants": 1, "gpu": "a10g", "rps": 5.0, **kw})  # type: ignore[arg-type]
    ns = (1, 2, 7, 10, 33, 100, 1_000, 10_000)
    ctx = plan_context(inp)
    swept = sweep_variants(inp, ns)
    assert [p.inputs.variants for p in swept.plans] == list(ns)
    for n, from_sweep in zip(ns, swept.plans):
        plain = plan(replace(inp, variants=n))
        _assert_same_plan(plan_at(ctx, n), plain)
        _assert_same_plan(from_sweep, plain)


def test_sweep_loads_the_model_and_prices_training_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The crossover search bisects between grid points (a dozen extra plans here); none of them
    # reloads the spec or re-estimates the two training jobs, which do not depend on N.
    calls = collections.Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    from memplan.serving import strategies  # where the N-independent context is built

    monkeypatch.setattr(strategies, "load_model", counted("load_model", strategies.load_model))
    monkeypatch.setattr(strategies, "training_cost", counted("training_cost", strategies.training_cost))
    sw = sweep_variants(PlanInputs(model="llama2-7b", variants=1, gpu="a10g", rps=5.0), [1, 10, 100, 1000])
    assert sw.crossovers  # the bisection ran
    assert calls == {"load_model": 1, "training_cost": 2}


def test_full_finetune_and_lora_share_one_serving_memory() -> None:
    p = _plan()
    full, lora = p.strategies["full_finetune"], p.strategies["lora"]
    assert full.memory is lora.memory and full.throughput is lora.throughput


# ---- the plan picks the hardware ----------------------------------------------------------------------


def test_without_gpu_each_strategy_costs_what_its_cheapest_single_gpu_plan_costs() -> None:
    # The choice is the minimum over catalog GPUs: plan each GPU alone (a plain single-GPU plan) and compare.
    from memplan.hardware.gpus import gpu_catalog
    from memplan.serving.memory import ServingError

    inp = PlanInputs(model="llama2-7b", variants=100, rps=5.0)
    chosen = plan(inp)
    assert chosen.gpu is None
    for name in STRATEGIES:
        alone = []
        for g in gpu_catalog().gpus:
            try:
                alone.append(plan(replace(inp, gpu=g.key)).strategies[name].usd_per_month)
            except ServingError:
                continue
        assert chosen.strategies[name].usd_per_month == min(alone), name
        runner = chosen.choices[name].runner_up
        assert runner is not None and runner.usd_per_month >= chosen.strategies[name].usd_per_month


def test_a_gpu_tuple_restricts_the_candidates() -> None:
    p = plan(PlanInputs(model="llama2-7b", variants=10, rps=1.0, gpu=("l4", "a100-80gb")))
    for name in STRATEGIES:
        assert {c.gpu for c in p.choices[name].candidates} == {"l4", "a100-80gb"}
        assert p.strategies[name].gpu.key in ("l4", "a100-80gb")


# ---- vllm_multi_lora --------------------------------------------------------------------------------

# REFERENCE.md serving formulas: vLLM reserves max_loras x max_lora_rank x layers x sum over wrapped
# linears of (d_in + d_out) x bytes. Llama-2-7B per layer: q,k,v,o 4 x (4096 + 4096), gate, up
# 2 x (4096 + 11008), down 11008 + 4096 = 78,080.
LLAMA2_7B_WRAPPED_PER_LAYER = 4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)


def test_vllm_slots_are_preallocated_at_max_lora_rank_for_every_wrapped_linear() -> None:
    s = _plan(variants=100, max_loras=4, max_lora_rank=12, lora_targets=("q_proj", "v_proj")).strategies["vllm_multi_lora"]
    # --max-lora-rank 12 is rounded up to 16 (vllm/config/lora.py allowed ranks); the slots cover every
    # linear vLLM wraps, not only the adapter's q_proj, v_proj; bf16 = 2 bytes.
    assert (s.memory.max_loras, s.memory.max_lora_rank) == (4, 16)
    assert s.memory.adapter_bytes == 4 * 16 * 32 * LLAMA2_7B_WRAPPED_PER_LAYER * 2 == 319_815_680


def test_vllm_cpu_cache_is_an_lru_of_max_cpu_loras() -> None:
    s = _plan(variants=100, max_loras=4, max_cpu_loras=10).strategies["vllm_multi_lora"]
    t = s.adapters
    assert (t.on_gpu, t.in_cpu_ram, t.on_disk) == (4, 6, 100)
    # Uniform popularity: an LRU cache of C of N items hits C / N exactly (Che's approximation is exact here).
    assert t.gpu_miss_rate == pytest.approx(1 - 4 / 100, abs=1e-6)
    assert t.disk_miss_rate == pytest.approx(1 - 10 / 100, abs=1e-6)


def test_vllm_default_cpu_cache_is_the_host_budget_in_bf16() -> None:
    # 32 GiB (data/serving.json host_adapter_cache_bytes) / (4,194,304 parameters x 2 bytes) = 4,096 adapters.
    s = _plan(variants=5000).strategies["vllm_multi_lora"]
    assert s.adapters.on_gpu + s.adapters.in_cpu_ram == 34_359_738_368 // (4_194_304 * 2) == 4096


def test_vllm_batch_holds_at_most_max_loras_distinct_adapters() -> None:
    # vllm/v1/core/sched/scheduler.py: a request whose LoRA is not among the step's waits once the step has
    # max_loras of them. One slot, 100 uniform variants: two requests hold 100 x (1 - 0.99^2) = 1.99
    # distinct adapters on average, more than one slot, so the batch is a single sequence.
    s = _plan(variants=100, max_loras=1).strategies["vllm_multi_lora"]
    assert s.throughput.batch == 1


def test_vllm_kernel_overhead_stretches_the_decode_step() -> None:
    # data/serving.json vllm_lora_kernel_overhead = 0.25: the step takes 1.25 x as long as without it.
    base = dict(model="llama2-7b", variants=100, gpu="a10g", rps=1.0, max_loras=8)
    with_k = plan(PlanInputs(**base)).strategies["vllm_multi_lora"]
    without = plan(PlanInputs(**base), assumptions=assumptions().override({"vllm_lora_kernel_overhead": 0})).strategies["vllm_multi_lora"]
    assert with_k.throughput.batch == without.throughput.batch
    assert with_k.throughput.decode_step_s == pytest.approx(1.25 * without.throughput.decode_step_s, rel=1e-12)


def test_vllm_max_cpu_loras_below_max_loras_is_refused() -> None:
    from memplan.errors import SetupError

    with pytest.raises(SetupError, match="must be at least --max-loras"):
        PlanInputs(model="llama2-7b", variants=10, rps=1.0, max_loras=8, max_cpu_loras=4)
