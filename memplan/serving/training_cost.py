"""What one fine-tuning job costs: tokens, FLOPs, which GPU, GPU-hours and dollars.

FLOPs per token (2 per multiply-accumulate, N = matmul parameters):
- full fine-tuning: 6 N (forward 2N, backward 4N: gradients of activations and of
  weights; Kaplan et al. 2020 section 2.1, Narayanan et al. 2021 section 5.1);
- LoRA: the frozen base takes no weight gradients, so forward 2N plus the
  activation-gradient half of the backward 2N = 4N, plus 6 per adapter parameter
  (Hu et al. 2021 section 4.2 reports the resulting speed-up).
Time = FLOPs / (GPU bf16 dense FLOP/s x MFU); MFU counts model FLOPs only, so gradient
checkpointing's recomputation appears as a lower MFU (PaLM, Chowdhery et al. 2022, app. B).
The GPU comes from the training-memory model (`memplan.training.estimate`). Until multi-GPU
sharding exists a job that does not fit on one GPU is reported as such, with no cost.
Ignores: attention FLOPs (small at fine-tuning lengths), data loading, evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from memplan.errors import SetupError
from memplan.training.estimate import estimate
from memplan.hardware.gpus import GPU, GPUCatalog
from memplan.model.lora import LoraPlan
from memplan.serving.memory import Assumptions
from memplan.training.setup import Setup
from memplan.model.spec import ModelSpec
from memplan.serving.throughput import matmul_parameters
from memplan.units import format_bytes

__all__ = ["TrainingCost", "training_flops", "training_cost"]


@dataclass(frozen=True)
class TrainingCost:
    """One fine-tuning job (one variant). Costs are None when no single GPU holds it."""

    method: str  # full | lora
    tokens: int  # dataset tokens x epochs
    flops: float
    peak_bytes: int  # training-memory model's steady-state peak
    gpu: str | None  # the GPU the job runs on (cheapest that fits, or the one asked for)
    gpus: int | None  # GPUs the job needs: 1, or None where one GPU is not enough
    usable_bytes: int | None
    gpu_hours: float | None
    usd: float | None
    note: str

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
    if not fitting:
        largest = max(candidates, key=lambda g: g.usable_bytes)
        where = f"one {largest.key}" if train_gpu else f"any single catalog GPU (largest: {largest.key})"
        note = (
            f"{what} of {spec.name} needs {format_bytes(peak)} at peak: does not fit on {where} with "
            f"{format_bytes(largest.usable_bytes)}; multi-GPU sharding is not modelled yet"
        )
        return TrainingCost(method=method, tokens=tokens, flops=flops, peak_bytes=peak, gpu=train_gpu, gpus=None,
                            usable_bytes=largest.usable_bytes if train_gpu else None, gpu_hours=None, usd=None, note=note)

    def hours(g: GPU) -> float:
        return flops / (g.bf16_tflops * 1e12 * a.training_mfu) / 3600.0

    best = min(fitting, key=lambda g: (hours(g) * g.usd_per_hour, hours(g)))
    h = hours(best)
    note = f"{what} fits on one {best.key} ({format_bytes(peak)} peak of {format_bytes(best.usable_bytes)})"
    return TrainingCost(method=method, tokens=tokens, flops=flops, peak_bytes=peak, gpu=best.key, gpus=1,
                        usable_bytes=best.usable_bytes, gpu_hours=h, usd=h * best.usd_per_hour, note=note)
