"""Requests per second one replica can serve: a roofline over decode and prefill.

- Decode is memory-bandwidth bound: every step streams the weights once plus the KV
  cache of every sequence in the batch, so tokens/s ~ batch x bandwidth x efficiency /
  (weight bytes + batch x context x KV bytes per token) (Pope et al. 2022, "Efficiently
  scaling Transformer inference", arXiv:2211.05102, section 2: memory time vs compute time).
- Prefill is compute bound: 2 FLOPs per multiply-accumulate over the matmul parameters
  per token (Kaplan et al. 2020, arXiv:2001.08361, section 2.1), plus causal attention.
- Each phase takes the larger of its memory time and its compute time (the roofline
  model: Williams, Waterman, Patterson 2009, "Roofline", CACM 52(4)).
- Continuous batching: a request costs its prefill plus its share of every decode step
  it is in (iteration-level scheduling: Yu et al. 2022, "Orca", OSDI '22, section 3).
Efficiencies are named in `data/serving.json`. Ignores: speculative decoding, prefix
caching, chunked-prefill interference and network time.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.hardware.gpus import GPU
from memplan.serving.memory import Assumptions, ServingMemory
from memplan.model.spec import ModelSpec

__all__ = ["ReplicaThroughput", "matmul_parameters", "decode_step_seconds", "prefill_seconds", "replica_throughput"]


def matmul_parameters(spec: ModelSpec, *, with_output: bool = True) -> int:
    """Weights a token is multiplied by: every linear (a tied lm_head too, it is still a
    matmul) and, for MoE, experts_per_token / num_experts of the expert weights.
    Embedding lookups are not matmuls (Kaplan et al. 2020 count non-embedding parameters),
    and norm weights and biases only scale or shift (under 0.01% of a 7B model)."""
    linears = sum(lin.weight_numel * lin.count for lin in spec.linears if with_output or not lin.is_output)
    experts = sum(t.numel * t.count for t in spec.tensors if t.component == "experts")
    if spec.num_experts:
        experts = experts * spec.experts_per_token // spec.num_experts
    return linears + experts


def _attention_flops(spec: ModelSpec, *, query_tokens: int, context_tokens: int) -> int:
    # QK^T and AV: 2 FLOPs x heads x head_dim per (query, key) pair, twice, per layer
    # ("attention logits" + "attention reduce": Hoffmann et al. 2022, arXiv:2203.15556, appendix F).
    return 4 * spec.num_layers * spec.num_heads * spec.head_dim * query_tokens * context_tokens


def decode_step_seconds(
    spec: ModelSpec, gpu: GPU, a: Assumptions, mem: ServingMemory, *, batch: int, mean_context: float,
    adapter_bytes_read: float = 0.0, adapter_overhead: float = 0.0,
) -> tuple[float, str]:
    """Seconds of one decode step for `batch` sequences, and which bound sets it.

    bytes = weights + batch x mean_context x KV bytes/token + distinct adapters' weights
    (SGMV reads each adapter in the batch once per step); FLOPs = 2 x matmul params x batch
    + attention. `adapter_overhead` multiplies the step (LoRAX heterogeneous batches).
    """
    bytes_moved = mem.weights_bytes + batch * mean_context * mem.kv_bytes_per_token + adapter_bytes_read
    flops = 2 * matmul_parameters(spec) * batch + _attention_flops(spec, query_tokens=batch, context_tokens=int(mean_context))
    t_mem = bytes_moved / (mem.tp * gpu.bandwidth_bytes_per_s * a.decode_bandwidth_efficiency)
    t_flops = flops / (mem.tp * gpu.bf16_tflops * 1e12 * a.prefill_compute_efficiency)
    bound = "memory" if t_mem >= t_flops else "compute"
    return max(t_mem, t_flops) * (1.0 + adapter_overhead), bound


def prefill_seconds(spec: ModelSpec, gpu: GPU, a: Assumptions, mem: ServingMemory, *, tokens: int) -> float:
    """GPU-seconds to prefill one prompt of `tokens`: logits only for its last token (engines
    skip the rest: `vllm/v1/worker/gpu_model_runner.py::GPUModelRunner.execute_model` takes
    `hidden_states[logits_indices]`); causal attention is half of the full s x s product
    (query i sees i keys: sum over i of i ~ s^2 / 2; flash kernels skip the masked blocks)."""
    flops = 2 * matmul_parameters(spec, with_output=False) * tokens
    flops += 2 * (matmul_parameters(spec) - matmul_parameters(spec, with_output=False))
    flops += _attention_flops(spec, query_tokens=tokens, context_tokens=tokens) // 2
    t_flops = flops / (mem.tp * gpu.bf16_tflops * 1e12 * a.prefill_compute_efficiency)
    t_mem = mem.weights_bytes / (mem.tp * gpu.bandwidth_bytes_per_s * a.decode_bandwidth_efficiency)
    return max(t_flops, t_mem)


@dataclass(frozen=True)
class ReplicaThroughput:
    """Steady-state capacity of one replica at full batch."""

    batch: int  # sequences decoded per step: min(KV capacity, max_batch_sequences)
    max_concurrent_sequences: int  # KV capacity alone at prompt + output tokens
    decode_step_s: float
    decode_bound: str
    prefill_s: float  # GPU-seconds per request
    tokens_per_s: float  # decode tokens/s at `batch`
    requests_per_s: float  # 1 / GPU-seconds per request


def replica_throughput(
    spec: ModelSpec, gpu: GPU, a: Assumptions, mem: ServingMemory, *, prompt_tokens: int, output_tokens: int,
    distinct_adapters: float = 0.0, adapter_bytes: int = 0, adapter_overhead: float = 0.0, max_batch: int | None = None,
) -> ReplicaThroughput:
    """Continuous batching: a request costs its prefill plus output_tokens / batch decode steps.

    GPU-seconds per request = prefill + output x step(batch) / batch; capacity is its inverse.
    The mean context during decode is prompt + output / 2. `max_batch` caps the batch below
    what the KV cache and max_num_seqs allow (vLLM's scheduler limit on distinct LoRAs per step).
    """
    concurrent = mem.max_sequences(prompt_tokens + output_tokens)
    batch = max(1, min(concurrent, a.max_batch_sequences, max_batch if max_batch is not None else concurrent))
    step, bound = decode_step_seconds(
        spec, gpu, a, mem, batch=batch, mean_context=prompt_tokens + output_tokens / 2,
        adapter_bytes_read=min(distinct_adapters, batch) * adapter_bytes, adapter_overhead=adapter_overhead,
    )
    prefill = prefill_seconds(spec, gpu, a, mem, tokens=prompt_tokens)
    per_request = prefill + output_tokens * step / batch
    return ReplicaThroughput(
        batch=batch, max_concurrent_sequences=concurrent, decode_step_s=step, decode_bound=bound,
        prefill_s=prefill, tokens_per_s=batch / step, requests_per_s=1.0 / per_request,
    )
