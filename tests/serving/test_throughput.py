"""memplan.serving.throughput: the decode/prefill roofline of one replica.

Reference values, written out by hand:
- REFERENCE.md "Decode": tokens/s per replica ~ batch x bandwidth x efficiency /
  (weight bytes + batch x context x KV bytes per token);
- REFERENCE.md counts and the GPU table: Llama-2-7B's 6,738,415,616 parameters, 512 KiB of
  bf16 KV per token, the A100 80GB's 2,039 GB/s and 312 TFLOP/s, the H100's 3,350 GB/s;
- the matmul parameter count derived from the published configs (Llama-2-7B: h 4096,
  I 11008, 32 layers, V 32000; Mixtral-8x7B: h 4096, I 14336, 8 KV heads of 128, 8 experts,
  2 per token), 2 FLOPs per multiply-accumulate (Kaplan et al. 2020, section 2.1);
- efficiencies from data/serving.json (decode 0.6 of bandwidth, prefill 0.5 of FLOP/s).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memplan.hardware.gpus import gpu_catalog
from memplan.model.catalog import load_model
from memplan.model.lora import plan_lora
from memplan.serving.memory import assumptions, serving_memory
from memplan.serving.throughput import decode_step_seconds, matmul_parameters, prefill_seconds, replica_throughput

KV_7B = 512 * 1024  # REFERENCE.md: Llama-2-7B bf16 KV bytes per token
A100_BW, A100_FLOPS = 2_039e9, 312e12  # REFERENCE.md GPU table
DECODE_EFF, PREFILL_EFF = 0.6, 0.5  # data/serving.json
# Llama-2-7B: per layer q,k,v,o 4 x 4096^2 + gate,up,down 3 x 4096 x 11008; lm_head 4096 x 32000.
LLAMA_LAYERS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
LLAMA_HEAD = 4096 * 32000


@pytest.fixture(scope="module")
def a():
    return assumptions()


@pytest.fixture(scope="module")
def llama():
    return load_model("llama2-7b")


def test_matmul_parameters_llama2_7b(llama) -> None:
    assert matmul_parameters(llama, with_output=False) == LLAMA_LAYERS == 6_476_005_376
    assert matmul_parameters(llama) == LLAMA_LAYERS + LLAMA_HEAD
    # = the published total less the embedding table and the 65 RMSNorm weights
    assert matmul_parameters(llama) == 6_738_415_616 - 32000 * 4096 - (2 * 32 + 1) * 4096


def test_matmul_parameters_mixtral_counts_two_of_eight_experts() -> None:
    spec = load_model("mixtral-8x7b")
    # attention q,o 4096^2, k,v 4096 x 1024; experts 2 (of 8) x 3 x 4096 x 14336 per token.
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 3 * 4096 * 14336
    hand = 32 * per_layer + 4096 * 32000
    # The router (32 x 4096 x 8 = 1,048,576, a matmul too) is not counted: 0.008%, under the
    # docstring's "norms and biases" threshold.
    assert matmul_parameters(spec) == pytest.approx(hand, rel=1e-4)
    assert spec.total_parameters == 46_702_792_704  # Mistral AI: "46.7B total parameters"


@pytest.mark.parametrize("batch, context", [(1, 1), (8, 512), (64, 2048)])
def test_decode_is_the_reference_bandwidth_formula_when_memory_bound(a, llama, batch: int, context: int) -> None:
    gpu = gpu_catalog().get("a100-80gb")
    mem = serving_memory(llama, gpu, a, engine="vllm")
    step, bound = decode_step_seconds(llama, gpu, a, mem, batch=batch, mean_context=context)
    weights = 6_738_415_616 * 2 + 512  # bf16 weights + the rotary inv_freq buffers (2 x 64 fp32)
    assert mem.weights_bytes == weights
    tokens_per_s = batch * A100_BW * DECODE_EFF / (weights + batch * context * KV_7B)
    assert bound == "memory"
    assert batch / step == pytest.approx(tokens_per_s, rel=1e-12)


def test_decode_turns_compute_bound_at_large_batch(a, llama) -> None:
    # With a huge batch of 1-token contexts the FLOPs dominate:
    # step = (2 x matmul params x batch + attention) / (312e12 x 0.5).
    gpu = gpu_catalog().get("a100-80gb")
    mem = serving_memory(llama, gpu, a, engine="vllm")
    batch = 100_000
    step, bound = decode_step_seconds(llama, gpu, a, mem, batch=batch, mean_context=1)
    flops = 2 * (LLAMA_LAYERS + LLAMA_HEAD) * batch + 4 * 32 * 32 * 128 * batch * 1
    assert bound == "compute"
    assert step == pytest.approx(flops / (A100_FLOPS * PREFILL_EFF), rel=1e-12)


def test_adapter_reads_and_overhead(a, llama) -> None:
    gpu = gpu_catalog().get("a100-80gb")
    mem = serving_memory(llama, gpu, a, engine="vllm")
    base, _ = decode_step_seconds(llama, gpu, a, mem, batch=4, mean_context=256)
    # 4 distinct bf16 r=8 q,v adapters: 4 x 4,194,304 params (REFERENCE.md) x 2 bytes more per step
    extra = 4 * 4_194_304 * 2
    with_reads, _ = decode_step_seconds(llama, gpu, a, mem, batch=4, mean_context=256, adapter_bytes_read=extra)
    assert with_reads - base == pytest.approx(extra / (A100_BW * DECODE_EFF), rel=1e-9)
    slowed, _ = decode_step_seconds(llama, gpu, a, mem, batch=4, mean_context=256, adapter_overhead=0.2)
    assert slowed == pytest.approx(1.2 * base, rel=1e-12)


def test_prefill_hand_count(a, llama) -> None:
    # 2 FLOPs x layer matmuls x tokens + logits for the last token only + causal attention
    # (half of 4 x layers x heads x head_dim x s^2), at 312 TFLOP/s x 0.5.
    gpu = gpu_catalog().get("a100-80gb")
    mem = serving_memory(llama, gpu, a, engine="vllm")
    s = 2048
    flops = 2 * LLAMA_LAYERS * s + 2 * LLAMA_HEAD + 4 * 32 * 32 * 128 * s * s // 2
    assert prefill_seconds(llama, gpu, a, mem, tokens=s) == pytest.approx(flops / (A100_FLOPS * PREFILL_EFF), rel=1e-12)
    # a 1-token prompt still streams the weights once: the memory floor
    assert prefill_seconds(llama, gpu, a, mem, tokens=1) == pytest.approx(mem.weights_bytes / (A100_BW * DECODE_EFF), rel=1e-12)


def test_tensor_parallel_splits_the_time(a) -> None:
    spec, gpu = load_model("llama3-70b"), gpu_catalog().get("h100")
    two = serving_memory(spec, gpu, a, engine="vllm", tp=2)
    four = serving_memory(spec, gpu, a, engine="vllm", tp=4)
    # same bytes moved (weights + KV), twice the aggregate bandwidth: half the step
    s2, _ = decode_step_seconds(spec, gpu, a, two, batch=1, mean_context=1)
    s4, _ = decode_step_seconds(spec, gpu, a, replace(four, kv_bytes_per_token=two.kv_bytes_per_token), batch=1, mean_context=1)
    assert s4 == pytest.approx(s2 / 2, rel=1e-12)
    # H100: 3,350 GB/s (REFERENCE.md)
    assert s2 == pytest.approx((two.weights_bytes + 1 * 1 * two.kv_bytes_per_token) / (2 * 3_350e9 * DECODE_EFF), rel=1e-12)


def test_replica_throughput_is_continuous_batching(a, llama) -> None:
    gpu = gpu_catalog().get("a100-80gb")
    mem = serving_memory(llama, gpu, a, engine="lorax", lora=plan_lora(llama, 8, None))
    prompt, output = 1024, 128
    r = replica_throughput(llama, gpu, a, mem, prompt_tokens=prompt, output_tokens=output)
    # KV capacity at 1,152 tokens = 72 blocks of 16 each (vLLM/LoRAX block size, data/serving.json)
    assert r.max_concurrent_sequences == mem.kv_cache_bytes // (16 * KV_7B) // 72
    assert r.batch == min(r.max_concurrent_sequences, 256)  # vLLM max_num_seqs default 256
    step, bound = decode_step_seconds(llama, gpu, a, mem, batch=r.batch, mean_context=prompt + output / 2)
    assert (r.decode_step_s, r.decode_bound) == (step, bound)
    assert r.tokens_per_s == pytest.approx(r.batch / step)
    per_request = prefill_seconds(llama, gpu, a, mem, tokens=prompt) + output * step / r.batch
    assert r.requests_per_s == pytest.approx(1 / per_request)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 128), st.integers(1, 128), st.integers(1, 4096), st.sampled_from(["t4", "a10g", "a100-80gb", "h100"]))
def test_decode_rate_rises_with_batch_and_falls_with_context(a, llama, batch, extra, context, gpu_key) -> None:
    gpu = gpu_catalog().get(gpu_key)
    mem = serving_memory(llama, gpu, a, engine="vllm") if gpu_key != "t4" else serving_memory(load_model("tinyllama-1.1b"), gpu, a, engine="vllm")
    spec = llama if gpu_key != "t4" else load_model("tinyllama-1.1b")
    rate = lambda b, c: b / decode_step_seconds(spec, gpu, a, mem, batch=b, mean_context=c)[0]  # noqa: E731
    assert rate(batch + extra, context) >= rate(batch, context)
    assert rate(batch, context + extra) <= rate(batch, context)
    # never past the compute roof: FLOP/s x efficiency / (2 FLOPs x matmul params)
    assert rate(batch, context) <= gpu.bf16_tflops * 1e12 * PREFILL_EFF / (2 * matmul_parameters(spec)) * (1 + 1e-12)
