"""memplan.training.sharding_zero / zero_gather: per-GPU DeepSpeed ZeRO-1/2/3 terms.

Reference values, by test:
- arXiv:1910.02054 (ZeRO) section 3.1: mixed-precision Adam keeps K = 12 bytes per trainable parameter
  (4 fp32 master + 8 for the two fp32 moments), divided by N from stage 1 on; section 5: stages 1/2 keep
  the 2-byte model whole, stage 3 divides it by N;
- DeepSpeed's config: the reduce bucket is reduce_bucket_size elements of the 2-byte model dtype
  (`stage_1_and_2.py::setup_buckets`, `stage3.py::_setup_for_real_optimizer`); Trainer's "auto" value is
  hidden² (`transformers/integrations/deepspeed.py::trainer_config_finalize`), DeepSpeed's default 5e8;
- torch: `torch/optim/adamw.py::_single_tensor_adamw` makes two temporaries the size of a state;
- the CPU storage ledger at world size 2 (DeepSpeed 0.19.8, torch 2.13, tiny llama h 256, 2 layers, vocab
  1000, seq 64, batch 1, recipe trainer unless a test says otherwise; rank 0 and rank 1 are identical):
  per-rank steady peaks, the buffers DeepSpeed held at the peak (`measured.comm_buffers_at_peak`,
  `breakdown_at_peak`) and the forward activations, each quoted where used, with the tolerance it is held to.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memplan.model.catalog import load_model
from memplan.training.estimate import estimate
from memplan.training.recipes import adapter_dtype
from memplan.training.setup import Setup
from memplan.training.sharding_zero import zero_partition

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny"
LLAMA = str(TINY / "tiny-llama")
H, I, V, LAYERS = 256, 688, 1000, 2  # tests/data/tiny/tiny-llama/config.json
PSI = V * H * 2 + LAYERS * (4 * H * H + 3 * H * I + 2 * H) + H  # embed, lm_head, layers, final norm: 2,094,336
ZERO = ("zero1", "zero2", "zero3")


def _setup(parallel: str, **kw: object) -> Setup:
    base: dict = dict(model=LLAMA, method="full", quant="bf16", seq_len=64, batch_size=1, device="cpu", gpus=2,
                      recipe="trainer", parallel=parallel)
    return Setup(**{**base, **kw})


def _est(parallel: str, **kw: object):
    return estimate(_setup(parallel, **kw))


def _terms(setup: Setup):
    """The layout's own terms (estimate's private step from the setup to memplan.training.sharding)."""
    from memplan.training.estimate import _fixed, _layout

    spec = load_model(setup.model)
    return _layout(spec, setup, _fixed(spec, setup))


@pytest.mark.parametrize("parallel", ZERO)
@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_master_and_adam_state_are_k12_bytes_per_parameter_over_n(parallel: str, gpus: int) -> None:
    # ZeRO paper section 3.1, K = 12; on CUDA (FusedAdam) there is no device step tensor. PSI is a
    # multiple of 2N for these N, so no padding enters.
    s = _est(parallel, gpus=gpus, gpus_per_node=gpus, device="cuda").sharding
    assert s is not None
    assert s.master_weights + s.optimizer_states == 12 * PSI // gpus


@pytest.mark.parametrize("parallel, weight_bytes", [("zero1", 2 * PSI), ("zero2", 2 * PSI), ("zero3", 2 * PSI // 2)])
def test_stages_1_and_2_keep_the_whole_bf16_model_stage_3_a_half(parallel: str, weight_bytes: int) -> None:
    # ZeRO paper section 5 (P_os, P_os+g keep the 2-byte parameters; P_os+g+p divides them by N); + the
    # 256-byte rotary inv_freq buffer, which ZeRO never partitions (ledger: parameters 4,188,928 / 2,094,592).
    s = _est(parallel).sharding
    assert s is not None and s.parameters == weight_bytes + 256


@pytest.mark.parametrize("recipe, elements", [("trainer", H * H), ("plain", 500_000_000)])
def test_stage3_keeps_one_reduce_bucket_of_the_configured_size(recipe: str, elements: int) -> None:
    # reduce_bucket_size elements of bf16, made once (stage3.py::_setup_for_real_optimizer), and the
    # 1-byte inf_or_nan_tracker: ledger comm_buffers at the optimizer peak 131,073 (trainer), 1,000,000,001 (plain).
    s = _est("zero3", recipe=recipe).sharding
    assert s is not None and s.comm_buffers == 2 * elements + 1


def test_stage2_reduce_bucket_lives_only_in_the_backward() -> None:
    # stage_1_and_2.py::setup_buckets at the first gradient hook, _release_ipg_buffers in the epilogue:
    # DeepSpeed's 5e8-element default is 1e9 bytes per rank at the backward peak (ledger: plain ZeRO-2 full,
    # comm_buffers 1,004,188,672 = the bucket + the flattened all-reduce copy of every gradient, 2*PSI).
    e = _est("zero2", recipe="plain")
    assert e.sharding is not None and e.sharding.comm_buffers == 0
    assert e.memory.peak_phase.startswith("backward")
    assert e.peak_parts["comm_buffers"] == 1_000_000_000 + 2 * PSI


def test_partition_holds_every_parameter_that_overlaps_it() -> None:
    # stage_1_and_2.py: P = the flat group padded to 2N, over N; get_partition_info puts every parameter that
    # overlaps a rank's range in it. tiny llama in model order: rank 0 ends 128 elements into layer 1's
    # q_proj, so its grads_in_partition holds 1,112,576 elements (ledger: 2,225,152 bytes of bf16 on rank 0).
    layer = [H * H] * 4 + [H * I] * 3 + [H, H]
    numels = [V * H] + layer * LAYERS + [H, V * H]
    assert zero_partition(numels, 2) == (1_047_168, 1_112_576)


def test_partition_pads_to_a_multiple_of_twice_the_ranks() -> None:
    # nccl_start_alignment_factor (2) x dp size: 11 elements over 4 ranks pad to 16, P = 4.
    assert zero_partition([5, 6], 4)[0] == 4


@pytest.mark.parametrize("parallel, peak", [("zero1", 29_321_488), ("zero2", 29_321_488), ("zero3", 29_452_581)])
def test_full_fine_tuning_peaks_in_the_step_as_the_ledger_measured(parallel: str, peak: int) -> None:
    # Ledger steady peaks (step3_optimizer), full bf16, gc off; held to 1% (the median bound).
    e = _est(parallel)
    assert e.memory.peak_phase == "optimizer_step"
    assert e.memory.allocated_peak == pytest.approx(peak, rel=0.01)


def test_step_temporaries_follow_the_optimizer_on_each_device() -> None:
    # stage_1_and_2.py::step: `self.flatten(averaged_gradients)` (bf16, P) and its fp32 cast (4P) while
    # grads_in_partition (2 x 1,112,576 bytes on rank 0, see above) is alive; then the optimizer over the
    # fp32 partition. CPU: torch AdamW's single-tensor path adds sqrt and quotient of exp_avg_sq (2 x 4P), the
    # ledger's 12,566,028 bytes of step temporaries (+12 of scalars). CUDA: FusedAdam adds nothing.
    p = PSI // 2
    assert _est("zero2").peak_parts["transients"] == 4 * p + 2 * 4 * p
    assert _est("zero2", device="cuda").peak_parts["transients"] == 2 * 1_112_576 + 2 * p + 4 * p


@pytest.mark.parametrize("parallel", ZERO)
def test_deepspeeds_bf16_engine_casts_lora_adapters_to_bf16(parallel: str) -> None:
    # deepspeed/runtime/engine.py::_cast_module_mixed_precision casts every float parameter to the engine
    # dtype; without DeepSpeed PEFT keeps them fp32 (autocast_adapter_dtype).
    assert adapter_dtype(_setup(parallel, method="lora")) == "bf16"
    assert adapter_dtype(_setup("none", method="lora", gpus=1)) == "fp32"


@pytest.mark.parametrize("method, quant, peak", [("lora", "bf16", 6_230_440), ("lora", "nf4", 3_958_568)])
def test_zero2_lora_peak_in_the_loss_backward(method: str, quant: str, peak: int) -> None:
    # Ledger: ZeRO-2 LoRA q,v r8 / QLoRA (bf16 quant storage), gc off: 6,230,440 / 3,958,568 (1%).
    kw = dict(quant_storage="bf16") if quant == "nf4" else {}
    e = _est("zero2", method=method, quant=quant, **kw)
    assert e.memory.allocated_peak == pytest.approx(peak, rel=0.01)


def test_zero3_keeps_every_weight_used_in_the_backward_gathered_from_forward_to_backward() -> None:
    # Ledger, ZeRO-3 LoRA q,v gc off, backward peak: the gathered buffers are lm_head, all of layer 1 and
    # layer 0 from o_proj on (q/k/v of layer 0 see an input without grad, the frozen embedding is not in
    # the backward): 3,280,896 bytes; the persistent norms and adapters (<= 10h elements) 35,328 more.
    gathered = 2 * (V * H + (4 * H * H + 3 * H * I) + (H * H + 3 * H * I))
    persistent = 2 * (5 * H + LAYERS * 2 * (8 * H + H * 8))
    e = _est("zero3", method="lora")
    assert e.memory.peak_phase == "backward_loss"
    assert e.peak_parts["gathered"] == gathered + persistent
    assert gathered == 3_280_896


def test_zero3_with_checkpointing_keeps_the_whole_model() -> None:
    # With checkpointing every layer is recomputed and the embedding's output requires grad (transformers 5
    # enable_input_require_grads): ledger gathered 4,186,112 = every non-persistent weight.
    e = _est("zero3", method="lora", grad_checkpointing=True)
    gathered = 2 * (2 * V * H + LAYERS * (4 * H * H + 3 * H * I))
    assert e.peak_parts["gathered"] - 2 * (5 * H + LAYERS * 2 * 16 * H) == gathered == 4_186_112


def test_zero3_full_fine_tune_gathers_the_whole_model_at_the_forward_end() -> None:
    # Every parameter is in the backward; Ψ << stage3_max_reuse_distance: 2 bytes x Ψ gathered on each
    # rank (ledger forward comm_buffers 4,317,185 = 4,186,112 + bucket 131,073, + 2,560 persistent norms).
    terms = _terms(_setup("zero3"))
    assert terms.inflight["forward"] == 2 * PSI
    assert terms.inflight["optimizer_step"] == 0  # stage3.py::step -> _partition_all_parameters first


def test_zero3_reuse_distance_bounds_what_a_large_model_keeps() -> None:
    # partitioned_param_coordinator.py::__params_to_release keeps a parameter when its next use is fewer than
    # stage3_max_reuse_distance (1e9) trace elements ahead. For Llama-2-70B (config: h 8192, 8 KV heads of
    # 128, I 28672, V 32000) at the forward's end: the head (next used first) and the last layer (2 x head =
    # 0.52e9 ahead) are kept; the layer before it is 2 x (0.86e9 + 0.26e9) ahead and is released. Plus the
    # persistent tensors (<= 10h elements: norms, the r8 adapters of q and v).
    h, kv, inter, vocab, layers = 8192, 1024, 28672, 32000, 80
    setup = Setup(model="llama2-70b", method="lora", quant="bf16", seq_len=1024, batch_size=1, gpus=8, parallel="zero3")
    terms = _terms(setup)
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    persistent = layers * (2 * h + 8 * h + 8 * h + 8 * h + 8 * kv) + h
    assert terms.inflight["forward"] == 2 * (vocab * h + layer + persistent)


def test_zero3_linear_saves_frozen_linear_inputs_under_lora() -> None:
    # zero/linear.py::LinearFunctionForZeroStage3 saves every recorded F.linear input. Ledger forward
    # activations, ZeRO-3 vs ZeRO-2: LoRA +274,432 (gate/up and down inputs of both layers, lm_head's
    # input), QLoRA +32,768 (bnb 4-bit layers skip F.linear: lm_head's only), full fine-tuning +0.
    def acts(parallel: str, **kw: object) -> int:
        return _est(parallel, **kw).memory.activations

    assert acts("zero3", method="lora") - acts("zero2", method="lora") == 274_432
    q = dict(method="lora", quant="nf4", quant_storage="bf16")
    assert acts("zero3", **q) - acts("zero2", **q) == 32_768
    assert acts("zero3") == acts("zero2")


def test_gloo_reduce_scatter_copy_is_counted_on_cpu_only() -> None:
    # Plain ZeRO-3 full: one reduction of every gradient in the epilogue: the concatenated input (2Ψ) on
    # both; gloo's reduce_scatter_tensor copies it again (ledger temporaries 4,188,672 x 2), NCCL does not.
    out = {device: _terms(_setup("zero3", recipe="plain", device=device)).phase_buffers["backward_end"] for device in ("cpu", "cuda")}
    assert out == {"cpu": 4 * PSI, "cuda": 2 * PSI}


def test_more_ranks_never_need_more_memory_per_rank() -> None:
    for parallel in ZERO:
        peaks = [_est(parallel, gpus=g, gpus_per_node=g).memory.allocated_peak for g in (2, 4, 8)]
        assert peaks == sorted(peaks, reverse=True)


def test_offload_moves_master_and_moments_to_the_host() -> None:
    # offload_optimizer: the fp32 master, moments and gradient partition live on the host.
    e = _est("zero2", device="cuda", offload="optimizer")
    assert e.sharding is not None
    assert e.sharding.optimizer_states == e.sharding.master_weights == 0
    assert e.sharding.host_per_gpu >= 16 * PSI // 2


@pytest.mark.parametrize("parallel", ["zero1", "zero2"])
def test_stage12_bucket_exists_once_a_gradient_hook_fired(parallel: str) -> None:
    # stage_1_and_2.py::process_gradients -> setup_buckets at the first gradient hook. Under PEFT's q,v
    # default nothing in the last layer's MLP trains, so its backward peak comes before any hook (ledger,
    # ZeRO-2 LoRA q,v gc s128 b2: comm_buffers 144 bytes at the peak, no bucket); with down_proj adapted
    # (all-linear) or a trainable head the bucket is there.
    qv = _terms(_setup(parallel, method="lora", seq_len=128, batch_size=2, grad_checkpointing=True)).phase_buffers
    assert "backward_layers" not in qv and qv["backward_first_layer"] == 2 * H * H
    every = _terms(_setup(parallel, method="lora", lora_targets=("all-linear",), seq_len=128, batch_size=2)).phase_buffers
    assert every["backward_layers"] == 2 * H * H
    assert _terms(_setup(parallel)).phase_buffers["backward_layers"] == 2 * H * H


def test_zero3_tied_head_keeps_the_embedding_gathered() -> None:
    # Qwen2's tied lm_head fetches the embedding table again at the forward's end (ledger, tiny qwen2 ZeRO-3
    # LoRA s64 b2: allgather lm_head 38,895,616 bytes = 151,936 x 128 elements of bf16 at the backward peak).
    qwen2 = str(TINY / "tiny-qwen2")
    terms = _terms(Setup(model=qwen2, method="lora", quant="bf16", seq_len=64, batch_size=2, device="cpu", gpus=2,
                         recipe="trainer", parallel="zero3"))
    assert terms.inflight["backward_loss"] > 151_936 * 128 * 2
    assert terms.inflight["backward_layers"] < 151_936 * 128 * 2  # released after the head's backward (LoRA, no gc)


def test_zero1_holds_whole_gradients_and_the_partition_at_the_reduction() -> None:
    # stage_1_and_2.py: stage 1 reduces after the backward (engine.py::allreduce_gradients -> reduce_gradients);
    # the embedding (256,000 elements > the h² bucket) goes first and is reduced in place, so rank 0 makes
    # grads_in_partition while every gradient is still whole (ledger ZeRO-1 full, backward peak: gradients
    # 4,186,112 + 2,225,152, bucket 131,072).
    terms = _terms(_setup("zero1"))
    assert terms.phase_gradients["backward_end"] == 2 * PSI + 2 * 1_112_576
    assert terms.phase_buffers["backward_end"] == 2 * H * H


def test_lora_a_input_of_down_proj_is_released_before_the_swiglu_backward_under_deepspeed() -> None:
    # DeepSpeed's bf16 adapters make lora_A save down_proj's input itself, which autograd frees before the
    # SwiGLU multiply's backward (activations._down_adapter_input). Ledger, ZeRO-2 LoRA all-linear r16
    # s128 b2 gc: rank peaks 9,478,056 / 9,503,144 bytes (1%).
    e = _est("zero2", method="lora", lora_rank=16, lora_targets=("all-linear",), seq_len=128, batch_size=2, grad_checkpointing=True)
    assert e.memory.allocated_peak == pytest.approx(9_503_144, rel=0.01)
