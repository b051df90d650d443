"""Serving memory per replica (memplan.serving.memory) and the throughput roofline (memplan.serving.throughput)."""

from __future__ import annotations

import json

import pytest

from memplan.model.catalog import load_model
from memplan.hardware.gpus import gpu_catalog
from memplan.model.lora import plan_lora
from memplan.paths import data_dir
from memplan.serving.memory import (
    Assumptions,
    ServingError,
    assumptions,
    kv_bytes_per_token,
    serving_memory,
    smallest_tensor_parallel_fit,
    vllm_lora_slot_bytes,
)
from memplan.serving.throughput import decode_step_seconds, prefill_seconds, replica_throughput

KIB = 1024


@pytest.fixture(scope="module")
def a() -> Assumptions:
    return assumptions()


# ---- KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, expected",
    [
        # REFERENCE.md serving formulas: bf16 KV per token.
        ("llama2-7b", 512 * KIB),
        ("llama3-8b", 128 * KIB),
        ("mistral-7b", 128 * KIB),
        ("llama3-70b", 320 * KIB),
    ],
)
def test_kv_bytes_per_token_matches_reference(a: Assumptions, model: str, expected: int) -> None:
    assert kv_bytes_per_token(load_model(model), a) == expected


def test_kv_heads_replicate_when_tp_exceeds_them(a: Assumptions) -> None:
    # Qwen2.5-1.5B config: 28 layers, 2 KV heads of 128. At TP 4 each GPU holds one KV head
    # (vLLM replicates), so the replica stores 4 heads: 2 * 28 * 4 * 128 * 2 bytes.
    spec = load_model("qwen2.5-1.5b")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (28, 2, 128)
    assert kv_bytes_per_token(spec, a, tp=1) == 2 * 28 * 2 * 128 * 2
    assert kv_bytes_per_token(spec, a, tp=4) == 2 * 28 * 4 * 128 * 2


# ---- the engines' KV budget against their own logs --------------------------------------------


@pytest.mark.parametrize(
    "gpu, logged_blocks, where",
    [
        # vllm-project/vllm PR #2031 (2023-12): "Llama2-7B with TP=1 and 1xA100-80GB: # GPU blocks: 7351".
        ("a100-80gb", 7351, "vllm PR #2031"),
        # kubernetes-sigs/gateway-api-inference-extension PR #550 (2025-03), vLLM on an H100 80GB:
        # weights 12.55 GiB, "# cuda blocks: 7191" for the same 16-token, 512 KiB/token blocks.
        ("h100", 7191, "gateway-api-inference-extension PR #550"),
    ],
)
def test_vllm_kv_blocks_match_logged_runs(a: Assumptions, gpu: str, logged_blocks: int, where: str) -> None:
    # Tolerance 5%: those runs profiled a different activation peak (2.38 GiB in the H100 log,
    # for an unlogged batch size) and did not charge the CUDA context or graphs as we do.
    mem = serving_memory(load_model("llama2-7b"), gpu_catalog().get(gpu), a, engine="vllm")
    assert mem.weights_bytes == 13_476_831_744  # 6,738,415,616 params x 2 bytes = the logs' 12.55 GiB
    assert mem.kv_blocks == pytest.approx(logged_blocks, rel=0.05), where


# Published configs and totals: (parameters, hidden, intermediate, layers, kv_heads, vocab, GPU
# usable MiB from REFERENCE.md's nvidia-smi column). head_dim is 128 for all three.
SERVED = {
    # REFERENCE.md: Llama-2-7B 6,738,415,616 parameters; config h 4096, I 11008, 32 layers, 32 KV heads.
    "llama2-7b": (6_738_415_616, 4096, 11008, 32, 32, 32000),
    # meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters; h 4096, I 14336, 32 layers, 8 KV heads, V 128,256.
    "llama3-8b": (8_030_261_248, 4096, 14336, 32, 8, 128256),
    # Qwen/Qwen2.5-7B: 7,615,616,512 parameters; h 3584, I 18944, 28 layers, 4 KV heads, V 152,064.
    "qwen2.5-7b": (7_615_616_512, 3584, 18944, 28, 4, 152064),
}
USABLE_MIB = {"a10g": 23_028, "l4": 23_034, "h200": 143_771}  # REFERENCE.md GPU table


@pytest.mark.parametrize("engine", ["vllm", "lorax"])
@pytest.mark.parametrize("model, gpu", [("llama2-7b", "a10g"), ("llama3-8b", "l4"), ("qwen2.5-7b", "h200")])
def test_memory_parts_equal_independent_terms_and_fill_the_gpu(a: Assumptions, engine: str, model: str, gpu: str) -> None:
    """Every part is derived here from published counts and data/serving.json's values (not from
    memplan.serving), and only the engine's own headroom plus less than one KV block is left over.
    (A check that the parts sum to the total would pass by construction: `unallocated` is the rest.)"""
    params, h, inter, layers, kv_heads, vocab = SERVED[model]
    usable = USABLE_MIB[gpu] * 2**20
    spec = load_model(model)
    mem = serving_memory(spec, gpu_catalog().get(gpu), a, engine=engine, lora=plan_lora(spec, 16, None), max_loras=4)  # type: ignore[arg-type]
    # bf16 weights, plus the rotary inv_freq and original_inv_freq buffers (2 x 64 fp32 values)
    weights = 2 * params + 2 * 64 * 4
    context = 718_077_952  # data/serving.json cuda_context_bytes (measured on an H100)
    graphs = 536_870_912 if engine == "vllm" else 0  # data/serving.json cuda_graph_bytes; LoRAX captures none
    # memory.py docstring: (4h + 3I) x 2 bytes per prefill token (4,096 tokens) + fp32 logits of 256 sequences
    act = 4096 * (4 * h + 3 * inter) * 2 + 256 * vocab * 4
    kv_token = 2 * layers * kv_heads * 128 * 2  # REFERENCE.md KV per token, bf16
    block = 16 * kv_token
    if engine == "vllm":
        # REFERENCE.md: max_loras x max_lora_rank x layers x sum over wrapped linears of (d_in + d_out) x 2
        kv_width = kv_heads * 128
        per_layer = 2 * (h + h) + 2 * (h + kv_width) + 2 * (h + inter) + (inter + h)
        adapters = 4 * 16 * layers * per_layer * 2
        free = int(usable * 0.9) - weights - context - graphs - act - adapters  # gpu_memory_utilization 0.9
        headroom = usable - int(usable * 0.9)
    else:
        adapters = int(0.1 * usable)  # LoRAX --adapter-memory-fraction 0.1
        after = usable - weights - context - act - adapters
        free = int(after * 0.95)  # LoRAX MEMORY_WIGGLE_ROOM
        headroom = after - free
    kv = free // block * block
    assert (mem.gpu_bytes, mem.weights_bytes, mem.cuda_context_bytes, mem.cuda_graph_bytes) == (usable, weights, context, graphs)
    assert (mem.activation_bytes, mem.adapter_bytes, mem.kv_bytes_per_token, mem.kv_cache_bytes) == (act, adapters, kv_token, kv)
    assert kv > 0 and mem.kv_blocks == free // block
    assert 0 <= mem.unallocated_bytes - headroom < block
    assert weights + context + graphs + act + adapters + kv + mem.unallocated_bytes == usable


def test_lorax_reserves_its_adapter_fraction_off_the_kv_cache(a: Assumptions) -> None:
    spec, gpu = load_model("llama2-7b"), gpu_catalog().get("a100-80gb")
    plain = serving_memory(spec, gpu, a, engine="lorax")
    with_adapters = serving_memory(spec, gpu, a, engine="lorax", lora=plan_lora(spec, 8, None))
    # LoRAX --adapter-memory-fraction 0.1 of total GPU memory (launcher default).
    assert with_adapters.adapter_bytes == int(0.1 * gpu.usable_bytes)
    assert with_adapters.kv_cache_bytes < plain.kv_cache_bytes
    assert plain.adapter_bytes == 0


def test_vllm_lora_slots_follow_the_reference_formula(a: Assumptions) -> None:
    # REFERENCE.md: max_loras * max_lora_rank * layers * sum over wrapped linears (d_in + d_out) * bytes.
    # Llama-2-7B per layer: q,k,v,o 4 x (4096 + 4096); gate, up 2 x (4096 + 11008); down 11008 + 4096.
    per_layer = 4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)
    spec = load_model("llama2-7b")
    assert vllm_lora_slot_bytes(spec, max_lora_rank=16, dtype_bytes=2) == 16 * 32 * per_layer * 2
    base = serving_memory(spec, gpu_catalog().get("a100-80gb"), a, engine="vllm")
    four = serving_memory(spec, gpu_catalog().get("a100-80gb"), a, engine="vllm", lora=plan_lora(spec, 16, None), max_loras=4)
    assert four.adapter_bytes == 4 * 16 * 32 * per_layer * 2
    assert four.kv_cache_bytes < base.kv_cache_bytes


def test_fewer_sequences_fit_at_longer_contexts(a: Assumptions) -> None:
    mem = serving_memory(load_model("llama3-8b"), gpu_catalog().get("a100-80gb"), a, engine="vllm")
    counts = [mem.max_sequences(c) for c in (512, 2048, 8192, 32768)]
    assert counts == sorted(counts, reverse=True) and counts[-1] >= 1
    # A 17-token sequence takes two 16-token blocks.
    assert mem.max_sequences(17) == mem.kv_blocks // 2


@pytest.mark.parametrize(
    "model, gpu, tp",
    [
        ("llama2-7b", "a10g", 1),  # 13.5 GB of weights on a 24 GB card
        ("llama3-70b", "a100-80gb", 2),  # 141 GB of bf16 weights: more than one 80 GB card, less than two
        ("gpt3-175b", "h100", 8),  # 349 GB: more than 4 x 80 GB
    ],
)
def test_smallest_tensor_parallel_fit_is_the_fewest_gpus_that_hold_the_weights(a: Assumptions, model: str, gpu: str, tp: int) -> None:
    mem = smallest_tensor_parallel_fit(load_model(model), gpu_catalog().get(gpu), a, engine="vllm", context_tokens=2048)
    assert mem.tp == tp


def test_quantized_weights_need_fewer_gpus(a: Assumptions) -> None:
    # 70B in NF4 is about 0.56 bytes per weight: ~40 GB, one 80 GB card.
    mem = smallest_tensor_parallel_fit(load_model("llama3-70b"), gpu_catalog().get("a100-80gb"), a, engine="lorax",
                                 context_tokens=2048, quant="nf4")
    assert mem.tp == 1


def test_a_model_too_big_for_eight_gpus_is_an_error(a: Assumptions) -> None:
    with pytest.raises(ServingError, match="does not fit on up to 8 x t4"):
        smallest_tensor_parallel_fit(load_model("llama3-70b"), gpu_catalog().get("t4"), a, engine="vllm", context_tokens=2048)


# ---- assumptions ----------------------------------------------------------------------------


def test_every_assumption_has_a_value_unit_and_source() -> None:
    raw = json.loads((data_dir() / "serving.json").read_text())["assumptions"]
    assert set(raw) == set(Assumptions.names())
    for name, entry in raw.items():
        assert set(entry) >= {"value", "unit", "source"}, name
        assert entry["unit"].strip() and len(entry["source"]) > 20, name


def test_overrides_parse_types_and_are_marked(a: Assumptions) -> None:
    b = a.override({"decode_bandwidth_efficiency": "0.75", "kv_block_tokens": "32", "train_grad_checkpointing": "false"})
    assert b.decode_bandwidth_efficiency == 0.75 and b.kv_block_tokens == 32 and b.train_grad_checkpointing is False
    assert b.sources["decode_bandwidth_efficiency"] == "user override"
    assert a.decode_bandwidth_efficiency == 0.6  # the defaults are untouched


@pytest.mark.parametrize(
    "values, message",
    [
        ({"decode_bandwidth_efficency": "0.5"}, "did you mean decode_bandwidth_efficiency"),
        ({"training_mfu": "1.5"}, "training_mfu must be in"),
        ({"kv_block_tokens": "16.5"}, "kv_block_tokens must be an integer"),
        ({"storage_bytes_per_s": "fast"}, "storage_bytes_per_s must be a number"),
        ({"adapter_save_dtype": "int4"}, "adapter_save_dtype must be one of"),
    ],
)
def test_bad_overrides_are_errors(a: Assumptions, values: dict, message: str) -> None:
    with pytest.raises(ServingError, match=message):
        a.override(values)


# ---- throughput ---------------------------------------------------------------------------------


def test_decode_never_beats_the_measured_linear_chain(a: Assumptions) -> None:
    # Measured for this project on an H100 SXM (torch 2.11, 2026-11): the 224 bf16 linears of
    # Llama-2-7B alone took 5.31-5.41 ms per step at batch 1-64 under a CUDA graph. A whole
    # decode step, which also reads the KV cache and embeddings, cannot be faster.
    spec, gpu = load_model("llama2-7b"), gpu_catalog().get("h100")
    mem = serving_memory(spec, gpu, a, engine="vllm")
    for batch in (1, 8, 64):
        step, bound = decode_step_seconds(spec, gpu, a, mem, batch=batch, mean_context=1)
        assert step >= 5.31e-3 and bound == "memory"


def test_prefill_never_beats_the_measured_linear_chain(a: Assumptions) -> None:
    # Same measurement: the linears of Llama-2-7B on 4096 tokens took 78.8 ms (673 TFLOP/s).
    spec, gpu = load_model("llama2-7b"), gpu_catalog().get("h100")
    mem = serving_memory(spec, gpu, a, engine="vllm")
    assert prefill_seconds(spec, gpu, a, mem, tokens=4096) >= 78.8e-3


def test_batching_raises_tokens_per_second_but_not_past_the_compute_roof(a: Assumptions) -> None:
    spec, gpu = load_model("llama2-7b"), gpu_catalog().get("a100-80gb")
    mem = serving_memory(spec, gpu, a, engine="vllm")
    rates = [b / decode_step_seconds(spec, gpu, a, mem, batch=b, mean_context=512)[0] for b in (1, 4, 16, 64)]
    assert rates == sorted(rates)
    # Datasheet roof: 312 TFLOP/s / (2 FLOPs x 6.74e9 parameters) = 23,150 tokens/s.
    assert max(rates) < 312e12 / (2 * 6_738_415_616)


def test_lorax_overhead_and_adapter_reads_lower_capacity(a: Assumptions) -> None:
    spec, gpu = load_model("llama2-7b"), gpu_catalog().get("a10g")
    mem = serving_memory(spec, gpu, a, engine="lorax", lora=plan_lora(spec, 8, None))
    base = replica_throughput(spec, gpu, a, mem, prompt_tokens=512, output_tokens=128)
    mixed = replica_throughput(spec, gpu, a, mem, prompt_tokens=512, output_tokens=128, distinct_adapters=8,
                               adapter_bytes=8_388_608, adapter_overhead=a.lorax_adapter_batch_overhead)
    assert mixed.requests_per_s < base.requests_per_s
    assert mixed.batch == base.batch == min(base.max_concurrent_sequences, a.max_batch_sequences)
