"""Training cost of one variant (memplan.serving.training_cost)."""

from __future__ import annotations

import pytest

from memplan.model.catalog import load_model
from memplan.training.estimate import estimate
from memplan.hardware.gpus import gpu_catalog
from memplan.model.lora import plan_lora
from memplan.serving.memory import Assumptions, assumptions
from memplan.training.setup import Setup
from memplan.serving.throughput import matmul_parameters
from memplan.serving.training_cost import training_cost, training_flops

LLAMA2_7B_PARAMS = 6_738_415_616  # REFERENCE.md
LLAMA2_7B_EMBEDDING = 32_000 * 4_096  # config: vocab_size x hidden_size (untied; lm_head is a matmul)
LLAMA2_7B_NORMS = (2 * 32 + 1) * 4_096  # two RMSNorm weights per layer and the final one
MATMUL = LLAMA2_7B_PARAMS - LLAMA2_7B_EMBEDDING - LLAMA2_7B_NORMS


@pytest.fixture(scope="module")
def a() -> Assumptions:
    return assumptions()


def test_matmul_parameters_leave_out_the_embedding_lookup() -> None:
    # Kaplan et al. 2020 count non-embedding parameters in C = 6 N D; the norms' 266,240
    # weights scale activations but are no matmul, so they are left out too (0.004%).
    assert matmul_parameters(load_model("llama2-7b")) == MATMUL


def test_full_finetuning_is_six_n_per_token() -> None:
    tokens = 30_000_000
    n = MATMUL
    assert training_flops(load_model("llama2-7b"), method="full", tokens=tokens, lora=None) == 6 * n * tokens


def test_lora_skips_the_weight_gradients_of_the_frozen_base() -> None:
    # Forward 2N + activation gradients 2N, plus 6 per adapter parameter (4,194,304 for r=8 on q,v).
    spec, tokens = load_model("llama2-7b"), 1_000_000
    n = MATMUL
    lora = plan_lora(spec, 8, "q_proj,v_proj")
    assert training_flops(spec, method="lora", tokens=tokens, lora=lora) == 4 * n * tokens + 6 * 4_194_304 * tokens
    ratio = training_flops(spec, method="lora", tokens=tokens, lora=lora) / training_flops(spec, method="full", tokens=tokens, lora=None)
    assert ratio == pytest.approx(2 / 3, abs=0.01)


def test_gpu_hours_and_dollars_follow_mfu_and_price(a: Assumptions) -> None:
    spec = load_model("llama2-7b")
    a2 = a.override({"training_mfu": "0.5"})
    cat = gpu_catalog().with_prices({"a100-80gb": 2.0})
    t = training_cost(spec, cat, a2, method="lora", tokens=10_000_000, lora=plan_lora(spec, 8, None), train_gpu="a100-80gb")
    # FLOPs written out (not read back from `t`): 4 N per token through the frozen base (forward
    # 2N + input gradients 2N) + 6 per trainable LoRA parameter (REFERENCE.md: 4,194,304 for r=8 q,v).
    flops = 4 * MATMUL * 10_000_000 + 6 * 4_194_304 * 10_000_000
    assert t.flops == flops
    # A100: 312 TFLOP/s bf16 dense (datasheet) at 50% MFU.
    assert t.gpu_hours == pytest.approx(flops / (312e12 * 0.5) / 3600)
    assert t.usd == pytest.approx(t.gpu_hours * 2.0)
    assert t.gpus == 1 and t.fits


def test_the_job_is_sized_by_the_training_memory_model(a: Assumptions) -> None:
    spec = load_model("llama2-7b")
    t = training_cost(spec, gpu_catalog(), a, method="full", tokens=1_000_000)
    peak = estimate(
        Setup(model="llama2-7b", method="full", seq_len=a.train_seq_len, batch_size=a.train_batch_size,
              grad_checkpointing=a.train_grad_checkpointing, optimizer=a.train_optimizer),  # type: ignore[arg-type]
        model=spec,
    ).memory.peak
    assert t.peak_bytes == peak
    assert t.usable_bytes is not None and t.usable_bytes >= peak


def test_the_cheapest_fitting_gpu_is_chosen(a: Assumptions) -> None:
    spec = load_model("llama2-7b")
    lora = plan_lora(spec, 8, None)
    best = training_cost(spec, gpu_catalog(), a, method="lora", tokens=5_000_000, lora=lora)
    for g in gpu_catalog().gpus:
        other = training_cost(spec, gpu_catalog(), a, method="lora", tokens=5_000_000, lora=lora, train_gpu=g.key)
        if other.fits:
            assert best.usd <= other.usd + 1e-12, g.key


def _plan_setup(a: Assumptions, model: str, **kw: object) -> Setup:
    """The setup training_cost sizes a full job with, written out from the assumptions."""
    return Setup(model=model, method="full", seq_len=a.train_seq_len, batch_size=a.train_batch_size,
                 grad_checkpointing=a.train_grad_checkpointing, optimizer=a.train_optimizer, **kw)  # type: ignore[arg-type]


def test_too_big_for_one_gpu_runs_on_the_fewest_gpus_that_hold_it(a: Assumptions) -> None:
    # Full fine-tuning of Llama-2-7B in bf16 with AdamW needs > 50 GB (weights, grads and two
    # states of 13.5 GB each): not one 24 GB A10G, but a few of them under a sharded layout.
    a10g = gpu_catalog().get("a10g")
    t = training_cost(load_model("llama2-7b"), gpu_catalog(), a, method="full", tokens=1_000_000, train_gpu="a10g")
    assert t.fits and t.gpu == "a10g" and t.gpus is not None and t.gpus > 1 and t.parallel != "none"
    assert "more than one a10g" in t.note and "not modelled" not in t.note
    # per-GPU memory under the chosen layout: it fits at t.gpus and at no smaller candidate count
    def peak(n: int) -> int:
        return estimate(_plan_setup(a, "llama2-7b", gpus=n, parallel=t.parallel, fsdp_version=t.fsdp_version or 1)).memory.peak
    assert t.peak_bytes == peak(t.gpus) <= a10g.usable_bytes
    assert all(peak(n) > a10g.usable_bytes for n in (2, 4, 8, 16, 24, 32) if n < t.gpus)


def test_a_cluster_costs_count_x_hours_x_price(a: Assumptions) -> None:
    # 70B full fine-tuning (> 560 GB of weights, grads and states) fits on no single catalog GPU.
    spec, cat, tokens = load_model("llama2-70b"), gpu_catalog(), 2_000_000
    t = training_cost(spec, cat, a, method="full", tokens=tokens)
    assert t.fits and t.gpus > 1
    g = cat.get(t.gpu)
    flops = 6 * matmul_parameters(spec) * tokens  # 6 N per token (Kaplan et al. 2020)
    hours = flops / (t.gpus * g.bf16_tflops * 1e12 * a.training_mfu) / 3600
    assert t.hours == pytest.approx(hours)
    assert t.gpu_hours == pytest.approx(t.gpus * hours)
    assert t.usd == pytest.approx(t.gpus * hours * g.usd_per_hour)
    assert "communication time is not charged" in t.note and "per-GPU peak" in t.note


def test_the_cluster_chosen_is_the_smallest_that_holds_the_job(a: Assumptions) -> None:
    # Issue 13: "memplan plan prices training on the smallest feasible cluster" (fewest GPUs, then cost).
    spec, cat = load_model("llama2-70b"), gpu_catalog()
    best = training_cost(spec, cat, a, method="full", tokens=1_000_000)
    for g in cat.gpus:
        other = training_cost(spec, cat, a, method="full", tokens=1_000_000, train_gpu=g.key)
        if other.fits:
            assert (best.gpus, best.usd) <= (other.gpus, other.usd * (1 + 1e-12)), g.key
            # per job the count cancels out: FLOPs / (FLOP/s x MFU) x price, whatever the count
            assert other.usd == pytest.approx(other.flops / (g.bf16_tflops * 1e12 * a.training_mfu) / 3600 * g.usd_per_hour)


def test_a_qlora_cluster_runs_with_a_float_quant_storage_where_it_shards(a: Assumptions) -> None:
    spec = load_model("llama2-70b")
    lora = plan_lora(spec, 8, "all-linear")
    t = training_cost(spec, gpu_catalog(), a, method="lora", tokens=1_000_000, lora=lora, quant="nf4", train_gpu="t4")
    assert t.fits and t.gpus > 1
    if t.parallel in ("fsdp", "zero3"):
        assert t.quant_storage == "bf16" and "--quant-storage bf16" in t.note
    else:
        assert t.quant_storage == "uint8"


def test_nothing_holds_it_is_said_plainly(a: Assumptions) -> None:
    from memplan.hardware.gpus import GPU, GPUCatalog

    tiny = GPU(key="tiny", name="tiny", memory_bytes=10**9, usable_bytes=2**30, bandwidth_bytes_per_s=10**12, bf16_tflops=100.0,
               pcie_gen=4, usd_per_hour=1.0, price_provider="test", price_date="")
    cat = GPUCatalog(gpus=(tiny,), storage_usd_per_gb_month=0.0, source="test", gpus_per_node=8)
    t = training_cost(load_model("llama2-7b"), cat, a, method="full", tokens=1_000_000)
    assert not t.fits and t.usd is None and t.gpu_hours is None
    assert "no cluster of up to 1,024 GPUs" in t.note


def test_qlora_fits_where_bf16_lora_does_not(a: Assumptions) -> None:
    # QLoRA (Dettmers et al. 2023): a 4-bit base makes a 13B LoRA fit a 24 GB card.
    spec = load_model("llama2-13b")
    lora = plan_lora(spec, 8, None)
    bf16 = training_cost(spec, gpu_catalog(), a, method="lora", tokens=1_000_000, lora=lora, train_gpu="a10g")
    nf4 = training_cost(spec, gpu_catalog(), a, method="lora", tokens=1_000_000, lora=lora, quant="nf4", train_gpu="a10g")
    assert bf16.gpus > 1 and nf4.gpus == 1  # bf16 needs a cluster of A10Gs, QLoRA one
