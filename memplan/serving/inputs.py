"""What a fleet plan is asked: N variants, traffic, serving and training choices (`PlanInputs`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from memplan.errors import SetupError
from memplan.model.lora import parse_lora_targets
from memplan.model.storage import QUANTS

__all__ = ["PlanInputs", "STRATEGIES", "MAX_VARIANTS"]

STRATEGIES = ("full_finetune", "lora", "lorax", "vllm_multi_lora")
MAX_VARIANTS = 10_000_000


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    """The question: N variants of `model` at `rps` requests/s overall, served on `gpu`: one catalog
    GPU, a tuple of them to choose from, or None for every GPU of the catalog (the cheapest wins)."""

    model: str
    variants: int
    gpu: str | tuple[str, ...] | None = None  # kw_only: a default may precede required fields
    rps: float
    popularity: str = "uniform"  # uniform | zipf
    zipf_exponent: float = 1.0
    prompt_tokens: int = 1024  # vLLM benchmark_serving.py random-input-len default
    output_tokens: int = 128  # vLLM benchmark_serving.py random-output-len default
    utilization: float = 0.7
    quant: str = "bf16"  # serving format of the weights
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | None = None  # None: PEFT's default for the family
    train_quant: str = "bf16"  # nf4 = QLoRA
    scale_to_zero: bool = False
    dataset_tokens: int = 10_000_000
    epochs: float = 3.0
    train_gpu: str | None = None
    # vllm_multi_lora's engine flags (vllm/engine/arg_utils.py EngineArgs); None: sized by the plan.
    max_loras: int | None = None  # GPU slots; the plan's: the distinct adapters of a full batch, within the adapter budget
    max_lora_rank: int | None = None  # slot rank, rounded up to vLLM's allowed ranks; the plan's: --lora-rank's
    max_cpu_loras: int | None = None  # host-RAM LRU cache; the plan's: host_adapter_cache_bytes / adapter bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", parse_lora_targets(self.lora_targets))
        if isinstance(self.gpu, list):
            object.__setattr__(self, "gpu", tuple(self.gpu))
        names = (self.gpu,) if isinstance(self.gpu, str) else self.gpu
        if names is not None and (not isinstance(names, tuple) or not names
                                  or not all(isinstance(g, str) and g.strip() for g in names)):
            raise SetupError(f"--gpu must name catalog GPUs (e.g. a10g), got {self.gpu!r}")
        for name, top in (("variants", MAX_VARIANTS), ("prompt_tokens", 10**7), ("output_tokens", 10**7), ("dataset_tokens", 10**15)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise SetupError(f"--{name.replace('_', '-')} must be a positive integer up to {top:,}, got {v!r}")
        # Ceilings: 10**6 req/s is beyond any single deployment; a Zipf exponent above 10 puts all
        # traffic on one variant; 1,000 epochs is no fine-tuning schedule anyone runs.
        for name, top in (("rps", 10**6), ("epochs", 1000), ("zipf_exponent", 10)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= top:
                raise SetupError(f"--{name.replace('_', '-')} must be a positive number up to {top:,}, got {v!r}")
        from memplan.training.setup import MAX_LORA_RANK

        for name in ("max_loras", "max_cpu_loras", "max_lora_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_VARIANTS):
                raise SetupError(f"--{name.replace('_', '-')} must be a positive integer up to {MAX_VARIANTS:,}, got {v!r}")
        if self.max_loras is not None and self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            # vllm/config/lora.py LoRAConfig: max_cpu_loras must be >= max_loras.
            raise SetupError(f"--max-cpu-loras ({self.max_cpu_loras}) must be at least --max-loras ({self.max_loras}), as vLLM requires")
        if self.max_lora_rank is not None and self.max_lora_rank < self.lora_rank:
            raise SetupError(f"--max-lora-rank ({self.max_lora_rank}) must hold --lora-rank ({self.lora_rank})")

        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or not 1 <= self.lora_rank <= MAX_LORA_RANK:
            raise SetupError(f"--lora-rank must be a positive integer up to {MAX_LORA_RANK:,}, got {self.lora_rank!r}")
        if isinstance(self.utilization, bool) or not isinstance(self.utilization, (int, float)) or not 0 < self.utilization <= 1:
            raise SetupError(f"--utilization must be in (0, 1], got {self.utilization!r}")
        for name, allowed in (("popularity", ("uniform", "zipf")), ("quant", QUANTS),
                              ("train_quant", QUANTS)):
            if getattr(self, name) not in allowed:
                raise SetupError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def gpu_names(self) -> tuple[str, ...] | None:
        """The GPUs to choose from (None: the whole catalog)."""
        return (self.gpu,) if isinstance(self.gpu, str) else self.gpu

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @property
    def train_tokens(self) -> int:
        return int(self.dataset_tokens * self.epochs)


