"""What one fine-tuning job costs: tokens, FLOPs, which GPU, GPU-hours and dollars.

FLOPs per token (2 per multiply-accumulate, N = matmul parameters):
- full fine-tuning: 6 N (forward 2N, backward 4N: gradients of activations and of
  weights; Kaplan et al. 2020 section 2.1, Narayanan et al. 2021 section 5.1);
- LoRA: the frozen base takes no weight gradients, so forward 2N plus the
  activation-gradient half of the backward 2N = 4N, plus 6 per adapter parameter
  (Hu et al. 2021 section 4.2 reports the resulting speed-up).
Time = FLOPs / (GPUs x GPU bf16 dense FLOP/s x MFU); MFU counts model FLOPs only, so gradient
checkpointing's recomputation appears as a lower MFU (PaLM, Chowdhery et al. 2022, app. B).
The GPU comes from the training-memory model (`memplan.training.estimate`): the catalog GPU that
fits the job and costs least. A job no single GPU holds runs on a cluster
(`memplan.training.clusters`: DDP, FSDP1/2 or ZeRO-1/2/3, per-GPU memory under the layout): per GPU
type the fewest GPUs that hold it, and of those the smallest cluster (fewest GPUs, then cost per
job). Cost per job is count x hours x price = FLOPs / (FLOP/s x MFU) x price, the same at any
count, so the cheapest-per-FLOP type is named beside it.
Ignores: attention FLOPs (small at fine-tuning lengths), data loading, evaluation, and
communication time (all-gathers, reduce-scatters, all-reduces): a cluster is charged as if it
scaled perfectly, so large clusters look slightly cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from memplan.errors import SetupError
from memplan.training.clusters import Cluster, layout_fits, layout_text
from memplan.training.estimate import estimate
from memplan.hardware.gpus import GPU, GPUCatalog
from memplan.model.lora import LoraPlan
from memplan.serving.memory import Assumptions
from memplan.training.setup import Setup
from memplan.model.spec import ModelSpec
from memplan.model.storage import is_four_bit
from memplan.serving.throughput import matmul_parameters
from memplan.units import format_bytes, format_usd

__all__ = ["TrainingCost", "training_flops", "training_cost"]


@dataclass(frozen=True)
class TrainingCost:
    """One fine-tuning job (one variant). Costs are None when no cluster holds it."""

    method: str  # full | lora
    tokens: int  # dataset tokens x epochs
    flops: float
    peak_bytes: int  # training-memory model's steady-state peak, per GPU under `parallel`
    gpu: str | None  # the GPU type the job runs on (cheapest that fits, or the one asked for)
    gpus: int | None  # GPUs the job runs on: 1, a cluster's count, or None where nothing holds it
    usable_bytes: int | None
    gpu_hours: float | None  # gpus x hours
    usd: float | None  # gpus x hours x the GPU's price
    note: str
    parallel: str = "none"  # the cluster's layout (memplan.training.parallel), none on one GPU
    fsdp_version: int | None = None  # FSDP layouts only
    quant_storage: str | None = None  # bnb_4bit_quant_storage a 4-bit base runs with under the layout
    hours: float | None = None  # wall-clock hours of the job on `gpus` GPUs

    @property
    def fits(self) -> bool:
        return self.gpus is not None


def training_flops(spec: ModelSpec, *, method: str, tokens: int, lora: LoraPlan | None) -> float:
    n = matmul_parameters(spec)
    if method == "full":
        return 6.0 * n * tokens
    adapters = lora.trainable_parameters if lora is not None else 0
    return 4.0 * n * tokens + 6.0 * adapters * tokens


def training_cost(
    spec: ModelSpec,
    catalog: GPUCatalog,
    a: Assumptions,
    *,
    method: str,
    tokens: int,
    lora: LoraPlan | None = None,
    quant: str = "bf16",
    train_gpu: str | None = None,
) -> TrainingCost:
    """Cost of one job: on `train_gpu` if given, else on the catalog GPU that fits and costs least."""
    targets: Sequence[str] | None = lora.target_names if lora is not None else None
    flops = training_flops(spec, method=method, tokens=tokens, lora=lora)
    candidates: tuple[GPU, ...] = (catalog.get(train_gpu),) if train_gpu else catalog.gpus
    what = "full fine-tuning" if method == "full" else f"LoRA ({quant}) fine-tuning"
    try:
        setup = Setup(
            model=spec.name,
            method="full" if method == "full" else "lora",
            quant="bf16" if method == "full" else quant,  # type: ignore[arg-type]
            lora_rank=lora.rank if lora is not None else 8,
            lora_targets=tuple(targets) if targets else None,
            # No longer than the model's positions; transformers' own attention default for gemma2.
            seq_len=min(a.train_seq_len, spec.max_position_embeddings),
            batch_size=a.train_batch_size,
            grad_checkpointing=a.train_grad_checkpointing,
            optimizer=a.train_optimizer,  # type: ignore[arg-type]
            attention="eager" if spec.model_type == "gemma2" else "sdpa",
        )
        peak = estimate(setup, model=spec).memory.peak
    except SetupError as exc:  # the training-memory model refuses this job: say so, cost nothing
        return TrainingCost(method=method, tokens=tokens, flops=flops, peak_bytes=0, gpu=train_gpu, gpus=None,
                            usable_bytes=None, gpu_hours=None, usd=None, note=f"{what} not estimated: {exc}")
    fitting = [g for g in candidates if g.usable_bytes >= peak]

    def hours(g: GPU, count: int = 1) -> float:
        return flops / (count * g.bf16_tflops * 1e12 * a.training_mfu) / 3600.0

    if fitting:
        best = min(fitting, key=lambda g: (hours(g) * g.usd_per_hour, hours(g)))
        h = hours(best)
        note = f"{what} fits on one {best.key} ({format_bytes(peak)} peak of {format_bytes(best.usable_bytes)})"
        return TrainingCost(method=method, tokens=tokens, flops=flops, peak_bytes=peak, gpu=best.key, gpus=1,
                            usable_bytes=best.usable_bytes, gpu_hours=h, usd=h * best.usd_per_hour, note=note, hours=h,
                            quant_storage=setup.quant_storage if is_four_bit(setup.quant) else None)
    return _cluster_cost(setup, spec, candidates, flops=flops, tokens=tokens, peak=peak, what=what, train_gpu=train_gpu, hours=hours)


def _cluster_cost(setup: Setup, spec: ModelSpec, candidates: Sequence[GPU], *, flops: float, tokens: int, peak: int, what: str,
                  train_gpu: str | None, hours: Callable[[GPU, int], float]) -> TrainingCost:
    """The job on the smallest cluster that holds it (fewest GPUs, then cost), when no single GPU does."""
    largest = max(candidates, key=lambda g: g.usable_bytes)
    one = f"one {largest.key}" if train_gpu else f"any single catalog GPU (largest: {largest.key}"
    head = f"{what} of {setup.model} needs {format_bytes(peak)} at peak, more than {one}, {format_bytes(largest.usable_bytes)}" \
        + ("" if train_gpu else ")")
    fits = layout_fits(setup, candidates, spec=spec)
    clusters = [c for f in fits for c in f.fewest.values()]
    if not clusters:
        ceiling = max((f.max_gpus for f in fits), default=0)
        note = f"{head}, and no cluster of up to {ceiling:,} {'of them' if train_gpu else 'GPUs'} under DDP, FSDP or ZeRO holds it"
        return TrainingCost(method=setup.method, tokens=tokens, flops=flops, peak_bytes=peak, gpu=train_gpu, gpus=None,
                            usable_bytes=largest.usable_bytes if train_gpu else None, gpu_hours=None, usd=None, note=note)

    def usd(c: Cluster) -> float:
        return c.gpus * hours(c.gpu, c.gpus) * c.gpu.usd_per_hour

    # The smallest feasible cluster (fewest GPUs, then cost): communication is not charged, so the
    # cheapest-per-FLOP answer would spread a job over many consumer GPUs; it is named beside it.
    best = min(clusters, key=lambda c: (c.gpus, usd(c), c.peak_bytes))
    cheapest = min(clusters, key=lambda c: (usd(c), c.gpus, c.peak_bytes))

    def name(c: Cluster) -> str:
        return f"{c.gpus} x {c.gpu.key} under {layout_text(c.setup.parallel, c.setup.fsdp_version)}"

    s = best.setup
    storage = f", --quant-storage {s.quant_storage}" if is_four_bit(s.quant) and s.quant_storage != "uint8" else ""
    note = (f"{head}; priced on {name(best)}{storage}, per-GPU peak {format_bytes(best.peak_bytes)} of "
            f"{format_bytes(best.gpu.usable_bytes)} under that layout: "
            + (f"the fewest {best.gpu.key} that hold it" if train_gpu else "the smallest cluster that holds it")
            + (f" (cheapest per job: {name(cheapest)}, {format_usd(usd(cheapest))})" if cheapest is not best else "")
            + "; communication time is not charged, so large clusters look slightly cheap")
    h = hours(best.gpu, best.gpus)
    return TrainingCost(method=setup.method, tokens=tokens, flops=flops, peak_bytes=best.peak_bytes, gpu=best.gpu.key, gpus=best.gpus,
                        usable_bytes=best.gpu.usable_bytes, gpu_hours=best.gpus * h, usd=usd(best), note=note,
                        parallel=s.parallel, fsdp_version=s.fsdp_version if s.parallel.startswith("fsdp") else None,
                        quant_storage=s.quant_storage if is_four_bit(s.quant) else None, hours=h)
